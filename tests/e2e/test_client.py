"""The Python client against a real server."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from tests.conftest import RunningServer
from tokenstream.client import (
    Reconnect,
    RetriesExhausted,
    RetryPolicy,
    StreamEnd,
    TokenStreamClient,
    TokenStreamClientError,
    TokenStreamSyncClient,
)
from tokenstream.server import ServerConfig, create_server
from tokenstream.server.models.synthetic import synthetic_tokens


async def test_submit_stream_cancel_and_history(paced_server: RunningServer) -> None:
    async with TokenStreamClient(paced_server.target) as client:
        done = await client.submit("short", max_tokens=30)
        items = [item async for item in client.stream(done.stream_id)]
        end = items[-1]
        assert isinstance(end, StreamEnd)
        assert (end.state, end.final_seq) == ("COMPLETED", 29)
        text = "".join(item.text for item in items[:-1] if not isinstance(item, StreamEnd))
        assert text == "".join(synthetic_tokens("short", 30))

        long = await client.submit("long", conversation_id=done.conversation_id, max_tokens=10_000)
        cancelled = await client.cancel(long.stream_id)
        assert cancelled.state == "CANCELLED"

        turns = [turn async for turn in client.history(done.conversation_id, page_size=1)]
        assert [(t.prompt, t.state) for t in turns] == [
            ("short", "COMPLETED"),
            ("long", "CANCELLED"),
        ]
        assert turns[0].response == text
        info = await client.get_stream(long.stream_id)
        assert (info.conversation_id, info.turn.head_seq) == (
            done.conversation_id,
            cancelled.final_seq,
        )


async def test_resume_from_the_middle(server: RunningServer) -> None:
    async with TokenStreamClient(server.target) as client:
        done = await client.submit("middle", max_tokens=50)
        items = [item async for item in client.stream(done.stream_id, from_seq=20)]
        text = "".join(item.text for item in items if not isinstance(item, StreamEnd))
        assert text == "".join(synthetic_tokens("middle", 50)[20:])


async def test_errors_carry_code_and_reason(server: RunningServer) -> None:
    async with TokenStreamClient(server.target) as client:
        with pytest.raises(TokenStreamClientError) as info:
            await client.submit("hi", model="no-such-model")
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.reason == "UNKNOWN_MODEL"
        assert info.value.metadata["available_models"] == "clock,echo,synthetic"
        with pytest.raises(TokenStreamClientError) as info:
            async for _ in client.stream("strm_" + "z" * 26):
                pass
        assert (info.value.code, info.value.reason) == (
            grpc.StatusCode.NOT_FOUND,
            "STREAM_NOT_FOUND",
        )


async def test_retry_budget_ends_with_a_clear_error() -> None:
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02)
    reconnects: list[Reconnect] = []
    async with TokenStreamClient(
        "127.0.0.1:1", retry=policy, timeout=1.0, on_reconnect=reconnects.append
    ) as client:
        with pytest.raises(RetriesExhausted) as info:
            async for _ in client.stream("strm_" + "z" * 26):
                pass
    assert info.value.attempts == 3
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert "gave up after 3 attempts" in str(info.value)
    assert [r.attempt for r in reconnects] == [1, 2]


def test_sync_client_for_scripts(tmp_path: Path) -> None:
    async def serve_and_use() -> None:
        config = ServerConfig(port=0, database_url=f"sqlite+aiosqlite:///{tmp_path / 's.db'}")
        server, port = await create_server(replace(config, token_rate=0))
        await server.start()
        try:
            await asyncio.to_thread(use_sync, f"127.0.0.1:{port}")
        finally:
            await server.stop()

    def use_sync(target: str) -> None:
        with TokenStreamSyncClient(target) as client:
            submitted = client.submit("sync works", model="echo")
            items = list(client.stream(submitted.stream_id))
            assert "".join(i.text for i in items if not isinstance(i, StreamEnd)) == "sync works"
            assert [t.prompt for t in client.history(submitted.conversation_id)] == ["sync works"]

    asyncio.run(serve_and_use())


async def test_history_pages_larger_than_grpc_default_limit(server: RunningServer) -> None:
    big = "x" * 60_000  # one token; prompt and response are both 60 KB
    async with TokenStreamClient(server.target) as client:
        first = await client.submit(big, model="echo")
        for _ in range(39):
            await client.submit(big, model="echo", conversation_id=first.conversation_id)
        async for _ in client.stream(first.stream_id):
            pass
        turns = [turn async for turn in client.history(first.conversation_id)]
    assert len(turns) == 40  # one page of ~4.8 MB: more than gRPC's default 4 MB
