"""The `clock` token source: short tokens, some stamped with the time they were made."""

from __future__ import annotations

import time

from tokenstream.server.models import GenerationRequest
from tokenstream.server.models.clock import STAMP_EVERY, ClockSource, stamps


async def test_tokens_are_short_and_every_sixteenth_carries_the_clock() -> None:
    before = time.monotonic_ns()
    tokens = [t async for t in ClockSource().generate(GenerationRequest("s", "p", 40))]
    after = time.monotonic_ns()
    assert len(tokens) == 40
    stamped = [i for i, token in enumerate(tokens) if token != " tok"]
    assert stamped == list(range(0, 40, STAMP_EVERY))
    times = stamps("".join(tokens))
    assert len(times) == len(stamped)
    assert before <= times[0] <= times[-1] <= after
    assert stamps(" tok tok") == []


async def test_paced_tokens_are_each_stamped() -> None:
    source = ClockSource(tokens_per_second=1000.0)
    tokens = [t async for t in source.generate(GenerationRequest("s", "p", 5))]
    times = stamps("".join(tokens))
    assert len(times) == 5
    assert times == sorted(times)
    assert times[-1] - times[0] >= 3_000_000  # 4 intervals of 1 ms, on schedule
