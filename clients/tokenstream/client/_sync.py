"""A small blocking facade over the async client, for scripts."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar

from tokenstream.client._client import DEFAULT_TARGET, TokenStreamClient
from tokenstream.client._types import CancelResult, Chunk, StreamEnd, StreamInfo, Submitted, Turn

T = TypeVar("T")


class TokenStreamSyncClient:
    """The same calls as `TokenStreamClient`, blocking. Not for use inside an event loop.

    Takes the same arguments as `TokenStreamClient`.
    """

    def __init__(self, targets: str | Sequence[str] = DEFAULT_TARGET, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._client = TokenStreamClient(targets, **kwargs)

    def __enter__(self) -> TokenStreamSyncClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if not self._loop.is_closed():
            self._run(self._client.close())
            self._loop.close()

    def submit(self, prompt: str, **kwargs: Any) -> Submitted:
        return self._run(self._client.submit(prompt, **kwargs))

    def cancel(self, stream_id: str) -> CancelResult:
        return self._run(self._client.cancel(stream_id))

    def get_stream(self, stream_id: str) -> StreamInfo:
        return self._run(self._client.get_stream(stream_id))

    def history(self, conversation_id: str, page_size: int = 0) -> list[Turn]:
        async def collect() -> list[Turn]:
            return [turn async for turn in self._client.history(conversation_id, page_size)]

        return self._run(collect())

    def stream(self, stream_id: str, from_seq: int = 0) -> Iterator[Chunk | StreamEnd]:
        items = self._client.stream(stream_id, from_seq)
        try:
            while True:
                try:
                    yield self._run(anext(items))
                except StopAsyncIteration:
                    return
        finally:
            self._run(items.aclose())

    def _run(self, work: Awaitable[T]) -> T:
        return self._loop.run_until_complete(work)
