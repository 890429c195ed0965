"""The one place where errors become gRPC statuses.

Domain errors map to codes by class; each status carries `google.rpc.Status` details with
an `ErrorInfo` (reason, domain, metadata) and, when a request field is at fault, a
`BadRequest` field violation (AIP-193). Anything else is INTERNAL with a generic message,
and logged.
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_interceptor.exception_to_status import AsyncExceptionToStatusInterceptor
from grpc_interceptor.exceptions import GrpcException
from grpc_status import rpc_status

from tokenstream.server import errors

log = logging.getLogger(__name__)

ERROR_DOMAIN = "tokenstream.v1"

_CODES: dict[type[errors.TokenStreamError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
}


def code_for(error: errors.TokenStreamError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in _CODES:
            return _CODES[cls]
    return grpc.StatusCode.UNKNOWN


def to_status(error: errors.TokenStreamError) -> grpc.Status:
    code = code_for(error)
    details: list[any_pb2.Any] = []
    info = any_pb2.Any()
    info.Pack(
        error_details_pb2.ErrorInfo(
            reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata
        )
    )
    details.append(info)
    if error.field is not None:
        bad = any_pb2.Any()
        bad.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=error.field, description=error.message, reason=error.reason
                    )
                ]
            )
        )
        details.append(bad)
    status = status_pb2.Status(
        code=getattr(code_pb2, code.name), message=error.message, details=details
    )
    result: grpc.Status = rpc_status.to_status(status)
    return result


class DomainErrorInterceptor(AsyncExceptionToStatusInterceptor):
    """Turns exceptions raised by servicers (unary and streaming) into statuses."""

    def __init__(self) -> None:
        super().__init__(status_on_unknown_exception=grpc.StatusCode.INTERNAL)

    async def handle_exception(
        self,
        ex: Exception,
        request_or_iterator: Any,
        context: grpc.aio.ServicerContext[Any, Any],
        method_name: str,
    ) -> NoReturn:
        if isinstance(ex, errors.TokenStreamError):
            status = to_status(ex)
            await context.abort(status.code, status.details, status.trailing_metadata)
        if isinstance(ex, GrpcException):
            await context.abort(ex.status_code, ex.details)
        if isinstance(ex, grpc.aio.AbortError) or context.code() not in (None, grpc.StatusCode.OK):
            raise ex  # the call already has its status
        log.error("unhandled error in %s", method_name, exc_info=ex)
        await context.abort(
            grpc.StatusCode.INTERNAL, "internal error; the server log has the details"
        )
        raise ex  # not reached: abort raises
