"""The tokenstream server: transport, stream engine, storage and wiring."""

from tokenstream.server.app import TokenStreamServer, create_server, serve
from tokenstream.server.config import ServerConfig

__all__ = ["ServerConfig", "TokenStreamServer", "create_server", "serve"]
