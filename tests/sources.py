"""Token sources scripted by tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from tokenstream.server.models import GenerationRequest


class ScriptedSource:
    """Yields fixed tokens; with `gated`, each token waits until the test releases it."""

    def __init__(self, tokens: Sequence[str], *, gated: bool = False, fail_after: int = -1) -> None:
        self.tokens = list(tokens)
        self.gated = gated
        self.fail_after = fail_after
        self._released = asyncio.Semaphore(0)
        self.produced = 0
        self.closed = asyncio.Event()

    def release(self, count: int = 1) -> None:
        for _ in range(count):
            self._released.release()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[str]:
        try:
            for index, token in enumerate(self.tokens):
                if index == self.fail_after:
                    raise RuntimeError("scripted model failure")
                if self.gated:
                    await self._released.acquire()
                else:
                    await asyncio.sleep(0)
                self.produced += 1
                yield token
        finally:
            self.closed.set()
