"""Streams kept in memory a moment after they ended: bounded in time and in tokens."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

from tokenstream.server.domain import StreamRecord, StreamState
from tokenstream.server.streams.live import LiveStream
from tokenstream.server.streams.recent import RecentlyEnded


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def ended(stream_id: str, tokens: int, tail_limit: int = 100) -> LiveStream:
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
    live.publish_end(replace(record, state=StreamState.COMPLETED, head_seq=tokens - 1))
    return live


def test_an_ended_stream_is_kept_for_keep_seconds() -> None:
    clock = Clock()
    recent = RecentlyEnded(max_tokens=100, keep_seconds=10, clock=clock)
    live = ended("a", 5)
    recent.keep(live)
    clock.now += 9.9
    assert recent.get("a") is live
    clock.now += 0.2
    assert recent.get("a") is None
    assert recent.tokens == 0


def test_the_oldest_leave_first_when_the_token_budget_is_spent() -> None:
    recent = RecentlyEnded(max_tokens=10, keep_seconds=10, clock=Clock())
    for stream_id in "abc":
        recent.keep(ended(stream_id, 4))
    assert recent.get("a") is None  # 12 tokens > 10: the oldest went
    assert recent.get("b") is not None
    assert recent.get("c") is not None
    assert recent.tokens == 8


def test_only_whole_ended_streams_within_the_budget_are_kept() -> None:
    recent = RecentlyEnded(max_tokens=10, keep_seconds=10, clock=Clock())
    recent.keep(ended("a", 4))
    recent.keep(ended("big", 11))
    running = ended("running", 1)
    running.final = None
    recent.keep(running)
    recent.keep(ended("trimmed", 7, tail_limit=3))  # its first tokens left the live tail
    assert [s for s in ("a", "big", "running", "trimmed") if recent.get(s)] == ["a"]
    assert recent.tokens == 4


def test_zero_seconds_keeps_nothing_and_clear_forgets_everything() -> None:
    off = RecentlyEnded(max_tokens=10, keep_seconds=0, clock=Clock())
    off.keep(ended("a", 1))
    assert off.get("a") is None
    recent = RecentlyEnded(max_tokens=10, keep_seconds=10, clock=Clock())
    recent.keep(ended("a", 1))
    recent.clear()
    assert recent.get("a") is None
    assert recent.tokens == 0
