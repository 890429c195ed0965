"""The client's exceptions: each carries the gRPC code and the server's ErrorInfo reason.

TokenStreamClientError          any failed call (code, reason, message, metadata)
└── RetriesExhausted            retryable failures went on past the retry budget
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

_DETAILS_KEY = "grpc-status-details-bin"


class TokenStreamClientError(Exception):
    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str = "",
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = metadata or {}

    @classmethod
    def from_rpc_error(cls, error: grpc.aio.AioRpcError) -> TokenStreamClientError:
        reason, metadata = "", {}
        for key, value in error.trailing_metadata() or ():
            if key == _DETAILS_KEY and isinstance(value, bytes):
                status = status_pb2.Status.FromString(value)
                for detail in status.details:
                    info = error_details_pb2.ErrorInfo()
                    if detail.Unpack(info):
                        reason, metadata = info.reason, dict(info.metadata)
        return cls(error.code(), error.details() or "", reason, metadata)


class RetriesExhausted(TokenStreamClientError):
    """The call kept failing in ways worth retrying, until the retry budget ran out."""

    def __init__(self, attempts: int, last: TokenStreamClientError) -> None:
        super().__init__(
            last.code,
            f"gave up after {attempts} attempts; last error: {last.message}",
            last.reason,
            last.metadata,
        )
        self.attempts = attempts
        self.last = last
