"""A small blocking facade over the async client, for scripts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar

from tokenstream.client._client import DEFAULT_TARGET, TokenStreamClient
from tokenstream.client._types import (
    CancelResult,
    Chunk,
    ConversationEvent,
    StreamEnd,
    StreamInfo,
    StreamTokens,
    Submitted,
    Turn,
)

T = TypeVar("T")


class TokenStreamSyncClient:
    """The same calls as `TokenStreamClient`, blocking. Not for use inside an event loop.

    Takes the same arguments as `TokenStreamClient`.
    """

    def __init__(self, targets: str | Sequence[str] = DEFAULT_TARGET, **kwargs: Any) -> None:
        self._client = TokenStreamClient(targets, **kwargs)
        self._loop = asyncio.new_event_loop()
        self._streams: set[AsyncGenerator[Any, None]] = set()

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
        """Closes open streams and the connections. Safe to call twice."""
        if self._loop.is_closed():
            return
        for items in list(self._streams):
            self._run(items.aclose())
        self._run(self._client.close())
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
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
        return self._iterate(self._client.stream(stream_id, from_seq))

    def watch(
        self, conversation_id: str, from_event_seq: int = 0, **kwargs: Any
    ) -> Iterator[ConversationEvent | StreamTokens]:
        return self._iterate(self._client.watch(conversation_id, from_event_seq, **kwargs))

    def _iterate(self, items: AsyncGenerator[T, None]) -> Iterator[T]:
        self._streams.add(items)
        try:
            while True:
                try:
                    yield self._run(anext(items))
                except StopAsyncIteration:
                    return
        finally:
            self._streams.discard(items)
            if not self._loop.is_closed():
                self._run(items.aclose())

    def _run(self, work: Awaitable[T]) -> T:
        """Runs `work` to completion; on Ctrl-C (or any interruption) cancels it cleanly."""
        task = asyncio.ensure_future(work, loop=self._loop)
        try:
            return self._loop.run_until_complete(task)
        except BaseException:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    self._loop.run_until_complete(task)
            raise
