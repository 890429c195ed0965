"""Group commit: generators append tokens in memory; one task writes them in batches.

A commit per token caps a server near a thousand tokens per second; one transaction for
everything buffered costs about the same and carries all of it. Tokens reach subscribers
only after their commit returns (durable before delivered).

When a commit fails the writer cannot know whether it landed (the acknowledgement may be
what was lost), so before retrying it reads back where each stream stands and keeps only
what is not stored yet. A batch that keeps failing for a reason other than an outage is
split per stream, and a stream the store refuses ends FAILED `storage_error`, so one bad
stream cannot stall the others.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from tokenstream.server.domain import Ending, StreamRecord, StreamState, TokenRun
from tokenstream.server.storage.errors import NotFound, StorageError, StorageUnavailable
from tokenstream.server.storage.repository import (
    CommitResult,
    NewStream,
    StreamRepository,
    WriteBatch,
)
from tokenstream.server.streams.live import LiveStream

log = logging.getLogger(__name__)

STORAGE_ERROR = "storage_error"


@dataclass(slots=True)
class _Pending:
    tokens: list[str] = field(default_factory=list)
    ending: Ending | None = None


Batch = dict[LiveStream, _Pending]
Creations = list[tuple[NewStream, "asyncio.Future[StreamRecord]"]]


class BatchWriter:
    _BACKOFF = (0.05, 0.1, 0.2, 0.5, 1.0)
    # Failures of one batch, not explained by an outage, before it is split per stream.
    _SPLIT_AFTER = 3
    # Commits a stream creation is tried in before its caller is told UNAVAILABLE.
    _CREATION_TRIES = 3

    def __init__(
        self,
        repository: StreamRepository,
        flush_interval: float,
        max_pending_tokens: int,
        max_batch_tokens: int = 10_000,
        max_batch_endings: int = 16,
    ) -> None:
        self._repository = repository
        self._flush_interval = flush_interval
        self._max_pending = max_pending_tokens
        self._max_batch = max(max_batch_tokens, 1)
        self._max_endings = max(max_batch_endings, 1)
        self._pending: Batch = {}
        self._pending_tokens = 0
        # New streams wait for the next group commit too: one transaction creates many, and
        # creation never competes with token writes for the database's write lock.
        self._creations: Creations = []
        self._creation_tries: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        # Called after each commit, once memory is up to date, with the streams it wrote
        # and their conversations (to wake readers that are not following a LiveStream).
        self.on_commit: Callable[[list[str], set[str]], None] = lambda _s, _c: None
        self._deadline: float | None = None  # set when stopping: give up retrying after it
        self._closing = False  # exit once nothing is pending
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="tokenstream-batch-writer")

    def begin_stop(self, give_up_after: float) -> None:
        """From now on, retry failed commits for at most `give_up_after` seconds more."""
        if self._deadline is None:
            self._deadline = asyncio.get_running_loop().time() + give_up_after
            self._wake.set()

    async def stop(self, give_up_after: float = 5.0) -> None:
        """Writes everything still pending (or gives up after `give_up_after` s), then ends."""
        self.begin_stop(give_up_after)
        self._closing = True
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

    async def create(self, new: NewStream) -> StreamRecord:
        """Creates the stream in the next commit. Raises the repository's NotFound or
        AlreadyExists for it, or StorageUnavailable when that commit fails."""
        if self._closing or self._task is None or self._task.done():
            raise StorageUnavailable("the writer has stopped: the server is shutting down")
        created: asyncio.Future[StreamRecord] = asyncio.get_running_loop().create_future()
        self._creations.append((new, created))
        self._wake.set()
        return await created

    def append(self, live: LiveStream, token: str) -> bool:
        """Queues one token of `live` for the next commit; False when the writer is full
        (wait_for_room before the next). Called for every token: kept lean."""
        pending = self._pending.get(live)
        if pending is None:
            pending = self._pending[live] = _Pending()
            self._wake.set()  # the first token of a stream since the last batch was taken
        pending.tokens.append(token)
        self._pending_tokens += 1
        return self._pending_tokens < self._max_pending

    def queue_end(self, live: LiveStream, ending: Ending) -> None:
        """Queues the stream's ending after its pending tokens."""
        if live.final is None:
            self._entry(live).ending = ending
            self._wake.set()

    async def end(self, live: LiveStream, ending: Ending) -> StreamRecord:
        """Queues the ending and returns the stream's final record once it is committed."""
        self.queue_end(live, ending)
        return await live.wait_ended()

    def _entry(self, live: LiveStream) -> _Pending:
        pending = self._pending.get(live)
        if pending is None:
            pending = self._pending[live] = _Pending()
        return pending

    @property
    def _stopping(self) -> bool:
        return self._deadline is not None

    def _past_deadline(self) -> bool:
        return self._deadline is not None and asyncio.get_running_loop().time() > self._deadline

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last_start = float("-inf")
        failures = 0
        while True:
            if not self._pending and not self._creations:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            wait = last_start + self._flush_interval - loop.time()
            if wait > 0 and not self._stopping:
                await asyncio.sleep(wait)
            last_start = loop.time()
            batch = self._take_batch()
            creations, self._creations = self._creations, []
            try:
                async with asyncio.timeout(self._commit_timeout()):
                    result = await self._repository.commit(self._write_batch(batch, creations))
                self._apply(batch, result.terminal)
                _settle(creations, result)
                self._announce([new for new, _ in creations])
                failures = 0
                continue
            except Exception as exc:
                failures += 1
                error = exc
                outage = isinstance(exc, StorageUnavailable | TimeoutError)
                delay = self._BACKOFF[min(failures, len(self._BACKOFF)) - 1]
                log.warning(
                    "group commit of %d stream(s) failed (attempt %d, %s); retrying in %.2fs",
                    len(batch),
                    failures,
                    "outage" if outage else repr(exc),
                    delay,
                    exc_info=not outage,
                )
            if self._past_deadline():
                self._fail(creations, error)
                self._abandon(batch)
                continue
            await asyncio.sleep(delay)
            try:
                # The commit may have landed after all: read back before retrying.
                creations = await self._reconcile_creations(creations)
                batch = await self._reconcile(batch)
                if failures >= self._SPLIT_AFTER and not outage:
                    self._fail(creations, error)
                    creations = []
                    batch = await self._commit_one_by_one(batch)
                    failures = 0
            except Exception:
                log.warning("could not read back the failed batch; retrying it", exc_info=True)
            self._creations[:0] = creations
            self._requeue(batch)

    def _fail(self, creations: Creations, error: BaseException) -> None:
        """Tells the creations' callers UNAVAILABLE: whether they landed is unknown, and
        their retries (same request_id) find the stream if it exists."""
        for new, created in creations:
            self._creation_tries.pop(new.stream_id, None)
            if not created.done():
                unavailable = StorageUnavailable(f"the stream could not be created: {error!r}")
                created.set_exception(unavailable)

    def _commit_timeout(self) -> float | None:
        """No limit normally; once stopping, what is left of the deadline (at least 0.5 s)."""
        if self._deadline is None:
            return None
        return max(self._deadline - asyncio.get_running_loop().time(), 0.5)

    async def _reconcile_creations(self, creations: Creations) -> Creations:
        """Answers the creations that landed; returns those to try again (a few times:
        then their callers hear UNAVAILABLE rather than wait out an outage)."""
        remaining: Creations = []
        for new, created in creations:
            if created.done():
                continue
            try:
                record = await self._repository.get_stream(new.stream_id)
            except NotFound:
                tries = self._creation_tries.get(new.stream_id, 0) + 1
                if tries < self._CREATION_TRIES:
                    self._creation_tries[new.stream_id] = tries
                    remaining.append((new, created))
                    continue
                created.set_exception(StorageUnavailable("the store keeps failing"))
            else:
                created.set_result(record)
            self._creation_tries.pop(new.stream_id, None)
        return remaining

    def _take_batch(self) -> Batch:
        """Up to `max_batch_tokens` pending tokens, oldest streams first, and up to
        `max_batch_endings` endings; the rest waits for the next commit."""
        batch = self._take_tokens()
        ending = [live for live, pending in batch.items() if pending.ending is not None]
        for live in ending[self._max_endings :]:
            pending = batch[live]
            self._entry(live).ending, pending.ending = pending.ending, None
            if not pending.tokens:
                del batch[live]
        return batch

    def _take_tokens(self) -> Batch:
        if self._pending_tokens <= self._max_batch:
            everything, self._pending = self._pending, {}
            return everything
        batch: Batch = {}
        budget = self._max_batch
        for live in list(self._pending):
            if budget <= 0:
                break
            pending = self._pending[live]
            if len(pending.tokens) <= budget:
                batch[live] = self._pending.pop(live)
                budget -= len(pending.tokens)
            else:  # split: the ending (if any) stays with the stream's later tokens
                batch[live] = _Pending(tokens=pending.tokens[:budget])
                pending.tokens = pending.tokens[budget:]
                budget = 0
        return batch

    def _write_batch(self, batch: Batch, creations: Creations | None = None) -> WriteBatch:
        write = WriteBatch(at=datetime.now(UTC))
        write.creations = [new for new, _ in creations or ()]
        for live, pending in batch.items():
            if pending.tokens:
                start = live.head_seq + 1
                write.runs.append((live.stream_id, TokenRun.from_tokens(start, pending.tokens)))
            if pending.ending is not None:
                write.endings.append((live.stream_id, pending.ending))
                if live.base_seq == 0:
                    # Memory holds every durable token: the response needs no read-back.
                    response = TokenRun.from_tokens(0, live.tokens + pending.tokens)
                    write.responses[live.stream_id] = response
        return write

    def _apply(self, batch: Batch, terminal: dict[str, StreamRecord]) -> None:
        """Publishes what the commit made durable; ends the streams that are terminal."""
        for live, pending in batch.items():
            record = terminal.get(live.stream_id)
            if record is None:
                self._publish_tokens(live, pending.tokens)
                continue
            # Tokens up to the stored head are durable; later ones were refused because the
            # stream had already ended (e.g. cancelled through the store by another process).
            durable = max(record.head_seq - live.head_seq, 0)
            self._publish_tokens(live, pending.tokens[:durable])
            self._pending_tokens -= len(pending.tokens) - durable
            self._finish(live, record)
        if self.has_room:
            self._room.set()
        self._announce(live.record for live in batch)

    def _announce(self, written: Iterable[StreamRecord | NewStream]) -> None:
        items = list(written)
        if items:
            self.on_commit([i.stream_id for i in items], {i.conversation_id for i in items})

    def _publish_tokens(self, live: LiveStream, tokens: list[str]) -> None:
        if tokens:
            self._pending_tokens -= len(tokens)
            live.publish(tokens)

    @staticmethod
    def _finish(live: LiveStream, record: StreamRecord, stored: bool = True) -> None:
        if live.final is None:
            # Its generator must stop writing too, even while it waits on its model.
            live.request_stop(Ending(record.state, record.reason, record.error))
            live.publish_end(record, stored)

    async def _reconcile(self, batch: Batch) -> Batch:
        """Keeps only what the failed commit did not store (it may have landed after all)."""
        remaining: Batch = {}
        for live, pending in batch.items():
            record = await self._repository.get_stream(live.stream_id)
            stored = max(record.head_seq - live.head_seq, 0)
            if stored:
                self._publish_tokens(live, pending.tokens[:stored])
                pending.tokens = pending.tokens[stored:]
                self._announce([live.record])
            if record.state.is_terminal:
                self._pending_tokens -= len(pending.tokens)
                self._finish(live, record)
            elif pending.tokens or pending.ending is not None:
                remaining[live] = pending
        return remaining

    async def _commit_one_by_one(self, batch: Batch) -> Batch:
        """Commits each stream alone; a stream the store refuses ends FAILED."""
        remaining: Batch = {}
        for live, pending in batch.items():
            single = {live: pending}
            try:
                self._apply(
                    single, (await self._repository.commit(self._write_batch(single))).terminal
                )
            except StorageUnavailable:
                remaining[live] = pending
            except Exception as exc:
                log.error("the store refuses stream %s; ending it", live.stream_id, exc_info=True)
                self._pending_tokens -= len(pending.tokens)
                ending = Ending(
                    StreamState.FAILED,
                    STORAGE_ERROR,
                    f"the store refused this stream's tokens ({type(exc).__name__}); "
                    "the tokens stored before that are kept",
                )
                live.request_stop(ending)
                remaining[live] = _Pending(ending=ending)
                # An ending put off to a later commit must not replace this one.
                if (deferred := self._pending.pop(live, None)) is not None:
                    self._pending_tokens -= len(deferred.tokens)
        return remaining

    def _abandon(self, batch: Batch) -> None:
        """At shutdown past the deadline: stop waiting for the store, release every waiter."""
        creations, self._creations = self._creations, []
        self._fail(creations, StorageUnavailable("shutting down with the database unreachable"))
        everything = dict(batch)
        for live, pending in self._pending.items():
            merged = everything.setdefault(live, _Pending())
            merged.tokens.extend(pending.tokens)
            merged.ending = pending.ending or merged.ending
        self._pending = {}
        lost = sum(len(p.tokens) for p in everything.values())
        log.error(
            "giving up: %d token(s) of %d stream(s) could not be stored before shutdown",
            lost,
            len(everything),
        )
        for live, pending in everything.items():
            self._pending_tokens -= len(pending.tokens)
            ending = pending.ending or live.stop_requested or Ending(StreamState.FAILED)
            self._finish(
                live,
                replace(
                    live.record,
                    state=ending.state,
                    reason=ending.reason,
                    error=ending.error,
                    head_seq=live.head_seq,
                ),
                stored=False,  # the store never saw this ending
            )
        self._room.set()

    def _requeue(self, batch: Batch) -> None:
        """Puts a failed batch back in front of what arrived meanwhile, keeping seq order."""
        newer, self._pending = self._pending, batch
        for live, pending in newer.items():
            merged = self._pending.setdefault(live, _Pending())
            merged.tokens.extend(pending.tokens)
            merged.ending = pending.ending or merged.ending


def _settle(creations: Creations, result: CommitResult) -> None:
    for new, created in creations:
        if created.done():  # the caller went away
            continue
        outcome = result.created.get(new.stream_id)
        if isinstance(outcome, StreamRecord):
            created.set_result(outcome)
        else:
            created.set_exception(outcome or StorageError(f"{new.stream_id} was not created"))
