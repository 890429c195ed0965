"""Server configuration: one flat set of settings, filled from the CLI or by tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tokenstream.server.auth import AuthSettings
from tokenstream.server.storage.sql.database import DatabaseSettings
from tokenstream.server.streams.settings import EngineSettings

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///tokenstream.db"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port (tests)
    database_url: str = DEFAULT_DATABASE_URL
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    # Pace of the built-in token sources in tokens per second; 0 = as fast as possible.
    token_rate: float = 50.0
    default_model: str = "synthetic"
    # Seconds running calls get to finish when the server stops.
    shutdown_grace: float = 5.0
    # Bring the schema up to date on start (Alembic).
    migrate: bool = True
    # HTTP/2 keepalive pings on idle connections, so a dead peer is noticed (seconds).
    keepalive_time: float = 30.0
    keepalive_timeout: float = 10.0
    engine: EngineSettings = field(default_factory=EngineSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    # Serve without authentication on a non-loopback address (never the default).
    insecure_no_auth: bool = False
    # TLS: the server's certificate chain and key (PEM); with a client CA, mutual TLS
    # (clients must present a certificate signed by it).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
