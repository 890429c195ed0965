"""Serving one conversation watch: its events, and optionally its streams' tokens."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from datetime import UTC, datetime

from tokenstream.server.domain import Chunk, ConversationEvent
from tokenstream.server.errors import NotFound
from tokenstream.server.storage import errors as storage_errors
from tokenstream.server.storage.repository import StreamRepository
from tokenstream.server.streams._store import conversation_not_found, guarded, stored_chunks
from tokenstream.server.streams.changes import ChangeFeed, wait_for_change
from tokenstream.server.streams.events import EventBatch, StreamTokens, WatchEvent, WatchHeartbeat
from tokenstream.server.streams.generation import Generations
from tokenstream.server.streams.settings import EngineSettings

# Events read per store round trip; a watcher further behind catches up in several batches.
EVENT_BATCH_LIMIT = 1000
# Events after which the watcher's own membership is checked again at once.
_MEMBERSHIP_EVENTS = frozenset({"member_removed", "member_added"})


class ConversationWatch:
    """One watcher's position in a conversation's events (and in its streams' tokens).

    Events go out in order, all the missed ones at once. With `include_tokens`, each stream's
    chunks go out after its `prompt_submitted` event and before its `stream_ended` event, so a
    second device mirrors the chat from this one call. Like a subscription, nothing is
    buffered per watcher: each wake-up reads whatever is newer than what it sent.
    """

    def __init__(
        self,
        repository: StreamRepository,
        generations: Generations,
        settings: EngineSettings,
        conversation_id: str,
        from_event_seq: int,
        *,
        include_tokens: bool = False,
        from_seq_by_stream: Mapping[str, int] | None = None,
        changes: ChangeFeed,
        check_access: Callable[[], Awaitable[object]],
    ) -> None:
        self._repository = repository
        self._generations = generations
        self._settings = settings
        self._conversation_id = conversation_id
        self._seq = from_event_seq
        self._include_tokens = include_tokens
        self._resume_at = dict(from_seq_by_stream or {})
        self._changes = changes
        self._check_access = check_access
        # Streams whose tokens are being sent: stream id -> next seq to send.
        self._following: dict[str, int] = {}
        # Streams whose prompt_submitted event this watch has sent (it started later).
        self._announced: set[str] = set()
        # Streams whose stream_ended event this watch has sent.
        self._ended: set[str] = set()
        # Until caught up once, streams that started before from_event_seq are not known.
        self._found_earlier_streams = not include_tokens

    async def events(self) -> AsyncGenerator[WatchEvent, None]:
        loop = asyncio.get_running_loop()
        heartbeat_interval = self._settings.heartbeat_interval
        last_sent = last_checked = loop.time()
        while True:
            if loop.time() - last_checked >= heartbeat_interval:
                # Still a member? Checked on a timer, busy or quiet: a removed member's
                # watch ends within a heartbeat interval however much it is sent.
                await self._check_access()
                last_checked = loop.time()
            # Taken before reading, so no change is missed.
            changed = self._changes.conversation(self._conversation_id)
            active = (
                None
                if self._found_earlier_streams
                else await guarded(self._repository.active_streams(self._conversation_id))
            )
            events, head = await _read_events(self._repository, self._conversation_id, self._seq)
            sent = False
            async for message in self._deliver(events):
                yield message
                sent = True
            if any(e.kind in _MEMBERSHIP_EVENTS for e in events):
                await self._check_access()  # the watcher may be the one who left
                last_checked = loop.time()
            if active is not None and len(events) < EVENT_BATCH_LIMIT:
                if self._seq <= head + 1:
                    # Caught up after listing: an active stream not announced by now started
                    # before from_event_seq (its prompt event is older than the listing).
                    for stream_id in active:
                        if stream_id not in self._announced and stream_id not in self._ended:
                            self._follow(stream_id)
                # (A from_event_seq past the head waits for events; streams running now
                # are followed only if their end falls in the watched range.)
                self._found_earlier_streams = True
                self._announced.clear()  # needed only until now
                self._ended.clear()
            for stream_id in list(self._following):
                for chunk in await self._new_chunks(stream_id):
                    yield StreamTokens(stream_id, chunk)
                    sent = True
            if sent:
                last_sent = loop.time()
                continue  # there may be more right away
            if loop.time() - last_sent >= heartbeat_interval:
                yield WatchHeartbeat(head, datetime.now(UTC))
                last_sent = loop.time()
            quiet_left = heartbeat_interval - (loop.time() - last_sent)
            # Woken by this conversation's changes, here or (notified) on another replica;
            # the poll only covers a lost notification.
            await wait_for_change(changed, min(quiet_left, self._settings.store_poll_interval))

    async def _deliver(
        self, events: list[ConversationEvent]
    ) -> AsyncGenerator[EventBatch | StreamTokens, None]:
        """The events as batches, with each ended stream's last tokens before its end."""
        batch: list[ConversationEvent] = []
        for event in events:
            stream_id = str(event.data.get("stream_id", ""))
            if self._include_tokens and event.kind == "stream_ended":
                # Its last tokens come first (all of them if it started before this watch).
                if batch:
                    yield EventBatch(batch)
                    batch = []
                self._follow(stream_id)
                final_seq = event.data.get("final_seq", -1)
                assert isinstance(final_seq, int)
                while self._following[stream_id] <= final_seq:
                    # From the store: the ending is committed there, while this process's
                    # memory may not have its last tokens yet.
                    chunks = await self._new_chunks(stream_id, from_store=True)
                    if not chunks:
                        break  # purged meanwhile: the end still says where it stopped
                    for chunk in chunks:
                        yield StreamTokens(stream_id, chunk)
                del self._following[stream_id]
                if not self._found_earlier_streams:
                    self._ended.add(stream_id)
            batch.append(event)
            self._seq = event.seq + 1
            if self._include_tokens and event.kind == "prompt_submitted":
                if not self._found_earlier_streams:
                    self._announced.add(stream_id)
                self._follow(stream_id)
        if batch:
            yield EventBatch(batch)

    def _follow(self, stream_id: str) -> None:
        """Starts sending the stream's tokens, from where the watcher said it stands."""
        self._following.setdefault(stream_id, self._resume_at.get(stream_id, 0))

    async def _new_chunks(self, stream_id: str, *, from_store: bool = False) -> list[Chunk]:
        """The stream's durable tokens not sent yet: from this process's memory when it
        generates the stream and has them, else from the store."""
        seq = self._following[stream_id]
        max_chars = self._settings.max_chunk_chars
        live = self._generations.live.get(stream_id)
        if live is not None and seq >= live.base_seq and not from_store:
            chunks = list(live.chunks(seq, max_chars))
        else:
            try:
                chunks = await stored_chunks(self._repository, stream_id, seq, max_chars)
            except NotFound:
                chunks = []  # purged: its end (or nothing) follows
        if chunks:
            self._following[stream_id] = chunks[-1].end_seq + 1
        return chunks


async def _read_events(
    repository: StreamRepository, conversation_id: str, from_seq: int
) -> tuple[list[ConversationEvent], int]:
    try:
        return await guarded(repository.read_events(conversation_id, from_seq, EVENT_BATCH_LIMIT))
    except storage_errors.NotFound as exc:
        raise conversation_not_found(conversation_id) from exc
