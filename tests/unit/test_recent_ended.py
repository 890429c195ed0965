"""Streams kept in memory a moment after they ended: bounded in time and in memory."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

from tokenstream.server.domain import StreamRecord, StreamState
from tokenstream.server.streams.live import LiveStream
from tokenstream.server.streams.recent import RecentlyEnded

ENOUGH = 1 << 30


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def ended(stream_id: str, tokens: int, tail_limit: int = 1000, stored: bool = True) -> LiveStream:
    record = StreamRecord(
        stream_id=stream_id,
        conversation_id="c",
        prompt="p",
        model="m",
        max_tokens=tokens,
        request_id=None,
        request_hash=None,
        state=StreamState.RUNNING,
        head_seq=-1,
        created_at=datetime.now(UTC),
    )
    live = LiveStream(record, tail_limit=tail_limit)
    live.publish([" t"] * tokens)
    live.publish_end(replace(record, state=StreamState.COMPLETED, head_seq=tokens - 1), stored)
    return live


def test_an_ended_stream_is_kept_for_keep_seconds() -> None:
    clock = Clock()
    recent = RecentlyEnded(max_bytes=ENOUGH, keep_seconds=10, clock=clock)
    live = ended("a", 5)
    recent.keep(live)
    clock.now += 9.9
    assert recent.get("a") is live
    clock.now += 0.2
    assert recent.get("a") is None
    assert recent.size_bytes == 0


def test_the_oldest_leave_first_when_the_memory_budget_is_spent() -> None:
    one = RecentlyEnded(max_bytes=ENOUGH, keep_seconds=10, clock=Clock())
    one.keep(ended("a", 400))
    recent = RecentlyEnded(max_bytes=one.size_bytes * 2, keep_seconds=10, clock=Clock())
    for stream_id in "abc":
        recent.keep(ended(stream_id, 400))
    assert recent.get("a") is None  # three do not fit: the oldest went
    assert recent.get("b") is not None
    assert recent.get("c") is not None
    assert recent.size_bytes == one.size_bytes * 2


def test_streams_without_tokens_still_count_against_the_budget() -> None:
    one = RecentlyEnded(max_bytes=ENOUGH, keep_seconds=10, clock=Clock())
    one.keep(ended("a", 0))
    assert one.size_bytes > 0
    recent = RecentlyEnded(max_bytes=one.size_bytes * 10, keep_seconds=10, clock=Clock())
    for n in range(100):
        recent.keep(ended(f"s{n}", 0))
    assert sum(recent.get(f"s{n}") is not None for n in range(100)) == 10


def test_only_whole_ended_streams_the_store_confirmed_are_kept() -> None:
    small = RecentlyEnded(max_bytes=ENOUGH, keep_seconds=10, clock=Clock())
    small.keep(ended("a", 4))
    recent = RecentlyEnded(max_bytes=small.size_bytes * 2, keep_seconds=10, clock=Clock())
    recent.keep(ended("a", 4))
    recent.keep(ended("big", 10_000, tail_limit=20_000))  # larger than the whole budget
    running = ended("running", 1)
    running.final = None
    recent.keep(running)
    recent.keep(ended("trimmed", 7, tail_limit=3))  # its first tokens left the live tail
    recent.keep(ended("made-up", 3, stored=False))  # e.g. shutdown, store unreachable
    behind = ended("behind", 3)
    behind.tokens.pop()  # its final record counts a token memory does not hold
    recent.keep(behind)
    names = ("a", "big", "running", "trimmed", "made-up", "behind")
    assert [s for s in names if recent.get(s)] == ["a"]
    assert recent.size_bytes == small.size_bytes


def test_zero_seconds_or_bytes_keeps_nothing_and_clear_forgets_everything() -> None:
    for recent in (
        RecentlyEnded(max_bytes=ENOUGH, keep_seconds=0, clock=Clock()),
        RecentlyEnded(max_bytes=0, keep_seconds=10, clock=Clock()),
    ):
        recent.keep(ended("a", 1))
        assert recent.get("a") is None
    recent = RecentlyEnded(max_bytes=ENOUGH, keep_seconds=10, clock=Clock())
    recent.keep(ended("a", 1))
    recent.clear()
    assert recent.get("a") is None
    assert recent.size_bytes == 0
