"""The token source interface and pacing shared by the built-in sources."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    stream_id: str
    prompt: str
    max_tokens: int


class TokenSource(Protocol):
    """Produces the tokens answering one prompt.

    The engine consumes the iterator in its own task and stops a generation by cancelling
    that task and closing the iterator, so adapters to model servers must let
    `asyncio.CancelledError` propagate (and close their HTTP streams in `finally`).
    The engine never takes more than `max_tokens` tokens.
    """

    def generate(self, request: GenerationRequest) -> AsyncIterator[str]: ...


class Pacer:
    """Spaces tokens at a fixed rate on an absolute schedule, so delays do not accumulate."""

    # With no pace, still yield to the event loop now and then so one fast source cannot
    # starve subscribers and other generations.
    _YIELD_EVERY = 64

    def __init__(self, tokens_per_second: float) -> None:
        self._interval = 1.0 / tokens_per_second if tokens_per_second > 0 else 0.0
        self._start: float | None = None

    async def wait(self, index: int) -> None:
        if self._interval == 0.0:
            if index % self._YIELD_EVERY == 0:
                await asyncio.sleep(0)
            return
        loop = asyncio.get_running_loop()
        if self._start is None:
            self._start = loop.time()
        delay = self._start + index * self._interval - loop.time()
        await asyncio.sleep(max(delay, 0.0))
