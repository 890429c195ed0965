"""The stream engine with an in-memory repository and scripted token sources (no gRPC)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from tests.sources import ScriptedSource
from tokenstream.server import errors
from tokenstream.server.domain import (
    CancelPolicy,
    Chunk,
    EndReason,
    Role,
    StreamRecord,
    StreamState,
    TokenRun,
)
from tokenstream.server.models import ModelRegistry, SyntheticSource, TokenSource
from tokenstream.server.storage.memory import MemoryStreamRepository
from tokenstream.server.storage.repository import NewStream, WriteBatch
from tokenstream.server.streams import (
    End,
    EngineSettings,
    Heartbeat,
    StreamEngine,
    StreamEvent,
    SubmitCommand,
)
from tokenstream.server.streams.events import EventBatch

TOKENS = [f" t{i}" for i in range(40)]
SETTINGS = EngineSettings(flush_interval=0.001, heartbeat_interval=5.0)

EngineFactory = Callable[..., StreamEngine]


@pytest.fixture
def repo() -> MemoryStreamRepository:
    return MemoryStreamRepository()


@pytest.fixture
async def make_engine(repo: MemoryStreamRepository) -> AsyncIterator[EngineFactory]:
    engines: list[StreamEngine] = []

    def make(
        source: ScriptedSource | None = None, settings: EngineSettings = SETTINGS
    ) -> StreamEngine:
        sources: dict[str, TokenSource] = {
            "scripted": source or ScriptedSource(TOKENS),
            "synthetic": SyntheticSource(0),
        }
        engine = StreamEngine(repo, ModelRegistry(sources, "scripted"), settings)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.stop(grace=0)


async def collect(events: AsyncIterator[StreamEvent]) -> tuple[list[Chunk], End]:
    chunks: list[Chunk] = []
    async for event in events:
        if isinstance(event, Chunk):
            chunks.append(event)
        elif isinstance(event, End):
            return chunks, event
    raise AssertionError("subscription ended without End")


async def wait_for_head(engine: StreamEngine, stream_id: str, seq: int) -> None:
    """Polls the engine's public view until `seq` is durable (it offers no event for it)."""
    async with asyncio.timeout(5):
        while (await engine.get_stream(stream_id)).head_seq < seq:  # noqa: ASYNC110
            await asyncio.sleep(0.005)


def assert_contiguous(chunks: list[Chunk], first: int = 0) -> None:
    seq = first
    for chunk in chunks:
        assert chunk.start_seq == seq
        seq = chunk.end_seq + 1


async def test_subscribe_from_zero_gets_exact_text(make_engine: EngineFactory) -> None:
    engine = make_engine()
    await engine.start()
    sub = await engine.submit(SubmitCommand(prompt="hi"))
    chunks, end = await collect(await engine.subscribe(sub.stream_id, 0))
    assert "".join(c.text for c in chunks) == "".join(TOKENS)
    assert_contiguous(chunks)
    assert end == End(StreamState.COMPLETED, len(TOKENS) - 1)


async def test_tokens_are_durable_before_delivery(
    make_engine: EngineFactory, repo: MemoryStreamRepository
) -> None:
    source = ScriptedSource(TOKENS[:10], gated=True)
    engine = make_engine(source)
    await engine.start()
    sub = await engine.submit(SubmitCommand(prompt="hi"))
    events = await engine.subscribe(sub.stream_id, 0)
    received = 0
    for _ in range(10):
        source.release()
        event = await anext(events)
        assert isinstance(event, Chunk)
        stored = await repo.read_runs(sub.stream_id, 0, 10_000)
        assert max(run.end_seq for run in stored) >= event.end_seq  # committed first
        received = event.end_seq + 1
    assert received == 10


