"""Group commit: generators append tokens in memory; one task writes them in batches.

A commit per token caps a server near a thousand tokens per second; one transaction for
everything buffered costs about the same and carries all of it. Tokens reach subscribers
only after their commit returns (durable before delivered).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

from tokenstream.server.domain import Ending, StreamRecord, TokenRun
from tokenstream.server.storage.repository import StreamRepository, WriteBatch
from tokenstream.server.streams.live import LiveStream

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Pending:
    tokens: list[str] = field(default_factory=list)
    ending: Ending | None = None


class BatchWriter:
    _RETRY_BACKOFF = (0.05, 0.1, 0.2, 0.5, 1.0)

    def __init__(
        self, repository: StreamRepository, flush_interval: float, max_pending_tokens: int
    ) -> None:
        self._repository = repository
        self._flush_interval = flush_interval
        self._max_pending = max_pending_tokens
        self._pending: dict[LiveStream, _Pending] = {}
        self._pending_tokens = 0
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="tokenstream-batch-writer")

    async def stop(self) -> None:
        """Writes everything still pending, then ends the writer task."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task

    @property
    def has_room(self) -> bool:
        return self._pending_tokens < self._max_pending

    async def wait_for_room(self) -> None:
        while not self.has_room:
            self._room.clear()
            await self._room.wait()

    def append(self, live: LiveStream, token: str) -> None:
        """Queues one token of `live` for the next commit (its seq is `live.next_seq`)."""
        pending = self._pending.get(live)
        if pending is None:
            pending = self._pending[live] = _Pending()
        pending.tokens.append(token)
        live.next_seq += 1
        self._pending_tokens += 1
        self._wake.set()

    async def end(self, live: LiveStream, ending: Ending) -> StreamRecord:
        """Queues the stream's ending after its pending tokens; returns once it is committed."""
        pending = self._pending.get(live)
        if pending is None:
            pending = self._pending[live] = _Pending()
        pending.ending = ending
        self._wake.set()
        return await live.wait_ended()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last_start = float("-inf")
        failures = 0
        while True:
            if not self._pending:
                if self._stopping:
                    return
                await self._wake.wait()
                self._wake.clear()
                continue
            wait = last_start + self._flush_interval - loop.time()
            if wait > 0 and not self._stopping:
                await asyncio.sleep(wait)
            last_start = loop.time()
            batch, self._pending = self._pending, {}
            try:
                ended = await self._commit(batch)
            except Exception:
                failures += 1
                if self._stopping and failures > len(self._RETRY_BACKOFF):
                    log.error("giving up on %d pending streams at shutdown", len(batch))
                    raise
                delay = self._RETRY_BACKOFF[min(failures, len(self._RETRY_BACKOFF)) - 1]
                log.exception(
                    "group commit failed (attempt %d); retrying in %.2fs", failures, delay
                )
                self._requeue(batch)
                await asyncio.sleep(delay)
                continue
            failures = 0
            self._publish(batch, ended)

    async def _commit(self, batch: dict[LiveStream, _Pending]) -> dict[str, StreamRecord]:
        write = WriteBatch(at=datetime.now(UTC))
        for live, pending in batch.items():
            if pending.tokens:
                start = live.head_seq + 1
                write.runs.append((live.stream_id, TokenRun.from_tokens(start, pending.tokens)))
            if pending.ending is not None:
                write.endings.append((live.stream_id, pending.ending))
        ended = await self._repository.commit(write)
        # An ending that lost a race (the stream was already ended elsewhere) reports the
        # state the store holds.
        for stream_id, _ending in write.endings:
            if stream_id not in ended:
                ended[stream_id] = await self._repository.get_stream(stream_id)
        return ended

    def _publish(self, batch: dict[LiveStream, _Pending], ended: dict[str, StreamRecord]) -> None:
        for live, pending in batch.items():
            if pending.tokens:
                self._pending_tokens -= len(pending.tokens)
                live.publish(pending.tokens)
            if pending.ending is not None:
                live.publish_end(ended[live.stream_id])
        if self.has_room:
            self._room.set()

    def _requeue(self, batch: dict[LiveStream, _Pending]) -> None:
        """Puts a failed batch back in front of what arrived meanwhile, keeping seq order."""
        newer, self._pending = self._pending, batch
        for live, pending in newer.items():
            merged = self._pending.setdefault(live, _Pending())
            merged.tokens.extend(pending.tokens)
            merged.ending = pending.ending or merged.ending
