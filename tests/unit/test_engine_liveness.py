"""Liveness, memory bounds, limits and retention of the engine (in-memory store, no gRPC)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from tests.sources import ScriptedSource
from tests.unit.test_engine import SETTINGS, TOKENS, collect, wait_for_head
from tokenstream.server import errors
from tokenstream.server.domain import Chunk, EndReason, StreamState
from tokenstream.server.models import ModelRegistry, TokenSource
from tokenstream.server.storage.memory import MemoryStreamRepository
from tokenstream.server.storage.repository import NewStream
from tokenstream.server.streams import EngineSettings, StreamEngine, SubmitCommand

MANY = [f" w{i}" for i in range(300)]


@pytest.fixture
def repo() -> MemoryStreamRepository:
    return MemoryStreamRepository()


@pytest.fixture
async def engines() -> AsyncIterator[list[StreamEngine]]:
    made: list[StreamEngine] = []
    yield made
    for engine in made:
        await engine.stop(grace=0)


async def started(
    engines: list[StreamEngine],
    repo: MemoryStreamRepository,
    source: TokenSource,
    settings: EngineSettings = SETTINGS,
    *,
    sole_writer: bool = True,
) -> StreamEngine:
    sources = {"scripted": source, "fast": ScriptedSource(TOKENS)}
    engine = StreamEngine(
        repo, ModelRegistry(sources, "scripted"), settings, sole_writer=sole_writer
    )
    engines.append(engine)
    await engine.start()
    return engine


async def test_stalled_model_ends_failed_timeout_keeping_its_tokens(
    repo: MemoryStreamRepository, engines: list[StreamEngine]
) -> None:
    source = ScriptedSource(TOKENS, gated=True)
    engine = await started(engines, repo, source, replace(SETTINGS, stall_timeout=0.2))
    sub = await engine.submit(SubmitCommand(prompt="hi"))
    source.release(3)  # then the model goes quiet
    async with asyncio.timeout(3):
        chunks, end = await collect(await engine.subscribe(sub.stream_id, 0))
    assert "".join(c.text for c in chunks) == "".join(TOKENS[:3])
    assert (end.state, end.reason, end.final_seq) == (StreamState.FAILED, EndReason.TIMEOUT, 2)
    assert "0.2 s" in end.error
    await asyncio.wait_for(source.closed.wait(), 1)  # the source was told to stop


async def test_steady_model_is_not_timed_out(
    repo: MemoryStreamRepository, engines: list[StreamEngine]
) -> None:
    source = ScriptedSource(TOKENS[:10], gated=True)
    engine = await started(engines, repo, source, replace(SETTINGS, stall_timeout=0.15))
    sub = await engine.submit(SubmitCommand(prompt="hi"))
    for _ in range(10):  # 10 x 0.05 s is well past the timeout in total, never per token
        source.release()
        await asyncio.sleep(0.05)
    _, end = await collect(await engine.subscribe(sub.stream_id, 0))
    assert end.state is StreamState.COMPLETED


async def test_expired_lease_of_another_server_ends_the_stream(
    repo: MemoryStreamRepository, engines: list[StreamEngine]
) -> None:
    now = datetime.now(UTC)
    orphan = "strm_" + "o" * 26
    await repo.create_stream(
        NewStream(
            orphan, "conv_" + "o" * 26, True, "p", "scripted", 9, None, None, now,
            owner_id="srv_dead", lease_expires_at=now + timedelta(seconds=0.2),
        )
    )  # fmt: skip
    engine = await started(
        engines,
        repo,
        ScriptedSource(TOKENS),
        replace(SETTINGS, lease_ttl=0.15, heartbeat_interval=0.05, store_poll_interval=0.02),
        sole_writer=False,  # another replica might own it: only its lease tells
    )
    assert (await engine.get_stream(orphan)).state is StreamState.RUNNING  # lease still valid
    async with asyncio.timeout(3):
        chunks, end = await collect(await engine.subscribe(orphan, 0))
    assert chunks == []
    assert (end.state, end.reason) == (StreamState.FAILED, EndReason.INTERRUPTED)


async def test_own_leases_are_renewed_while_generating(
    repo: MemoryStreamRepository, engines: list[StreamEngine]
) -> None:
    source = ScriptedSource(TOKENS, gated=True)
    engine = await started(
        engines, repo, source, replace(SETTINGS, lease_ttl=0.15), sole_writer=False
    )
    sub = await engine.submit(SubmitCommand(prompt="hi"))
    await asyncio.sleep(0.6)  # four lease lifetimes
    assert (await engine.get_stream(sub.stream_id)).state is StreamState.RUNNING
    source.release(len(TOKENS))
    _, end = await collect(await engine.subscribe(sub.stream_id, 0))
    assert end.state is StreamState.COMPLETED


async def test_memory_tail_is_bounded_and_laggards_read_the_store(
    repo: MemoryStreamRepository, engines: list[StreamEngine]
) -> None:
    source = ScriptedSource(MANY, gated=True)
    engine = await started(engines, repo, source, replace(SETTINGS, live_tail_tokens=8))
    sub = await engine.submit(SubmitCommand(prompt="hi", max_tokens=len(MANY)))
    early = await engine.subscribe(sub.stream_id, 0)
    for head in (49, 99, 149):  # three separate commits at least
        source.release(50)
        await wait_for_head(engine, sub.stream_id, head)
    live = engine._generations.live[sub.stream_id]
    assert len(live.tokens) <= 16  # not all 150
    assert live.base_seq > 0
    late = await engine.subscribe(sub.stream_id, 5)  # far behind the tail
    caught_up = await anext(late)
    # Read back from the store as one chunk, though it was committed in many batches.
    assert isinstance(caught_up, Chunk)
    assert (caught_up.start_seq, caught_up.end_seq) == (5, 149)
    source.release(len(MANY))
    early_chunks, _ = await collect(early)
    late_chunks, end = await collect(late)
    assert "".join(c.text for c in early_chunks) == "".join(MANY)
    assert caught_up.text + "".join(c.text for c in late_chunks) == "".join(MANY[5:])
    assert end.final_seq == len(MANY) - 1


async def test_rollup_respects_the_chunk_size_bound(
    repo: MemoryStreamRepository, engines: list[StreamEngine]
) -> None:
    source = ScriptedSource(MANY, gated=True)
    engine = await started(engines, repo, source, replace(SETTINGS, max_chunk_chars=20))
    sub = await engine.submit(SubmitCommand(prompt="hi", max_tokens=len(MANY)))
    source.release(100)
    await wait_for_head(engine, sub.stream_id, 99)
    events = await engine.subscribe(sub.stream_id, 0)
    first = await anext(events)
    assert isinstance(first, Chunk)
    assert first.start_seq == 0
    assert len(first.text) <= 20
    source.release(len(MANY))
    chunks, _ = await collect(events)
    chunks = [first, *chunks]
    assert all(len(c.text) <= 20 or c.start_seq == c.end_seq for c in chunks)
    assert "".join(c.text for c in chunks) == "".join(MANY)


async def test_finished_stream_from_every_seq_is_exact(
    repo: MemoryStreamRepository, engines: list[StreamEngine]
) -> None:
    engine = await started(engines, repo, ScriptedSource(TOKENS), replace(SETTINGS))
    sub = await engine.submit(SubmitCommand(prompt="hi"))
    await collect(await engine.subscribe(sub.stream_id, 0))
    for k in range(len(TOKENS) + 1):
        chunks, end = await collect(await engine.subscribe(sub.stream_id, k))
        assert "".join(c.text for c in chunks) == "".join(TOKENS[k:])
        assert end.final_seq == len(TOKENS) - 1


async def test_generation_limits_are_resource_exhausted(
    repo: MemoryStreamRepository, engines: list[StreamEngine]
) -> None:
    source = ScriptedSource(TOKENS, gated=True)
    settings = replace(SETTINGS, max_generations=3, max_generations_per_caller=2)
    engine = await started(engines, repo, source, settings)
    first = await engine.submit(SubmitCommand(prompt="a", caller="alice"))
    await engine.submit(SubmitCommand(prompt="b", caller="alice"))
    with pytest.raises(errors.ResourceExhausted) as per_caller:
        await engine.submit(SubmitCommand(prompt="c", caller="alice"))
    assert per_caller.value.reason == "TOO_MANY_GENERATIONS_FOR_CALLER"
    await engine.submit(SubmitCommand(prompt="d", caller="bob"))
    with pytest.raises(errors.ResourceExhausted) as total:
        await engine.submit(SubmitCommand(prompt="e", caller="carol"))
    assert total.value.reason == "TOO_MANY_GENERATIONS"
    await engine.cancel(first.stream_id)
    await engine.submit(SubmitCommand(prompt="f", caller="alice"))  # room again


async def test_subscriber_limit_per_stream(
    repo: MemoryStreamRepository, engines: list[StreamEngine]
) -> None:
    source = ScriptedSource(TOKENS, gated=True)
    engine = await started(engines, repo, source, replace(SETTINGS, max_subscribers_per_stream=1))
    sub = await engine.submit(SubmitCommand(prompt="hi"))
    first = await engine.subscribe(sub.stream_id, 0)
    source.release(1)
    assert isinstance(await anext(first), Chunk)
    second = await engine.subscribe(sub.stream_id, 0)
    with pytest.raises(errors.ResourceExhausted) as info:
        await anext(second)
    assert info.value.reason == "TOO_MANY_SUBSCRIBERS"
    await first.aclose()
    third = await engine.subscribe(sub.stream_id, 0)
    assert isinstance(await anext(third), Chunk)  # the slot was given back
    await third.aclose()


async def test_purge_removes_only_old_finished_streams(
    repo: MemoryStreamRepository, engines: list[StreamEngine]
) -> None:
    source = ScriptedSource(TOKENS, gated=True)
    engine = await started(engines, repo, source)
    running = await engine.submit(SubmitCommand(prompt="running"))
    done = await engine.submit(SubmitCommand(prompt="done", model="fast"))
    await collect(await engine.subscribe(done.stream_id, 0))
    kept = await engine.purge(timedelta(days=1))
    assert (kept.streams, kept.conversations) == (0, 0)
    gone = await engine.purge(timedelta(seconds=0))
    assert (gone.streams, gone.conversations) == (1, 1)
    with pytest.raises(errors.NotFound):
        await engine.get_stream(done.stream_id)
    with pytest.raises(errors.NotFound):  # not even from the memory of its recent end
        await collect(await engine.subscribe(done.stream_id, 0))
    assert (await engine.get_stream(running.stream_id)).state is StreamState.RUNNING