async def test_late_subscriber_gets_missed_tokens_as_one_chunk(make_engine: EngineFactory) -> None:
    source = ScriptedSource(TOKENS, gated=True)
    engine = make_engine(source)
    await engine.start()
    sub = await engine.submit(SubmitCommand(prompt="hi"))
    source.release(25)
    await wait_for_head(engine, sub.stream_id, 24)
    events = await engine.subscribe(sub.stream_id, 3)
    first = await anext(events)
    assert first == Chunk(3, 24, "".join(TOKENS[3:25]))
    source.release(len(TOKENS))
    chunks, end = await collect(events)
    assert "".join(c.text for c in [first, *chunks]) == "".join(TOKENS[3:])
    assert end.state is StreamState.COMPLETED


async def test_resume_after_disconnect_has_no_gap_or_duplicate(make_engine: EngineFactory) -> None:
    source = ScriptedSource(TOKENS, gated=True)
    engine = make_engine(source)
    await engine.start()
    sub = await engine.submit(SubmitCommand(prompt="hi"))
    source.release(7)
    events = await engine.subscribe(sub.stream_id, 0)
    got: list[Chunk] = []
    while not got or got[-1].end_seq < 6:
        event = await anext(events)
        assert isinstance(event, Chunk)
        got.append(event)
    await events.aclose()  # the client drops
    source.release(len(TOKENS))
    rest, end = await collect(await engine.subscribe(sub.stream_id, got[-1].end_seq + 1))
    assert_contiguous(got + rest)
    assert "".join(c.text for c in got + rest) == "".join(TOKENS)
    assert end.final_seq == len(TOKENS) - 1


async def test_two_subscribers_each_get_every_token(make_engine: EngineFactory) -> None:
    source = ScriptedSource(TOKENS, gated=True)
    engine = make_engine(source)
    await engine.start()
    sub = await engine.submit(SubmitCommand(prompt="hi"))
    a = asyncio.create_task(collect(await engine.subscribe(sub.stream_id, 0)))
    b = asyncio.create_task(collect(await engine.subscribe(sub.stream_id, 0)))
    for _ in TOKENS:
        source.release()
        await asyncio.sleep(0.001)
    for chunks, end in await asyncio.gather(a, b):
        assert "".join(c.text for c in chunks) == "".join(TOKENS)
        assert end.state is StreamState.COMPLETED


async def test_cancel_keeps_partial_text_and_ends_every_subscriber(
    make_engine: EngineFactory,
) -> None:
    source = ScriptedSource(TOKENS, gated=True)
    engine = make_engine(source)
    await engine.start()
    sub = await engine.submit(SubmitCommand(prompt="hi"))
    subscribers = [
        asyncio.create_task(collect(await engine.subscribe(sub.stream_id, 0))) for _ in range(2)
    ]
    source.release(5)
    await wait_for_head(engine, sub.stream_id, 4)
    record = await engine.cancel(sub.stream_id)
    assert (record.state, record.head_seq) == (StreamState.CANCELLED, 4)
    await asyncio.wait_for(source.closed.wait(), 1)  # the source was closed, not left running
    source.release(10)  # nothing more is written after the cancel
    for chunks, end in await asyncio.gather(*subscribers):
        assert "".join(c.text for c in chunks) == "".join(TOKENS[:5])
        assert end == End(StreamState.CANCELLED, 4)
    page = await engine.history(sub.conversation_id, 0, "")
    assert page.turns[0].response == "".join(TOKENS[:5])
    assert page.turns[0].stream.state is StreamState.CANCELLED
    again = await engine.cancel(sub.stream_id)  # idempotent
    assert (again.state, again.head_seq) == (StreamState.CANCELLED, 4)


async def test_cancel_of_finished_stream_returns_its_state(make_engine: EngineFactory) -> None:
    engine = make_engine()
    await engine.start()
    sub = await engine.submit(SubmitCommand(prompt="hi"))
    await collect(await engine.subscribe(sub.stream_id, 0))
    record = await engine.cancel(sub.stream_id)
    assert (record.state, record.head_seq) == (StreamState.COMPLETED, len(TOKENS) - 1)


