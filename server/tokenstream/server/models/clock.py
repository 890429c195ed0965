"""`clock`: short tokens that carry the time they were produced, to measure latency.

At full speed every token is " tok", except every 16th, which is " @" and the host's
monotonic clock in nanoseconds (CLOCK_MONOTONIC is one clock for all processes on a host):
16 tokens are made within microseconds, so one stamp speaks for them all. Paced like a
model, every token is stamped: each is made at its own moment, and sampling would give
the first token of a stream (made while the stream starts) 16 times its weight. A reader
on the same host subtracts the stamp from its own clock when the token arrives.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator

from tokenstream.server.models.base import GenerationRequest, Pacer

STAMP_EVERY = 16
_STAMP = re.compile(r"@(\d+)")


def stamps(text: str) -> list[int]:
    """The production times (monotonic ns) stamped in `text`."""
    return [int(found) for found in _STAMP.findall(text)]


class ClockSource:
    def __init__(self, tokens_per_second: float = 0.0) -> None:
        self._rate = tokens_per_second
        self.stamp_every = STAMP_EVERY if tokens_per_second <= 0 else 1

    async def generate(self, request: GenerationRequest) -> AsyncIterator[str]:
        pacer = Pacer(self._rate)
        every = self.stamp_every
        for index in range(request.max_tokens):
            await pacer.wait(index)
            yield f" @{time.monotonic_ns()}" if index % every == 0 else " tok"
