"""The engine under faults: races with shutdown and cancel, a failing or lying store,
misbehaving token sources. Each test pins a failure that once left a stream unended."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from tests.sources import ScriptedSource
from tests.unit.test_engine import SETTINGS, TOKENS, collect, wait_for_head
from tokenstream.server import errors
from tokenstream.server.domain import EndReason, StreamRecord, StreamState
from tokenstream.server.models import GenerationRequest, ModelRegistry, TokenSource
from tokenstream.server.storage.errors import StorageUnavailable
from tokenstream.server.storage.memory import MemoryStreamRepository
from tokenstream.server.storage.repository import CommitResult, WriteBatch
from tokenstream.server.streams import StreamEngine, SubmitCommand


class FaultyRepository(MemoryStreamRepository):
    """A memory store whose commits can fail before or after they land."""

    def __init__(self) -> None:
        super().__init__()
        self.broken: Exception | None = None  # every commit fails with this, unstored
        self.lose_ack_once = False  # the next commit with tokens lands, then raises
        self.create_delay = 0.0  # commits that create streams take this long
        self.attempts = 0

    async def commit(self, batch: WriteBatch) -> CommitResult:
        self.attempts += 1
        if batch.creations:
            await asyncio.sleep(self.create_delay)
        if self.broken is not None:
            raise self.broken
        result = await super().commit(batch)
        if self.lose_ack_once and batch.runs:
            self.lose_ack_once = False
            raise ConnectionResetError("connection reset after COMMIT")
        return result


def engine_for(repo: MemoryStreamRepository, *sources: tuple[str, TokenSource]) -> StreamEngine:
    registry = ModelRegistry(dict(sources) or {"scripted": ScriptedSource(TOKENS)}, "scripted")
    return StreamEngine(repo, registry, SETTINGS)


@pytest.fixture
def repo() -> FaultyRepository:
    return FaultyRepository()


async def test_cancel_right_after_submit_ends_the_stream(repo: FaultyRepository) -> None:
    engine = engine_for(repo)
    await engine.start()
    sub = await engine.submit(SubmitCommand(prompt="hi"))
    async with asyncio.timeout(2):
        record = await engine.cancel(sub.stream_id)  # before the task ran a single step
    assert (record.state, record.head_seq) == (StreamState.CANCELLED, -1)
    await engine.stop(grace=0)


async def test_prompt_accepted_while_stopping_is_refused_and_ended(
    repo: FaultyRepository,
) -> None:
    engine = engine_for(repo)
    await engine.start()
    repo.create_delay = 0.1  # a slow insert (e.g. waiting on a lock)
    submit = asyncio.create_task(engine.submit(SubmitCommand(prompt="hi", request_id="r-9")))
    await asyncio.sleep(0.02)
    async with asyncio.timeout(2):
        await engine.stop(grace=0)
    with pytest.raises(errors.Unavailable):
        await submit
    record = await repo.find_by_request_id("r-9")
    assert record is not None
    assert (record.state, record.reason) == (StreamState.FAILED, EndReason.SHUTDOWN)
    async with asyncio.timeout(2):
        await engine.stop(grace=0)  # a second stop does not hang either


async def test_commit_that_landed_but_failed_is_not_written_twice(
    repo: FaultyRepository,
) -> None:
    source = ScriptedSource(TOKENS, gated=True)
    engine = engine_for(repo, ("scripted", source))
    await engine.start()
    sub = await engine.submit(SubmitCommand(prompt="hi"))
    repo.lose_ack_once = True
    source.release(3)
    await wait_for_head(engine, sub.stream_id, 2)
    source.release(len(TOKENS))
    async with asyncio.timeout(5):
        chunks, end = await collect(await engine.subscribe(sub.stream_id, 0))
    assert "".join(c.text for c in chunks) == "".join(TOKENS)
    assert end.state is StreamState.COMPLETED
    await engine.stop(grace=0)


async def test_submit_during_an_outage_is_unavailable(repo: FaultyRepository) -> None:
    engine = engine_for(repo)
    await engine.start()
    repo.broken = StorageUnavailable("database restarting")
    with pytest.raises(errors.Unavailable):
        await engine.submit(SubmitCommand(prompt="hi", request_id="retry-me"))
    repo.broken = None
    sub = await engine.submit(SubmitCommand(prompt="hi", request_id="retry-me"))  # the retry
    _, end = await collect(await engine.subscribe(sub.stream_id, 0))
    assert end.state is StreamState.COMPLETED
    await engine.stop(grace=0)


async def test_outage_delays_tokens_but_loses_none(repo: FaultyRepository) -> None:
    source = ScriptedSource(TOKENS, gated=True)
    engine = engine_for(repo, ("scripted", source))
    await engine.start()
    sub = await engine.submit(SubmitCommand(prompt="hi"))
    repo.broken = StorageUnavailable("database restarting")
    source.release(len(TOKENS))
    reader = asyncio.create_task(collect(await engine.subscribe(sub.stream_id, 0)))
    while repo.attempts < 3:  # noqa: ASYNC110  # the store offers no event to wait on
        await asyncio.sleep(0.01)
    assert not reader.done()  # nothing is delivered while nothing is stored
    repo.broken = None
    async with asyncio.timeout(5):
        chunks, end = await reader
    assert "".join(c.text for c in chunks) == "".join(TOKENS)
    assert end.state is StreamState.COMPLETED
    await engine.stop(grace=0)


class PoisonSource:
    async def generate(self, request: GenerationRequest) -> AsyncIterator[str]:
        yield " fine"
        yield " bad\ud800"


async def test_unstorable_model_output_fails_only_that_stream(repo: FaultyRepository) -> None:
    engine = engine_for(repo, ("scripted", ScriptedSource(TOKENS)), ("poison", PoisonSource()))
    await engine.start()
    bad = await engine.submit(SubmitCommand(prompt="hi", model="poison"))
    good = await engine.submit(SubmitCommand(prompt="hi"))
    async with asyncio.timeout(5):
        bad_chunks, bad_end = await collect(await engine.subscribe(bad.stream_id, 0))
        good_chunks, good_end = await collect(await engine.subscribe(good.stream_id, 0))
    assert ([c.text for c in bad_chunks], bad_end.state) == ([" fine"], StreamState.FAILED)
    assert bad_end.reason == EndReason.MODEL_ERROR
    assert "".join(c.text for c in good_chunks) == "".join(TOKENS)
    assert good_end.state is StreamState.COMPLETED
    await engine.stop(grace=0)


async def test_store_refusing_one_stream_does_not_stall_the_others(
    repo: FaultyRepository,
) -> None:
    source = ScriptedSource(TOKENS, gated=True)
    engine = engine_for(repo, ("scripted", source))
    await engine.start()
    doomed = await engine.submit(SubmitCommand(prompt="doomed"))
    healthy = await engine.submit(SubmitCommand(prompt="healthy", model="scripted"))
    original = repo.commit

    async def refuse_doomed(batch: WriteBatch) -> CommitResult:
        if any(sid == doomed.stream_id for sid, _ in batch.runs):
            raise ValueError("value too long for this column")
        return await original(batch)

    repo.commit = refuse_doomed  # type: ignore[method-assign]
    source.release(len(TOKENS) * 2)
    async with asyncio.timeout(10):
        chunks, end = await collect(await engine.subscribe(healthy.stream_id, 0))
        _, doomed_end = await collect(await engine.subscribe(doomed.stream_id, 0))
    assert "".join(c.text for c in chunks) == "".join(TOKENS)
    assert end.state is StreamState.COMPLETED
    assert (doomed_end.state, doomed_end.reason) == (StreamState.FAILED, "storage_error")
    await engine.stop(grace=0)


async def test_stop_finishes_even_when_the_store_is_down(repo: FaultyRepository) -> None:
    source = ScriptedSource(TOKENS, gated=True)
    engine = engine_for(repo, ("scripted", source))
    await engine.start()
    sub = await engine.submit(SubmitCommand(prompt="hi"))
    source.release(3)
    await wait_for_head(engine, sub.stream_id, 2)
    reader = asyncio.create_task(collect(await engine.subscribe(sub.stream_id, 0)))
    repo.broken = OSError("disk full")
    async with asyncio.timeout(5):
        await engine.stop(grace=0.3)
        chunks, end = await reader
    # Subscribers are released, with what was durable; nothing undurable was delivered.
    assert "".join(c.text for c in chunks) == "".join(TOKENS[:3])
    assert end.state is StreamState.FAILED


class SelfCancellingSource:
    async def generate(self, request: GenerationRequest) -> AsyncIterator[str]:
        yield " one"
        raise asyncio.CancelledError  # e.g. an HTTP library's internal timeout leaking out


async def test_source_raising_cancelled_error_fails_the_stream(repo: FaultyRepository) -> None:
    engine = engine_for(repo, ("scripted", SelfCancellingSource()))
    await engine.start()
    sub = await engine.submit(SubmitCommand(prompt="hi"))
    async with asyncio.timeout(2):
        chunks, end = await collect(await engine.subscribe(sub.stream_id, 0))
    assert [c.text for c in chunks] == [" one"]
    assert (end.state, end.reason) == (StreamState.FAILED, EndReason.MODEL_ERROR)
    await engine.stop(grace=0)


async def test_max_tokens_does_not_wait_for_an_extra_token(repo: FaultyRepository) -> None:
    source = ScriptedSource(TOKENS, gated=True)
    engine = engine_for(repo, ("scripted", source))
    await engine.start()
    sub = await engine.submit(SubmitCommand(prompt="hi", max_tokens=2))
    source.release(2)  # exactly max_tokens; the source is never asked for a third
    async with asyncio.timeout(2):
        chunks, end = await collect(await engine.subscribe(sub.stream_id, 0))
    assert "".join(c.text for c in chunks) == "".join(TOKENS[:2])
    assert (end.state, end.final_seq) == (StreamState.COMPLETED, 1)
    assert source.produced == 2
    await engine.stop(grace=0)


async def test_storage_outage_on_reads_is_unavailable(repo: FaultyRepository) -> None:
    engine = engine_for(repo)
    await engine.start()

    async def down(stream_id: str) -> StreamRecord:
        raise StorageUnavailable("connection refused")

    repo.get_stream = down  # type: ignore[method-assign]
    with pytest.raises(errors.Unavailable):
        await engine.get_stream("strm_" + "a" * 26)
    await engine.stop(grace=0)


class CountingRepository(MemoryStreamRepository):
    def __init__(self) -> None:
        super().__init__()
        self.batch_sizes: list[int] = []

    async def commit(self, batch: WriteBatch) -> CommitResult:
        self.batch_sizes.append(sum(len(run.ends) for _, run in batch.runs))
        return await super().commit(batch)


async def test_commits_are_bounded_by_max_batch_tokens() -> None:
    repo = CountingRepository()
    many = [f" m{i}" for i in range(500)]
    settings = replace(SETTINGS, max_batch_tokens=64, flush_interval=0.02)
    engine = StreamEngine(repo, ModelRegistry({"s": ScriptedSource(many)}, "s"), settings)
    await engine.start()
    subs = [await engine.submit(SubmitCommand(prompt=f"p{i}", max_tokens=500)) for i in range(3)]
    for sub in subs:
        chunks, end = await collect(await engine.subscribe(sub.stream_id, 0))
        assert "".join(c.text for c in chunks) == "".join(many)
        assert end.final_seq == 499
    assert max(repo.batch_sizes) == 64  # split, never larger
    assert sum(repo.batch_sizes) == 1500
    await engine.stop(grace=0)