async def test_model_failure_ends_failed_and_keeps_tokens(make_engine: EngineFactory) -> None:
    engine = make_engine(ScriptedSource(TOKENS, fail_after=3))
    await engine.start()
    sub = await engine.submit(SubmitCommand(prompt="hi"))
    chunks, end = await collect(await engine.subscribe(sub.stream_id, 0))
    assert "".join(c.text for c in chunks) == "".join(TOKENS[:3])
    assert (end.state, end.reason, end.final_seq) == (StreamState.FAILED, EndReason.MODEL_ERROR, 2)
    assert "scripted model failure" in end.error


async def test_quiet_stream_gets_heartbeats(make_engine: EngineFactory) -> None:
    source = ScriptedSource(TOKENS, gated=True)
    engine = make_engine(source, replace(SETTINGS, heartbeat_interval=0.05))
    await engine.start()
    sub = await engine.submit(SubmitCommand(prompt="hi"))
    events = await engine.subscribe(sub.stream_id, 0)
    beat = await asyncio.wait_for(anext(events), 1)
    assert isinstance(beat, Heartbeat)
    assert (beat.head_seq, beat.state) == (-1, StreamState.RUNNING)
    source.release(2)
    chunk = await asyncio.wait_for(anext(events), 1)
    assert isinstance(chunk, Chunk)
    beat = await asyncio.wait_for(anext(events), 1)
    assert isinstance(beat, Heartbeat)
    assert beat.head_seq == chunk.end_seq


async def test_failed_commit_is_retried_without_loss(
    make_engine: EngineFactory, repo: MemoryStreamRepository
) -> None:
    source = ScriptedSource(TOKENS, gated=True)
    engine = make_engine(source)
    await engine.start()
    sub = await engine.submit(SubmitCommand(prompt="hi"))
    repo.fail_next_commit = OSError("disk hiccup")
    source.release(len(TOKENS))
    chunks, end = await collect(await engine.subscribe(sub.stream_id, 0))
    assert "".join(c.text for c in chunks) == "".join(TOKENS)
    assert_contiguous(chunks)
    assert end.state is StreamState.COMPLETED


async def test_start_fails_streams_left_running_by_a_crash(
    make_engine: EngineFactory, repo: MemoryStreamRepository
) -> None:
    now = datetime.now(UTC)
    await repo.create_stream(
        NewStream("strm_" + "a" * 26, "conv_" + "a" * 26, True, "p", "scripted", 9, None, None, now)
    )
    await repo.commit(
        WriteBatch(at=now, runs=[("strm_" + "a" * 26, TokenRun.from_tokens(0, ["x", "y"]))])
    )
    engine = make_engine()
    assert await engine.start() == ["strm_" + "a" * 26]
    chunks, end = await collect(await engine.subscribe("strm_" + "a" * 26, 1))
    assert [c.text for c in chunks] == ["y"]
    assert (end.state, end.reason, end.final_seq) == (StreamState.FAILED, "interrupted", 1)


async def test_stop_ends_running_streams_and_refuses_new_prompts(
    make_engine: EngineFactory,
) -> None:
    source = ScriptedSource(TOKENS, gated=True)
    engine = make_engine(source)
    await engine.start()
    sub = await engine.submit(SubmitCommand(prompt="hi"))
    source.release(3)
    await wait_for_head(engine, sub.stream_id, 2)
    subscriber = asyncio.create_task(collect(await engine.subscribe(sub.stream_id, 0)))
    await engine.stop(grace=0)
    chunks, end = await subscriber
    assert "".join(c.text for c in chunks) == "".join(TOKENS[:3])
    assert (end.state, end.reason) == (StreamState.FAILED, EndReason.SHUTDOWN)
    with pytest.raises(errors.Unavailable):
        await engine.submit(SubmitCommand(prompt="late"))
    await engine.stop(grace=0)  # twice is fine


async def test_max_tokens_bounds_the_generation(make_engine: EngineFactory) -> None:
    engine = make_engine()
    await engine.start()
    sub = await engine.submit(SubmitCommand(prompt="hi", max_tokens=5))
    chunks, end = await collect(await engine.subscribe(sub.stream_id, 0))
    assert "".join(c.text for c in chunks) == "".join(TOKENS[:5])
    assert end.final_seq == 4


