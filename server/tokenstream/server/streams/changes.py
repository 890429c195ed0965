"""Wake-ups for readers waiting on a stream or a conversation that changes in the store."""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Iterable


class ChangeFeed:
    """One event per stream and per conversation that someone waits on, set at its next
    change and then replaced (like `LiveStream.changed`).

    Fed by this process after its own commits (once its memory is up to date) and by the
    store's notices of other processes' writes. Only waited-on ids hold an event: a reader
    that goes away drops its reference and the entry disappears with it.
    """

    def __init__(self) -> None:
        self._streams: weakref.WeakValueDictionary[str, asyncio.Event] = (
            weakref.WeakValueDictionary()
        )
        self._conversations: weakref.WeakValueDictionary[str, asyncio.Event] = (
            weakref.WeakValueDictionary()
        )

    def stream(self, stream_id: str) -> asyncio.Event:
        """An event set at the stream's next change. Take it *before* reading the store."""
        return _event(self._streams, stream_id)

    def conversation(self, conversation_id: str) -> asyncio.Event:
        """An event set at the conversation's next event, or next tokens of its streams."""
        return _event(self._conversations, conversation_id)

    def publish(self, streams: Iterable[str] = (), conversations: Iterable[str] = ()) -> None:
        for stream_id in streams:
            _set(self._streams, stream_id)
        for conversation_id in conversations:
            _set(self._conversations, conversation_id)

    def publish_everything(self) -> None:
        """Wakes every reader (changes may have been missed: each looks for itself)."""
        self.publish(list(self._streams.keys()), list(self._conversations.keys()))


def _event(events: weakref.WeakValueDictionary[str, asyncio.Event], key: str) -> asyncio.Event:
    event = events.get(key)
    if event is None:
        event = events[key] = asyncio.Event()
    return event


def _set(events: weakref.WeakValueDictionary[str, asyncio.Event], key: str) -> None:
    event = events.pop(key, None)
    if event is not None:
        event.set()


async def wait_for_change(changed: asyncio.Event, seconds: float) -> None:
    """Returns when `changed` is set or after `seconds`, whichever comes first."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await changed.wait()
