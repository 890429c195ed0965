"""Wiring: config -> storage -> engine -> servicers -> interceptors -> gRPC server.

The interceptor order is decided here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tokenstream.server.auth import LOOPBACK_HOSTS, Authenticator, ConfigurationError
from tokenstream.server.config import ServerConfig
from tokenstream.server.models import builtin_registry
from tokenstream.server.storage.sql import (
    SqliteFileLock,
    SqlStreamRepository,
    create_engine,
    is_sqlite,
    upgrade_to_head,
)
from tokenstream.server.streams import StreamEngine
from tokenstream.server.transport import (
    AuthInterceptor,
    DomainErrorInterceptor,
    TokenStreamServicer,
)
from tokenstream.v1 import tokenstream_pb2 as pb
from tokenstream.v1 import tokenstream_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TokenStreamService"].full_name


class TokenStreamServer:
    """A running tokenstream server: the gRPC server plus the engine and store behind it."""

    def __init__(
        self,
        config: ServerConfig,
        grpc_server: grpc.aio.Server,
        engine: StreamEngine,
        repository: SqlStreamRepository,
        health_servicer: health.aio.HealthServicer,
        port: int,
        db_lock: SqliteFileLock | None = None,
    ) -> None:
        self.config = config
        self.port = port
        self.engine = engine
        self._grpc = grpc_server
        self._repository = repository
        self._health = health_servicer
        self._db_lock = db_lock
        self._stopped: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def start(self) -> None:
        try:
            await self.engine.start()
            try:
                await self._grpc.start()
            except BaseException:
                await self.engine.stop(grace=0)
                raise
        except BaseException:
            await self._repository.close()
            self._release_db()
            raise
        loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
        log.info(
            "tokenstream serving on %s (database %s, event loop %s)",
            self.address,
            self.config.database_url,
            loop,
        )
        await self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop; calling it again waits for the first call to finish."""
        if self._stopped is None:
            self._stopped = asyncio.ensure_future(self._stop(grace))
        await asyncio.shield(self._stopped)

    async def _stop(self, grace: float | None) -> None:
        grace = self.config.shutdown_grace if grace is None else grace
        try:
            await self._health.enter_graceful_shutdown()
            # Ending generations first lets every subscriber receive its `end` in the grace.
            await self.engine.stop(grace)
        finally:
            try:
                await self._grpc.stop(grace)
            finally:
                await self._repository.close()
                self._release_db()
        log.info("tokenstream stopped")

    def _release_db(self) -> None:
        if self._db_lock is not None:
            self._db_lock.release()

    async def wait_for_termination(self) -> None:
        await self._grpc.wait_for_termination()


def authenticator_for(config: ServerConfig) -> Authenticator | None:
    """The authenticator, or None for development mode, which is only allowed loudly.

    Without configured credentials the server runs open only on a loopback address (or
    with an explicit --insecure-no-auth); it never silently serves a network unguarded.
    """
    if config.auth.configured:
        return Authenticator(config.auth)
    if config.host not in LOOPBACK_HOSTS and not config.insecure_no_auth:
        raise ConfigurationError(
            f"refusing to serve {config.host} without authentication: configure API keys "
            "(--api-keys-file) or JWT verification (--jwt-secret / --jwt-public-key), or "
            "pass --insecure-no-auth if this network is trusted"
        )
    log.warning(
        "AUTHENTICATION IS OFF (development mode): every caller on %s is accepted as "
        "'developer'. Configure --api-keys-file or --jwt-* before exposing this server.",
        config.host,
    )
    return None


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if config.tls_cert_file is None and config.tls_key_file is None:
        if config.tls_client_ca_file is not None:
            raise ConfigurationError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if config.tls_cert_file is None or config.tls_key_file is None:
        raise ConfigurationError("TLS needs both --tls-cert and --tls-key")
    client_ca = config.tls_client_ca_file.read_bytes() if config.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(config.tls_key_file.read_bytes(), config.tls_cert_file.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    keepalive_ms = int(config.keepalive_time * 1000)
    return [
        # No SO_REUSEPORT: a second server on a taken port must fail, not share the port.
        ("grpc.so_reuseport", 0),
        # Ping idle connections and drop those that do not answer: a subscriber whose
        # network vanished is noticed even while its stream is quiet.
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout * 1000)),
        # gRPC 1.85 only drops the connection on an unanswered ping with this set as well.
        ("grpc.http2.ping_timeout_ms", int(config.keepalive_timeout * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Accept client pings as often as clients are told to send them (see the client).
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", min(keepalive_ms, 10_000)),
    ]


async def create_server(config: ServerConfig) -> tuple[TokenStreamServer, int]:
    """Builds and binds the server (not started). Port 0 binds a free port."""
    # Settings errors first, before anything is created on disk.
    authenticator = authenticator_for(config)
    credentials = server_credentials(config)
    sqlite = is_sqlite(config.database_url)
    db_lock = SqliteFileLock(config.database_url) if sqlite else None
    if db_lock is not None:
        db_lock.acquire()
    try:
        return await _build(config, sqlite, db_lock, authenticator, credentials)
    except BaseException:
        if db_lock is not None:
            db_lock.release()
        raise


async def _build(
    config: ServerConfig,
    sqlite: bool,
    db_lock: SqliteFileLock | None,
    authenticator: Authenticator | None,
    credentials: grpc.ServerCredentials | None,
) -> tuple[TokenStreamServer, int]:
    db = create_engine(config.database_url, config.database)
    if config.migrate:
        await upgrade_to_head(db)
    repository = SqlStreamRepository(db)
    engine = StreamEngine(
        repository,
        builtin_registry(config.token_rate, config.default_model),
        config.engine,
        # One process owns an embedded SQLite file (SqliteFileLock); on a shared server
        # database, other replicas may be generating the streams this one finds active.
        sole_writer=sqlite,
    )

    # Order matters: errors (including UNAUTHENTICATED) are mapped outermost.
    grpc_server = grpc.aio.server(
        interceptors=[DomainErrorInterceptor(), AuthInterceptor(authenticator)],
        options=server_options(config),
    )
    pb_grpc.add_TokenStreamServiceServicer_to_server(TokenStreamServicer(engine), grpc_server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], grpc_server
    )
    try:
        address = f"{config.host}:{config.port}"
        if credentials is None:
            port = grpc_server.add_insecure_port(address)
        else:
            port = grpc_server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        await db.dispose()
        raise OSError(f"could not listen on {config.host}:{config.port}: {exc}") from exc
    server = TokenStreamServer(
        config, grpc_server, engine, repository, health_servicer, port, db_lock
    )
    return server, port


async def serve(config: ServerConfig) -> None:
    """Runs until SIGINT or SIGTERM, then stops gracefully."""
    server, _port = await create_server(config)
    # What exists by now (modules, descriptors, the schema, the wiring) lives as long as the
    # process: parked outside the collector, it is not traversed again by every full
    # collection, which otherwise paused delivery for ~60 ms at a time under load.
    gc.collect()
    gc.freeze()
    # The SQLite store works on threads (storage/sql/transactions.py). While the loop runs
    # Python, a thread waiting for the GIL gets it only after the switch interval, several
    # times per commit. 2 ms instead of the default 5 brought the paced p99 from ~23 ms to
    # ~18 ms; 1 ms gave ~16 ms but cost ~20 % of full-speed fan-out to three subscribers
    # per stream. (A process with one thread never switches.)
    sys.setswitchinterval(0.002)
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.create_task(server.wait_for_termination())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    await server.stop()
    await waiter