async def test_request_id_makes_submit_idempotent(
    make_engine: EngineFactory, repo: MemoryStreamRepository
) -> None:
    source = ScriptedSource(TOKENS)
    engine = make_engine(source)
    await engine.start()
    first = await engine.submit(SubmitCommand(prompt="hi", request_id="req-1"))
    again = await engine.submit(SubmitCommand(prompt="hi", request_id="req-1"))
    assert (again.stream_id, again.conversation_id) == (first.stream_id, first.conversation_id)
    assert (first.created, again.created) == (True, False)
    await collect(await engine.subscribe(first.stream_id, 0))
    assert source.produced == len(TOKENS)  # generated once
    with pytest.raises(errors.AlreadyExists) as info:
        await engine.submit(SubmitCommand(prompt="other", request_id="req-1"))
    assert info.value.reason == "REQUEST_ID_REUSED"


async def test_history_pages_through_turns_in_order(make_engine: EngineFactory) -> None:
    engine = make_engine()
    await engine.start()
    first = await engine.submit(SubmitCommand(prompt="p0", model="synthetic", max_tokens=3))
    for i in range(1, 5):
        await engine.submit(
            SubmitCommand(
                prompt=f"p{i}",
                conversation_id=first.conversation_id,
                model="synthetic",
                max_tokens=3,
            )
        )
    prompts: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await engine.history(first.conversation_id, 2, token)
        prompts += [turn.stream.prompt for turn in page.turns]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert prompts == [f"p{i}" for i in range(5)]
    assert pages == 3


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        (SubmitCommand(prompt=""), "EMPTY_PROMPT"),
        (SubmitCommand(prompt="  \n"), "EMPTY_PROMPT"),
        (SubmitCommand(prompt="nul\x00here"), "INVALID_PROMPT"),
        (SubmitCommand(prompt="lone \ud800 surrogate"), "INVALID_PROMPT"),
        (SubmitCommand(prompt="x" * (SETTINGS.max_prompt_bytes + 1)), "PROMPT_TOO_LARGE"),
        (SubmitCommand(prompt="hi", max_tokens=-1), "MAX_TOKENS_OUT_OF_RANGE"),
        (SubmitCommand(prompt="hi", max_tokens=10**9), "MAX_TOKENS_OUT_OF_RANGE"),
        (SubmitCommand(prompt="hi", model="gpt-9"), "UNKNOWN_MODEL"),
        (SubmitCommand(prompt="hi", conversation_id="c1"), "MALFORMED_CONVERSATION_ID"),
        (SubmitCommand(prompt="hi", request_id="has space"), "MALFORMED_REQUEST_ID"),
    ],
)
async def test_bad_submissions_are_invalid_arguments(
    make_engine: EngineFactory, command: SubmitCommand, reason: str
) -> None:
    engine = make_engine()
    await engine.start()
    with pytest.raises(errors.InvalidArgument) as info:
        await engine.submit(command)
    assert info.value.reason == reason


async def test_unknown_model_error_lists_the_models(make_engine: EngineFactory) -> None:
    engine = make_engine()
    await engine.start()
    with pytest.raises(errors.InvalidArgument) as info:
        await engine.submit(SubmitCommand(prompt="hi", model="gpt-9"))
    assert "scripted" in info.value.message
    assert "synthetic" in info.value.message


async def test_unknown_ids_are_not_found(make_engine: EngineFactory) -> None:
    engine = make_engine()
    await engine.start()
    missing_stream, missing_conv = "strm_" + "b" * 26, "conv_" + "b" * 26
    with pytest.raises(errors.NotFound):
        await engine.subscribe(missing_stream, 0)
    with pytest.raises(errors.NotFound):
        await engine.cancel(missing_stream)
    with pytest.raises(errors.NotFound):
        await engine.history(missing_conv, 0, "")
    with pytest.raises(errors.NotFound):
        await engine.submit(SubmitCommand(prompt="hi", conversation_id=missing_conv))


