"""Streams that ended here a moment ago, kept whole in memory for a short while.

A short answer often ends before all its subscribers have arrived (a client subscribes
after SubmitPrompt returns; a device reconnects). Those late subscribers follow the ended
stream in memory instead of reading the store two or three times. What is kept was
committed: the final record the ending's commit returned, and every durable token, so it
equals the compacted row. Bounded in time and in tokens; a stream whose first tokens have
already left its live tail is not kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tokenstream.server.streams.live import LiveStream


class RecentlyEnded:
    """Ended streams by id, oldest first; each leaves after `keep_seconds`, or sooner when
    the newer ones hold more than `max_tokens` tokens between them."""

    def __init__(
        self,
        max_tokens: int,
        keep_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_tokens = max_tokens
        self._keep_seconds = keep_seconds
        self._clock = clock
        self._ended: dict[str, tuple[LiveStream, float]] = {}  # insertion order = age order
        self._tokens = 0

    @property
    def tokens(self) -> int:
        return self._tokens

    def keep(self, live: LiveStream) -> None:
        """Keeps `live` if its end is published and it holds every token of the stream."""
        final, size = live.final, len(live.tokens)
        if (
            final is None
            or live.base_seq != 0
            or final.head_seq != live.head_seq
            or size > self._max_tokens
            or self._keep_seconds <= 0
            or live.stream_id in self._ended
        ):
            return
        self._ended[live.stream_id] = (live, self._clock())
        self._tokens += size
        self._expire()

    def get(self, stream_id: str) -> LiveStream | None:
        self._expire()
        kept = self._ended.get(stream_id)
        return kept[0] if kept is not None else None

    def clear(self) -> None:
        """Forgets everything (e.g. after a purge removed streams from the store)."""
        self._ended.clear()
        self._tokens = 0

    def _expire(self) -> None:
        oldest_kept = self._clock() - self._keep_seconds
        while self._ended:
            stream_id, (live, at) = next(iter(self._ended.items()))
            if at > oldest_kept and self._tokens <= self._max_tokens:
                return
            del self._ended[stream_id]
            self._tokens -= len(live.tokens)
