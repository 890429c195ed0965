"""A stream being generated in this process: its newest durable tokens, and wake-ups."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

from tokenstream.server.domain import Chunk, Ending, StreamRecord, StreamState


class LiveStream:
    """Holds the newest committed tokens of one running stream and wakes its subscribers.

    Only tokens that are durable in the store are here: the writer publishes them after
    each commit, so a subscriber never sees a token a crash could take back. Memory is
    bounded: only the last `tail_limit` to twice that many tokens are kept; a subscriber
    further behind reads the rest from the store.
    """

    __slots__ = (
        "_changed",
        "_ended",
        "_interrupted",
        "base_seq",
        "caller",
        "final",
        "final_stored",
        "last_progress",
        "on_end",
        "producing",
        "received",
        "received_seen",
        "record",
        "stop_requested",
        "tail_limit",
        "task",
        "tokens",
        "waiting_for_store",
    )

    def __init__(self, record: StreamRecord, caller: str = "", tail_limit: int = 8192) -> None:
        self.record = record
        self.caller = caller
        self.tail_limit = max(tail_limit, 1)
        self.tokens: list[str] = []  # durable tokens base_seq, base_seq + 1, ...
        self.base_seq = 0
        self.final: StreamRecord | None = None  # set once the ending is committed
        # False if `final` was made up in memory (shutdown with the store unreachable).
        self.final_stored = False
        # Why generation must stop early (cancel, shutdown, stall); checked before every write.
        self.stop_requested: Ending | None = None
        # True while the generation task reads its token source (and may be interrupted).
        self.producing = False
        # True while generation waits for the store to catch up (not the model's fault).
        self.waiting_for_store = False
        self._interrupted = False
        # Items taken from the source so far; the stall watchdog times their progress
        # (event-loop time it last saw the count move, or the start).
        self.received = 0
        self.received_seen = 0
        self.last_progress = 0.0
        self.task: asyncio.Task[None] | None = None
        self.on_end: Callable[[LiveStream], None] = lambda _live: None  # after publish_end
        self._changed = asyncio.Event()
        self._ended = asyncio.Event()

    @property
    def stream_id(self) -> str:
        return self.record.stream_id

    @property
    def head_seq(self) -> int:
        return self.base_seq + len(self.tokens) - 1

    @property
    def state(self) -> StreamState:
        return StreamState.RUNNING if self.final is None else self.final.state

    def request_stop(self, ending: Ending) -> None:
        """Stops generation before its next token, recording why (the first reason wins)."""
        if self.stop_requested is None and self.final is None:
            self.stop_requested = ending
        self.interrupt()

    def interrupt(self) -> None:
        """Wakes a generation waiting on its model so it sees `stop_requested` (once)."""
        if (
            self.stop_requested is not None
            and self.producing
            and not self._interrupted
            and self.task is not None
            and not self.task.done()
        ):
            self._interrupted = True
            self.task.cancel()

    @property
    def changed(self) -> asyncio.Event:
        """An event set at the next publish. Take it *before* checking what is available."""
        return self._changed

    def publish(self, tokens: list[str]) -> None:
        self.tokens.extend(tokens)
        if len(self.tokens) > 2 * self.tail_limit:  # trim in bulk: amortized O(1) per token
            drop = len(self.tokens) - self.tail_limit
            del self.tokens[:drop]
            self.base_seq += drop
        self._wake()

    def publish_end(self, final: StreamRecord, stored: bool = True) -> None:
        self.final = final
        self.final_stored = stored
        self._ended.set()
        self._wake()
        self.on_end(self)

    async def wait_ended(self) -> StreamRecord:
        await self._ended.wait()
        assert self.final is not None
        return self.final

    def chunks(self, from_seq: int, max_chars: int) -> Iterator[Chunk]:
        """Durable tokens from `from_seq` (>= base_seq) on, as chunks of <= `max_chars`."""
        return chunked(self.tokens, self.base_seq, from_seq, max_chars)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


def chunked(tokens: list[str], base_seq: int, from_seq: int, max_chars: int) -> Iterator[Chunk]:
    """`tokens` (seqs base_seq, base_seq + 1, ...) from `from_seq` on, as chunks of at most
    `max_chars` characters (a longer single token is a chunk of its own)."""
    index, end = from_seq - base_seq, len(tokens)
    while index < end:
        size, last = 0, index
        while last < end:
            size += len(tokens[last])
            if size > max_chars and last > index:
                break
            last += 1
        yield Chunk(base_seq + index, base_seq + last - 1, "".join(tokens[index:last]))
        index = last
