"""Domain errors raised by the stream engine.

Every error a caller can cause or observe is a subclass of :class:`TokenStreamError`.
Each carries a human-readable ``message`` (what went wrong and what to do about it) and a
machine-readable ``reason`` (UPPER_SNAKE_CASE, stable across releases). The transport layer
maps each class to exactly one gRPC status code in one place
(``tokenstream.server.transport.status``):

    TokenStreamError
    ├── InvalidArgument      malformed or unacceptable request       -> INVALID_ARGUMENT
    ├── NotFound             no such stream or conversation          -> NOT_FOUND
    ├── OutOfRange           from_seq past the end of a finished     -> OUT_OF_RANGE
    │                        stream
    ├── AlreadyExists        request_id reused for another request   -> ALREADY_EXISTS
    ├── ResourceExhausted    a configured limit was reached          -> RESOURCE_EXHAUSTED
    ├── Unavailable          the server is shutting down             -> UNAVAILABLE
    ├── Unauthenticated      missing, malformed or invalid           -> UNAUTHENTICATED
    │                        credentials
    ├── PermissionDenied     a member whose role does not allow it   -> PERMISSION_DENIED
    │                        (non-members get NotFound: ids cannot be probed)
    └── FailedPrecondition   not in a state that allows it           -> FAILED_PRECONDITION
                             (e.g. removing the last owner)

Storage has its own errors (``tokenstream.server.storage.errors``); the engine translates
them into these, chained with ``from``.
"""

from __future__ import annotations

from collections.abc import Mapping


class TokenStreamError(Exception):
    """Base class of all domain errors."""

    default_reason = "ERROR"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        field: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        # The request field at fault, if one is (reported as a BadRequest field violation).
        self.field = field
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidArgument(TokenStreamError):
    """The request is malformed or asks for something the server will not do."""

    default_reason = "INVALID_ARGUMENT"


class NotFound(TokenStreamError):
    """The stream or conversation does not exist."""

    default_reason = "NOT_FOUND"


class OutOfRange(TokenStreamError):
    """A sequence number lies past the end of a finished stream."""

    default_reason = "OUT_OF_RANGE"


class AlreadyExists(TokenStreamError):
    """An idempotency key was already used for a different request."""

    default_reason = "ALREADY_EXISTS"


class ResourceExhausted(TokenStreamError):
    """A configured limit was reached."""

    default_reason = "RESOURCE_EXHAUSTED"


class Unavailable(TokenStreamError):
    """The server cannot take the call now (e.g. it is shutting down); retry elsewhere."""

    default_reason = "UNAVAILABLE"


class Unauthenticated(TokenStreamError):
    """The call carries no valid credentials."""

    default_reason = "UNAUTHENTICATED"


class PermissionDenied(TokenStreamError):
    """The caller belongs to the conversation, but their role does not allow this."""

    default_reason = "PERMISSION_DENIED"


class FailedPrecondition(TokenStreamError):
    """The request is valid but the current state does not allow it."""

    default_reason = "FAILED_PRECONDITION"
