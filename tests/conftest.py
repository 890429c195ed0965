"""Shared fixtures: a real grpc.aio server on 127.0.0.1 port 0 over a real SQLite file."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from tests.postgres import PostgresCluster, running_cluster
from tokenstream.server import ServerConfig, TokenStreamServer, create_server
from tokenstream.server.streams import EngineSettings
from tokenstream.v1 import tokenstream_pb2_grpc as pb_grpc


class RunningServer:
    def __init__(self, server: TokenStreamServer, channel: grpc.aio.Channel) -> None:
        self.server = server
        self.channel = channel
        self.stub = pb_grpc.TokenStreamServiceStub(channel)

    @property
    def target(self) -> str:
        return self.server.address


ServerFactory = Callable[..., Awaitable[RunningServer]]


@pytest.fixture
async def start_server(tmp_path: Path) -> AsyncIterator[ServerFactory]:
    """Starts servers on a SQLite file in tmp_path; each is stopped at teardown."""
    running: list[RunningServer] = []

    async def start(
        *,
        token_rate: float = 0.0,
        database: str = "store.db",
        keepalive_time: float = 30.0,
        keepalive_timeout: float = 10.0,
        **engine: float | int,
    ) -> RunningServer:
        config = ServerConfig(
            port=0,
            database_url=f"sqlite+aiosqlite:///{tmp_path / database}",
            token_rate=token_rate,
            shutdown_grace=1.0,
            keepalive_time=keepalive_time,
            keepalive_timeout=keepalive_timeout,
            engine=replace(EngineSettings(flush_interval=0.002), **engine),  # type: ignore[arg-type]
        )
        server, port = await create_server(config)
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        handle = RunningServer(server, channel)
        running.append(handle)
        return handle

    yield start
    for handle in running:
        await handle.channel.close()
        await handle.server.stop()


@pytest.fixture
async def server(start_server: ServerFactory) -> RunningServer:
    """A server whose built-in sources produce as fast as they can."""
    return await start_server()


@pytest.fixture
async def paced_server(start_server: ServerFactory) -> RunningServer:
    """A server whose built-in sources produce 200 tokens/s, so streams run for a while."""
    return await start_server(token_rate=200.0)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """One throw-away PostgreSQL cluster for the whole run, started on first use."""
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture
async def postgres_url(postgres_cluster: PostgresCluster) -> str:
    """A fresh, empty PostgreSQL database for one test."""
    return await postgres_cluster.create_database()


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each storage test runs on the embedded SQLite file and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    return await cluster.create_database()
