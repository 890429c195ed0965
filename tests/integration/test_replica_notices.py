"""Stream engines of several servers on one PostgreSQL database, woken by change notices.

Readers here poll the store only once a minute, so anything that arrives within seconds
came through a notice.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tests.sources import ScriptedSource
from tokenstream.server.domain import Chunk, StreamState
from tokenstream.server.models import ModelRegistry
from tokenstream.server.storage.sql import SqlStreamRepository, create_engine, upgrade_to_head
from tokenstream.server.streams import End, EngineSettings, StreamEngine, SubmitCommand
from tokenstream.server.streams.events import EventBatch, StreamTokens

SLOW_POLL = EngineSettings(flush_interval=0.002, store_poll_interval=60, heartbeat_interval=60)
WAIT = 5.0  # seconds: far below the poll interval

StartReplica = Callable[[ScriptedSource], Awaitable[StreamEngine]]


@pytest.fixture
async def start_replica(postgres_url: str) -> AsyncIterator[StartReplica]:
    migrated = False
    started: list[tuple[StreamEngine, SqlStreamRepository]] = []

    async def start(source: ScriptedSource) -> StreamEngine:
        nonlocal migrated
        db = create_engine(postgres_url)
        if not migrated:
            await upgrade_to_head(db)
            migrated = True
        repository = SqlStreamRepository(db)
        engine = StreamEngine(
            repository,
            ModelRegistry({"scripted": source}, "scripted"),
            SLOW_POLL,
            sole_writer=False,
        )
        await engine.start()
        started.append((engine, repository))
        return engine

    yield start
    for engine, repository in started:
        await engine.stop(grace=0)
        await repository.close()


async def test_tokens_generated_on_a_reach_a_subscriber_on_b_one_by_one(
    start_replica: StartReplica,
) -> None:
    source = ScriptedSource([f" w{i}" for i in range(8)], gated=True)
    on_a = await start_replica(source)
    on_b = await start_replica(ScriptedSource([]))
    submitted = await on_a.submit(SubmitCommand(prompt="across"))
    events = aiter(await on_b.subscribe(submitted.stream_id, 0))
    loop = asyncio.get_running_loop()
    latencies = []
    for seq in range(8):
        released = loop.time()
        source.release()
        async with asyncio.timeout(WAIT):
            chunk = await anext(events)
        latencies.append(loop.time() - released)
        # One token per release: each came live, not in a catch-up at the end.
        assert isinstance(chunk, Chunk)
        assert (chunk.start_seq, chunk.end_seq, chunk.text) == (seq, seq, f" w{seq}")
    async with asyncio.timeout(WAIT):
        end = await anext(events)
    assert isinstance(end, End)
    assert end.state is StreamState.COMPLETED
    print(
        f"\nmodel token on A -> subscriber on B: median {statistics.median(latencies) * 1000:.1f}"
        f" ms, max {max(latencies) * 1000:.1f} ms"
    )


async def test_a_cancel_on_c_interrupts_a_generation_waiting_on_its_model(
    start_replica: StartReplica,
) -> None:
    source = ScriptedSource([f" c{i}" for i in range(10)], gated=True)
    on_a = await start_replica(source)
    on_b = await start_replica(ScriptedSource([]))
    on_c = await start_replica(ScriptedSource([]))
    submitted = await on_a.submit(SubmitCommand(prompt="stop me"))
    source.release(3)
    events = aiter(await on_b.subscribe(submitted.stream_id, 0))
    seen = -1
    async with asyncio.timeout(WAIT):
        while seen < 2:
            chunk = await anext(events)
            assert isinstance(chunk, Chunk)
            seen = chunk.end_seq
    loop = asyncio.get_running_loop()
    asked = loop.time()
    record = await on_c.cancel(submitted.stream_id)
    assert (record.state, record.head_seq) == (StreamState.CANCELLED, 2)
    # A's generation waits on its model for token 3, which never comes, and no commit of
    # A's is due: only the notice can stop it.
    async with asyncio.timeout(WAIT):
        await source.closed.wait()
    stopped = loop.time() - asked
    assert source.produced == 3
    async with asyncio.timeout(WAIT):
        end = await anext(events)
    assert isinstance(end, End)
    assert (end.state, end.final_seq) == (StreamState.CANCELLED, 2)
    on_a_view = await on_a.get_stream(submitted.stream_id)
    assert on_a_view.state is StreamState.CANCELLED
    print(f"\ncancel on C -> generation on A stopped: {stopped * 1000:.1f} ms")


async def test_a_watch_on_b_follows_a_conversation_generated_on_a(
    start_replica: StartReplica,
) -> None:
    source = ScriptedSource([" one", " two", " three"], gated=True)
    on_a = await start_replica(source)
    on_b = await start_replica(ScriptedSource([]))
    conversation = await on_a.create_conversation(None)
    watch = aiter(await on_b.watch(conversation.conversation_id, 0, None, include_tokens=True))
    submitted = await on_a.submit(
        SubmitCommand(prompt="watched", conversation_id=conversation.conversation_id)
    )
    kinds: list[str] = []
    words: list[str] = []

    async def read_until(done: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT):
            while not done():
                message = await anext(watch)
                if isinstance(message, EventBatch):
                    kinds.extend(event.kind for event in message.events)
                elif isinstance(message, StreamTokens):
                    assert message.stream_id == submitted.stream_id
                    words.extend(message.chunk.text.split())

    await read_until(lambda: "stream_started" in kinds)
    for count in range(1, 4):  # each token is seen on B before the next is made on A
        source.release()
        await read_until(lambda count=count: len(words) == count)  # type: ignore[misc]
    await read_until(lambda: "stream_ended" in kinds)
    assert kinds == ["prompt_submitted", "stream_started", "stream_ended"]
    assert words == ["one", "two", "three"]
