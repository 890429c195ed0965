"""gRPC transport: servicers, interceptors, and proto <-> domain conversion."""

from tokenstream.server.transport.auth import AuthInterceptor, current_principal
from tokenstream.server.transport.servicer import TokenStreamServicer
from tokenstream.server.transport.status import DomainErrorInterceptor

__all__ = ["AuthInterceptor", "DomainErrorInterceptor", "TokenStreamServicer", "current_principal"]
