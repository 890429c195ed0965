"""A stream being generated in this process: its durable tokens in memory, and wake-ups."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from tokenstream.server.domain import Chunk, Ending, StreamRecord, StreamState


class LiveStream:
    """Holds the committed tokens of one running stream and wakes its subscribers.

    Only tokens that are durable in the store are here: the writer publishes them after
    each commit, so a subscriber never sees a token a crash could take back.
    """

    __slots__ = (
        "_changed",
        "_ended",
        "final",
        "producing",
        "record",
        "stop_requested",
        "task",
        "tokens",
    )

    def __init__(self, record: StreamRecord) -> None:
        self.record = record
        self.tokens: list[str] = []  # durable tokens; the index is the seq
        self.final: StreamRecord | None = None  # set once the ending is committed
        # Why generation must stop early (cancel, shutdown); checked before every write.
        self.stop_requested: Ending | None = None
        # True while the generation task reads its token source (and may be interrupted).
        self.producing = False
        self.task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._ended = asyncio.Event()

    @property
    def stream_id(self) -> str:
        return self.record.stream_id

    @property
    def head_seq(self) -> int:
        return len(self.tokens) - 1

    @property
    def state(self) -> StreamState:
        return StreamState.RUNNING if self.final is None else self.final.state

    @property
    def changed(self) -> asyncio.Event:
        """An event set at the next publish. Take it *before* checking what is available."""
        return self._changed

    def publish(self, tokens: list[str]) -> None:
        self.tokens.extend(tokens)
        self._wake()

    def publish_end(self, final: StreamRecord) -> None:
        self.final = final
        self._ended.set()
        self._wake()

    async def wait_ended(self) -> StreamRecord:
        await self._ended.wait()
        assert self.final is not None
        return self.final

    def chunks(self, from_seq: int, max_chars: int) -> Iterator[Chunk]:
        """Durable tokens from `from_seq` on, rolled up into chunks of at most `max_chars`."""
        seq, head = from_seq, self.head_seq
        while seq <= head:
            size, last = 0, seq
            while last <= head:
                size += len(self.tokens[last])
                if size > max_chars and last > seq:
                    break
                last += 1
            yield Chunk(seq, last - 1, "".join(self.tokens[seq:last]))
            seq = last

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