async def test_subscribe_range_checks(make_engine: EngineFactory) -> None:
    engine = make_engine()
    await engine.start()
    sub = await engine.submit(SubmitCommand(prompt="hi", max_tokens=4))
    with pytest.raises(errors.InvalidArgument):
        await engine.subscribe(sub.stream_id, -1)
    await collect(await engine.subscribe(sub.stream_id, 0))
    # Exactly one past the end is "I have everything": only the end comes back.
    chunks, end = await collect(await engine.subscribe(sub.stream_id, 4))
    assert (chunks, end.final_seq) == ([], 3)
    with pytest.raises(errors.OutOfRange):
        await engine.subscribe(sub.stream_id, 5)


async def test_history_rejects_bad_paging(make_engine: EngineFactory) -> None:
    engine = make_engine()
    await engine.start()
    sub = await engine.submit(SubmitCommand(prompt="hi"))
    other = await engine.submit(SubmitCommand(prompt="hi"))
    for size in (-1, SETTINGS.max_page_size + 1):
        with pytest.raises(errors.InvalidArgument):
            await engine.history(sub.conversation_id, size, "")
    with pytest.raises(errors.InvalidArgument):
        await engine.history(sub.conversation_id, 1, "garbage!")
    for i in range(2):
        await engine.submit(SubmitCommand(prompt=f"x{i}", conversation_id=other.conversation_id))
    page = await engine.history(other.conversation_id, 1, "")
    with pytest.raises(errors.InvalidArgument):  # a token of another conversation
        await engine.history(sub.conversation_id, 1, page.next_page_token)


async def test_stop_lets_generations_finish_within_the_grace(make_engine: EngineFactory) -> None:
    source = ScriptedSource(TOKENS, gated=True)
    engine = make_engine(source)
    await engine.start()
    sub = await engine.submit(SubmitCommand(prompt="hi"))
    subscriber = asyncio.create_task(collect(await engine.subscribe(sub.stream_id, 0)))
    stopping = asyncio.create_task(engine.stop(grace=5))
    await asyncio.sleep(0.05)
    with pytest.raises(errors.Unavailable):  # draining: no new prompts
        await engine.submit(SubmitCommand(prompt="late"))
    source.release(len(TOKENS))  # the model finishes during the grace period
    chunks, end = await subscriber
    await stopping
    assert "".join(c.text for c in chunks) == "".join(TOKENS)
    assert end.state is StreamState.COMPLETED


async def test_conversation_events_follow_the_stream(make_engine: EngineFactory) -> None:
    engine = make_engine()
    await engine.start()
    sub = await engine.submit(SubmitCommand(prompt="hi", max_tokens=3))
    watch = await engine.watch(sub.conversation_id, 0, None)
    seen: list[str] = []
    while "stream_ended" not in seen:
        batch = await asyncio.wait_for(anext(watch), 2)
        if isinstance(batch, EventBatch):
            seen += [event.kind for event in batch.events]
    assert seen == ["prompt_submitted", "stream_started", "stream_ended"]
    await watch.aclose()
    with pytest.raises(errors.InvalidArgument):
        await engine.watch(sub.conversation_id, -1, None)
    with pytest.raises(errors.NotFound):
        await engine.watch("conv_" + "n" * 26, 0, None)


@pytest.mark.parametrize(
    ("policy", "may_cancel"),
    [
        # Who, of: the owner, the author (a member), another member, a viewer.
        (CancelPolicy.AUTHOR_OR_OWNER, {"owner": True, "author": True, "other": False}),
        (CancelPolicy.OWNER, {"owner": True, "author": False, "other": False}),
        (CancelPolicy.MEMBER, {"owner": True, "author": True, "other": True}),
    ],
)
async def test_cancel_policy_decides_who_may_cancel(
    make_engine: EngineFactory, policy: CancelPolicy, may_cancel: dict[str, bool]
) -> None:
    engine = make_engine(
        ScriptedSource(TOKENS, gated=True), replace(SETTINGS, cancel_policy=policy)
    )
    await engine.start()
    conversation = await engine.create_conversation("owner")
    for user, role in (("author", Role.MEMBER), ("other", Role.MEMBER), ("viewer", Role.VIEWER)):
        await engine.add_member(conversation.conversation_id, user, role, "owner")
    allowed = {}
    for user in ("viewer", "other", "author", "owner"):  # the owner last: it stops the stream
        sub = await engine.submit(
            SubmitCommand("p", conversation_id=conversation.conversation_id, user="author")
        )
        denied: errors.PermissionDenied | None = None
        try:
            record = await engine.cancel(sub.stream_id, user)
        except errors.PermissionDenied as error:
            denied = error
            record = await engine.cancel(sub.stream_id)  # done with it (no user: no checks)
        assert record.state is StreamState.CANCELLED
        allowed[user] = denied is None
        if denied is not None:
            assert denied.reason == policy.refusal_reason
            assert policy.value in str(denied)
    assert allowed == {"viewer": False, **may_cancel}


