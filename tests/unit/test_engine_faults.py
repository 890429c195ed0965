"""The engine under faults: races with shutdown and cancel, a failing or lying store,
misbehaving token sources. Each test pins a failure that once left a stream unended."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from tests.sources import ScriptedSource
from tests.unit.test_engine import SETTINGS, TOKENS, collect, wait_for_head
from tokenstream.server import errors
from tokenstream.server.domain import Chunk, Ending, EndReason, StreamRecord, StreamState, TokenRun
from tokenstream.server.models import GenerationRequest, ModelRegistry, TokenSource
from tokenstream.server.storage.errors import StorageUnavailable
from tokenstream.server.storage.memory import MemoryStreamRepository
from tokenstream.server.storage.repository import CommitResult, NewStream, WriteBatch
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
    engine = engine_for(repo, ("scripted", ScriptedSource(TOKENS, gated=True)))
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
    (record,) = [s.record for s in repo._streams.values()]
    assert (record.state, record.reason) == (StreamState.FAILED, EndReason.SHUTDOWN)
    # The request id was let go: the client's retry elsewhere starts the prompt afresh.
    assert await repo.find_by_request_id("r-9") is None
    async with asyncio.timeout(2):
        await engine.stop(grace=0)  # a second stop does not hang either
    repo.create_delay = 0
    restarted = engine_for(repo)
    await restarted.start()
    retried = await restarted.submit(SubmitCommand(prompt="hi", request_id="r-9"))
    assert retried.created
    assert retried.stream_id != record.stream_id
    await restarted.stop(grace=0)


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


def refuse_tokens_of(repo: FaultyRepository, refused: str) -> None:
    """From now on the store refuses every batch with tokens of `refused` (not an outage)."""
    original = repo.commit

    async def refuse(batch: WriteBatch) -> CommitResult:
        if any(stream_id == refused for stream_id, _ in batch.runs):
            raise ValueError("value too long for this column")
        return await original(batch)

    repo.commit = refuse  # type: ignore[method-assign]


async def test_store_refusing_one_stream_does_not_stall_the_others(
    repo: FaultyRepository,
) -> None:
    source = ScriptedSource(TOKENS, gated=True)
    engine = engine_for(repo, ("scripted", source))
    await engine.start()
    doomed = await engine.submit(SubmitCommand(prompt="doomed"))
    healthy = await engine.submit(SubmitCommand(prompt="healthy", model="scripted"))
    refuse_tokens_of(repo, doomed.stream_id)
    source.release(len(TOKENS) * 2)
    async with asyncio.timeout(10):
        chunks, end = await collect(await engine.subscribe(healthy.stream_id, 0))
        _, doomed_end = await collect(await engine.subscribe(doomed.stream_id, 0))
    assert "".join(c.text for c in chunks) == "".join(TOKENS)
    assert end.state is StreamState.COMPLETED
    assert (doomed_end.state, doomed_end.reason) == (StreamState.FAILED, "storage_error")
    await engine.stop(grace=0)


async def test_a_refused_stream_fails_even_when_its_ending_was_put_off(
    repo: FaultyRepository,
) -> None:
    """The doomed stream's ending waits for a later commit (one ending per commit) while the
    batch with its tokens is refused: it must end `storage_error`, not COMPLETED."""
    source = ScriptedSource(TOKENS, gated=True)
    settings = replace(SETTINGS, max_batch_endings=1, flush_interval=0.05)
    engine = StreamEngine(repo, ModelRegistry({"scripted": source}, "scripted"), settings)
    await engine.start()
    healthy = await engine.submit(SubmitCommand(prompt="healthy"))
    doomed = await engine.submit(SubmitCommand(prompt="doomed"))
    refuse_tokens_of(repo, doomed.stream_id)
    source.release(len(TOKENS) * 2)  # both end within one flush interval
    async with asyncio.timeout(10):
        _, end = await collect(await engine.subscribe(healthy.stream_id, 0))
        _, doomed_end = await collect(await engine.subscribe(doomed.stream_id, 0))
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
        self.batch_endings: list[int] = []
        self.ended_with_response: list[bool] = []

    async def commit(self, batch: WriteBatch) -> CommitResult:
        self.batch_sizes.append(sum(len(run.ends) for _, run in batch.runs))
        self.batch_endings.append(len(batch.endings))
        self.ended_with_response.extend(s in batch.responses for s, _ in batch.endings)
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


async def test_commits_end_at_most_max_batch_endings_streams() -> None:
    """Streams ending at once are ended a few per commit; their tokens do not wait, and
    each ending still carries the whole response from memory (no read-back)."""
    repo = CountingRepository()
    settings = replace(SETTINGS, max_batch_endings=2, flush_interval=0.05)
    source = ScriptedSource(TOKENS, gated=True)
    engine = StreamEngine(repo, ModelRegistry({"s": source}, "s"), settings)
    await engine.start()
    subs = [await engine.submit(SubmitCommand(prompt=f"p{i}")) for i in range(6)]
    source.release(len(TOKENS) * len(subs))  # every stream ends within one flush interval
    for sub in subs:
        chunks, end = await collect(await engine.subscribe(sub.stream_id, 0))
        assert "".join(c.text for c in chunks) == "".join(TOKENS)
        assert (end.state, end.final_seq) == (StreamState.COMPLETED, len(TOKENS) - 1)
    assert max(repo.batch_endings) == 2
    assert sum(repo.batch_endings) == 6
    assert all(repo.ended_with_response)
    await engine.stop(grace=0)


async def test_concurrent_submits_cannot_exceed_the_generation_limits(
    repo: FaultyRepository,
) -> None:
    settings = replace(SETTINGS, max_generations=5, max_generations_per_caller=3)
    engine = StreamEngine(
        repo, ModelRegistry({"s": ScriptedSource(TOKENS, gated=True)}, "s"), settings
    )
    await engine.start()
    repo.create_delay = 0.05  # creations queue up in one group commit
    outcomes = await asyncio.gather(
        *(engine.submit(SubmitCommand(prompt=f"p{i}", caller=f"c{i % 2}")) for i in range(20)),
        return_exceptions=True,
    )
    accepted = [o for o in outcomes if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, errors.ResourceExhausted)]
    assert (len(accepted), len(refused)) == (5, 15)
    assert engine._generations.count() == 5
    assert engine._generations.count("c0") <= 3
    await engine.stop(grace=0)


async def test_a_caller_that_goes_away_still_gets_its_stream_on_retry(
    repo: FaultyRepository,
) -> None:
    source = ScriptedSource(TOKENS)
    engine = engine_for(repo, ("scripted", source))
    await engine.start()
    repo.create_delay = 0.1
    first = asyncio.create_task(engine.submit(SubmitCommand(prompt="hi", request_id="gone-1")))
    await asyncio.sleep(0.02)
    first.cancel()  # the client's deadline passed while the stream was being created
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.sleep(0.2)
    retry = await engine.submit(SubmitCommand(prompt="hi", request_id="gone-1"))
    assert not retry.created  # the same stream, and it is being generated
    _, end = await collect(await engine.subscribe(retry.stream_id, 0))
    assert (end.state, end.final_seq) == (StreamState.COMPLETED, len(TOKENS) - 1)
    await engine.stop(grace=0)


async def test_own_stream_that_is_not_generated_is_swept(repo: FaultyRepository) -> None:
    settings = replace(SETTINGS, lease_ttl=0.15)
    engine = StreamEngine(
        repo, ModelRegistry({"s": ScriptedSource(TOKENS)}, "s"), settings, sole_writer=False
    )
    await engine.start()
    now = datetime.now(UTC)
    orphan = "strm_" + "r" * 26  # e.g. created, then its start was lost
    await repo.create_stream(
        NewStream(
            orphan, "conv_" + "r" * 26, True, "p", "s", 9, None, None, now,
            owner_id=engine._leases.owner_id, lease_expires_at=now + timedelta(seconds=0.15),
        )
    )  # fmt: skip
    async with asyncio.timeout(3):
        _, end = await collect(await engine.subscribe(orphan, 0))
    assert (end.state, end.reason) == (StreamState.FAILED, EndReason.INTERRUPTED)
    await engine.stop(grace=0)


async def test_stream_ended_in_the_store_interrupts_its_waiting_model(
    repo: FaultyRepository,
) -> None:
    source = ScriptedSource(TOKENS, gated=True)
    engine = engine_for(repo, ("scripted", source))
    await engine.start()
    sub = await engine.submit(SubmitCommand(prompt="hi"))
    source.release(1)
    await wait_for_head(engine, sub.stream_id, 0)
    # Another server cancels it through the store; the next token is refused.
    await repo.commit(
        WriteBatch(datetime.now(UTC), endings=[(sub.stream_id, Ending(StreamState.CANCELLED))])
    )
    source.release(1)
    async with asyncio.timeout(2):
        _, end = await collect(await engine.subscribe(sub.stream_id, 0))
        await asyncio.wait_for(source.closed.wait(), 1)  # the model call was let go
        await engine.stop(grace=0.2)
    assert (end.state, end.final_seq) == (StreamState.CANCELLED, 0)


async def test_following_a_stream_generated_elsewhere_polls_gently(
    repo: FaultyRepository,
) -> None:
    settings = replace(SETTINGS, store_poll_interval=0.05)
    engine = StreamEngine(
        repo, ModelRegistry({"s": ScriptedSource(TOKENS)}, "s"), settings, sole_writer=False
    )
    await engine.start()
    now = datetime.now(UTC)
    remote = "strm_" + "e" * 26
    await repo.create_stream(
        NewStream(
            remote, "conv_" + "e" * 26, True, "p", "s", 9, None, None, now,
            owner_id="srv_other", lease_expires_at=now + timedelta(hours=1),
        )
    )  # fmt: skip
    reads = 0
    original = repo.get_stream

    async def counting(stream_id: str) -> StreamRecord:
        nonlocal reads
        reads += 1
        return await original(stream_id)

    repo.get_stream = counting  # type: ignore[method-assign]
    events = await engine.subscribe(remote, 0)
    seq = 0
    for _ in range(10):  # the other server commits a run every 50 ms
        await repo.commit(
            WriteBatch(datetime.now(UTC), runs=[(remote, TokenRun.from_tokens(seq, ["x", "y"]))])
        )
        seq += 2
        chunk = await asyncio.wait_for(anext(events), 1)
        assert isinstance(chunk, Chunk)
        await asyncio.sleep(0.05)
    await events.aclose()
    assert reads <= 40  # ~1 per poll interval, not a busy loop
    await engine.stop(grace=0)


async def test_a_slow_store_is_not_mistaken_for_a_stalled_model(repo: FaultyRepository) -> None:
    many = [f" s{i}" for i in range(60)]
    settings = replace(SETTINGS, stall_timeout=0.2, max_pending_tokens=5)
    engine = StreamEngine(repo, ModelRegistry({"s": ScriptedSource(many)}, "s"), settings)
    await engine.start()
    original = repo.commit

    async def slow(batch: WriteBatch) -> CommitResult:
        await asyncio.sleep(0.3)  # longer than the stall timeout, every commit
        return await original(batch)

    sub = await engine.submit(SubmitCommand(prompt="hi", max_tokens=20))
    repo.commit = slow  # type: ignore[method-assign]
    async with asyncio.timeout(10):
        chunks, end = await collect(await engine.subscribe(sub.stream_id, 0))
    assert end.state is StreamState.COMPLETED
    assert "".join(c.text for c in chunks) == "".join(many[:20])
    await engine.stop(grace=0)


async def test_submit_after_stop_is_refused_at_once(repo: FaultyRepository) -> None:
    engine = engine_for(repo)
    await engine.start()
    await engine.stop(grace=0)
    async with asyncio.timeout(1):
        with pytest.raises(errors.Unavailable):
            await engine.submit(SubmitCommand(prompt="late", request_id="late-1"))
