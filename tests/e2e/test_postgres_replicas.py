"""A server on PostgreSQL (several replicas: test_replica_processes.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from tests.e2e.conftest import ServerProcess
from tests.e2e.conftest import run_tokenstream as run_cli
from tests.e2e.grpc_helpers import read_all
from tokenstream.client import Chunk, StreamEnd, TokenStreamClient
from tokenstream.server import ServerConfig, TokenStreamServer, create_server
from tokenstream.server.models.synthetic import synthetic_tokens
from tokenstream.server.streams import EngineSettings
from tokenstream.v1 import tokenstream_pb2 as pb
from tokenstream.v1 import tokenstream_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from tokenstream.v1.tokenstream_pb2_grpc import TokenStreamServiceAsyncStub

Replica = tuple[TokenStreamServer, "TokenStreamServiceAsyncStub"]
StartReplica = Callable[[], Awaitable[Replica]]


@pytest.fixture
async def start_replica(postgres_url: str) -> AsyncIterator[StartReplica]:
    started: list[tuple[TokenStreamServer, grpc.aio.Channel]] = []

    async def start() -> Replica:
        config = ServerConfig(
            port=0,
            database_url=postgres_url,
            token_rate=200.0,
            shutdown_grace=0.5,
            engine=EngineSettings(flush_interval=0.002, store_poll_interval=30.0),  # notices do it
        )
        server, _ = await create_server(config)
        await server.start()
        channel = grpc.aio.insecure_channel(server.address)
        started.append((server, channel))
        stub: TokenStreamServiceAsyncStub = pb_grpc.TokenStreamServiceStub(channel)
        return server, stub

    yield start
    for server, channel in started:
        await channel.close()
        await server.stop()


async def test_a_server_on_postgresql_streams_stores_and_compacts(
    start_replica: StartReplica,
) -> None:
    _, stub = await start_replica()
    submitted = await stub.SubmitPrompt(pb.SubmitPromptRequest(prompt="on postgres", max_tokens=50))
    received = await read_all(stub, submitted.stream_id)
    received.assert_contiguous()
    assert received.end is not None
    assert received.end.state == pb.STREAM_STATE_COMPLETED
    assert received.end.final_seq == 49
    history = await stub.GetHistory(pb.GetHistoryRequest(conversation_id=submitted.conversation_id))
    assert [t.response for t in history.turns] == [received.text]
    tokens = synthetic_tokens("on postgres", 50)
    assert received.text == "".join(tokens)
    resumed = await read_all(stub, submitted.stream_id, from_seq=20)
    assert resumed.text == "".join(tokens[20:])


async def test_migrate_then_serve_without_migrating(
    postgres_url: str, server_process: ServerProcess, tmp_path: Path
) -> None:
    """The multi-replica routine: `tokenstream migrate` once, then servers with
    --no-migrate (real processes)."""
    code, out, err = await run_cli("migrate", "--database-url", postgres_url)
    assert (code, out.strip()) == (0, "the database schema is up to date"), err
    extra = ("--database-url", postgres_url, "--no-migrate")
    port = await asyncio.to_thread(
        server_process.start, tmp_path / "unused.db", 0.0, extra_args=extra
    )
    async with TokenStreamClient(f"127.0.0.1:{port}") as client:
        sub = await client.submit("through a real process", model="echo")
        items = [item async for item in client.stream(sub.stream_id)]
    end = items[-1]
    assert isinstance(end, StreamEnd)
    assert end.state == "COMPLETED"
    assert "".join(i.text for i in items if isinstance(i, Chunk)) == "through a real process"
    assert not (tmp_path / "unused.db").exists()  # it really ran on PostgreSQL
