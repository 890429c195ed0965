"""Streams that ended here a moment ago, kept whole in memory for a short while.

A short answer often ends before all its subscribers have arrived (a client subscribes
after SubmitPrompt returns; a device reconnects). Those late subscribers follow the ended
stream in memory instead of reading the store two or three times. Only what the store
confirmed is kept: the final record the ending's commit returned, and every durable token,
so it equals the compacted row. Bounded in time and in memory; a stream whose first tokens
have already left its live tail is not kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tokenstream.server.streams.live import LiveStream

# Rough memory of a kept stream beyond its text: the LiveStream, its finished task and
# events, two records (bytes), and of one token (a small str and its list slot).
_ENTRY_BYTES = 3072
_TOKEN_BYTES = 64


def _size(live: LiveStream) -> int:
    assert live.final is not None
    prompts = len(live.record.prompt) + len(live.final.prompt)
    return _ENTRY_BYTES + _TOKEN_BYTES * len(live.tokens) + prompts


class RecentlyEnded:
    """Ended streams by id, oldest first; each leaves after `keep_seconds`, or sooner when
    the newer ones take more than `max_bytes` between them (0 of either: none is kept)."""

    def __init__(
        self,
        max_bytes: int,
        keep_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_bytes = max_bytes
        self._keep_seconds = keep_seconds
        self._clock = clock
        self._kept: dict[str, tuple[LiveStream, int, float]] = {}  # insertion = age order
        self._bytes = 0

    @property
    def size_bytes(self) -> int:
        """Estimated memory held by the kept streams."""
        return self._bytes

    def keep(self, live: LiveStream) -> None:
        """Keeps `live` if the store confirmed its end and it holds every token."""
        final = live.final
        if (
            final is None
            or not live.final_stored
            or live.base_seq != 0
            or final.head_seq != live.head_seq
            or self._keep_seconds <= 0
        ):
            return
        size = _size(live)
        if size > self._max_bytes:
            return
        self.forget(live.stream_id)
        self._kept[live.stream_id] = (live, size, self._clock())
        self._bytes += size
        self._expire()

    def get(self, stream_id: str) -> LiveStream | None:
        self._expire()
        kept = self._kept.get(stream_id)
        return kept[0] if kept is not None else None

    def forget(self, stream_id: str) -> None:
        kept = self._kept.pop(stream_id, None)
        if kept is not None:
            self._bytes -= kept[1]

    def clear(self) -> None:
        """Forgets everything (e.g. after a purge removed streams from the store)."""
        self._kept.clear()
        self._bytes = 0

    def _expire(self) -> None:
        oldest_kept = self._clock() - self._keep_seconds
        while self._kept:
            stream_id, (_, size, at) = next(iter(self._kept.items()))
            if at > oldest_kept and self._bytes <= self._max_bytes:
                return
            del self._kept[stream_id]
            self._bytes -= size