def refuse_store_reads(monkeypatch: pytest.MonkeyPatch, repo: MemoryStreamRepository) -> None:
    async def refused(*_args: object) -> None:
        raise AssertionError("the store was read")

    for name in ("get_stream", "read_runs"):
        monkeypatch.setattr(repo, name, refused)


async def ended_here(engine: StreamEngine) -> str:
    """Starts `engine`, runs a stream to its end and waits until its generation is done;
    returns its id."""
    await engine.start()
    sub = await engine.submit(SubmitCommand(prompt="hi"))
    await collect(await engine.subscribe(sub.stream_id, 0))
    async with asyncio.timeout(5):
        while sub.stream_id in engine._generations.live:  # noqa: ASYNC110
            await asyncio.sleep(0.001)
    return sub.stream_id


async def test_a_stream_that_just_ended_here_is_served_from_memory(
    make_engine: EngineFactory, repo: MemoryStreamRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine()
    stream_id = await ended_here(engine)
    refuse_store_reads(monkeypatch, repo)  # late subscribers arrive after it ended
    chunks, end = await collect(await engine.subscribe(stream_id, 0))
    assert chunks == [Chunk(0, len(TOKENS) - 1, "".join(TOKENS))]
    assert end == End(StreamState.COMPLETED, len(TOKENS) - 1)
    chunks, end = await collect(await engine.subscribe(stream_id, 30))
    assert chunks == [Chunk(30, len(TOKENS) - 1, "".join(TOKENS[30:]))]
    _, end = await collect(await engine.subscribe(stream_id, len(TOKENS)))
    assert end.final_seq == len(TOKENS) - 1
    with pytest.raises(errors.OutOfRange):
        await engine.subscribe(stream_id, len(TOKENS) + 1)


def count_record_reads(monkeypatch: pytest.MonkeyPatch, repo: MemoryStreamRepository) -> list[str]:
    reads: list[str] = []
    get_stream = repo.get_stream

    async def counted(stream_id: str) -> StreamRecord:
        reads.append(stream_id)
        return await get_stream(stream_id)

    monkeypatch.setattr(repo, "get_stream", counted)
    return reads


async def test_an_ended_stream_longer_than_its_live_tail_is_read_from_the_store(
    make_engine: EngineFactory, repo: MemoryStreamRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(settings=replace(SETTINGS, live_tail_tokens=4))
    stream_id = await ended_here(engine)
    reads = count_record_reads(monkeypatch, repo)
    chunks, end = await collect(await engine.subscribe(stream_id, 0))
    assert "".join(c.text for c in chunks) == "".join(TOKENS)
    assert end.final_seq == len(TOKENS) - 1
    assert reads == [stream_id]  # not kept in memory: its record came from the store


async def test_the_record_of_an_ended_stream_is_read_once_per_subscription(
    make_engine: EngineFactory, repo: MemoryStreamRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(settings=replace(SETTINGS, recent_ended_seconds=0))
    stream_id = await ended_here(engine)
    reads = count_record_reads(monkeypatch, repo)
    chunks, end = await collect(await engine.subscribe(stream_id, 5))
    assert "".join(c.text for c in chunks) == "".join(TOKENS[5:])
    assert end == End(StreamState.COMPLETED, len(TOKENS) - 1)
    assert reads == [stream_id]
