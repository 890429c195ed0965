"""Authentication of every call (but health checks) in one interceptor."""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import grpc
from grpc_interceptor.server import AsyncServerInterceptor

from tokenstream.server.auth import DEVELOPER, Authenticator, Principal

_principal: ContextVar[Principal | None] = ContextVar("tokenstream_principal", default=None)

# Load balancers and orchestrators probe health without credentials.
_OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def current_principal() -> Principal | None:
    """The authenticated caller of the RPC being served (None outside an RPC)."""
    return _principal.get()


class AuthInterceptor(AsyncServerInterceptor):
    """Resolves the `authorization` header to a principal, or fails with UNAUTHENTICATED.

    With no authenticator (development mode on loopback) every caller is `developer`.
    """

    def __init__(self, authenticator: Authenticator | None) -> None:
        self._authenticator = authenticator

    async def intercept(
        self,
        method: Callable[..., Any],
        request_or_iterator: Any,
        context: grpc.aio.ServicerContext[Any, Any],
        method_name: str,
    ) -> Any:
        if not method_name.startswith(_OPEN_PREFIXES):
            _principal.set(self._principal_of(context))
        response = method(request_or_iterator, context)
        if hasattr(response, "__aiter__"):
            return response
        return await response

    def _principal_of(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        if self._authenticator is None:
            return DEVELOPER
        authorization = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str):
                authorization = value
        return self._authenticator.authenticate(authorization)
