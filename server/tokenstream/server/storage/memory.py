"""An in-memory repository with the same behaviour as the SQL one, for engine unit tests."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from tokenstream.server.domain import (
    Conversation,
    ConversationEvent,
    Ending,
    Member,
    Role,
    StreamRecord,
    TokenRun,
    Turn,
    join_runs,
)
from tokenstream.server.storage.errors import AlreadyExists, NotFound
from tokenstream.server.storage.repository import (
    ChangeHandler,
    CommitResult,
    NewEvent,
    NewStream,
    PurgeResult,
    Turns,
    WriteBatch,
    ending_event,
    member_added_event,
    member_removed_event,
)


@dataclass(slots=True)
class _Stream:
    record: StreamRecord
    cursor: int
    runs: list[TokenRun] = field(default_factory=list)
    compacted: TokenRun | None = None
    owner_id: str | None = None
    lease_expires_at: datetime | None = None


class MemoryStreamRepository:
    def __init__(self) -> None:
        self._streams: dict[str, _Stream] = {}
        self._conversations: set[str] = set()
        self._conversation_created: dict[str, datetime] = {}
        self._conversation_cursor: dict[str, int] = {}
        self._members: dict[str, dict[str, Member]] = {}
        self._events: dict[str, list[ConversationEvent]] = {}
        self._request_ids: dict[str, str] = {}
        self._next_cursor = 1
        self.commits = 0  # visible to tests: how many group commits reached the store
        # Tests set this to make the next commit fail once (a transient database error).
        self.fail_next_commit: Exception | None = None

    async def listen(self, on_change: ChangeHandler) -> bool:
        return False  # one process: it knows its own writes

    async def close(self) -> None:
        pass

    async def create_stream(self, new: NewStream) -> StreamRecord:
        await asyncio.sleep(0)
        return self._create(new)

    def _create(self, new: NewStream) -> StreamRecord:
        if new.new_conversation:
            if new.conversation_id in self._conversations:
                raise AlreadyExists(new.conversation_id)
        elif new.conversation_id not in self._conversations:
            raise NotFound(new.conversation_id)
        if new.stream_id in self._streams or (
            new.request_id is not None and new.request_id in self._request_ids
        ):
            raise AlreadyExists(new.request_id or new.stream_id)
        if new.new_conversation:
            self._add_conversation(new.conversation_id, new.author, new.created_at)
        record = new.record()
        for event in new.events():
            self._event(event)
        self._streams[new.stream_id] = _Stream(
            record, self._next_cursor, owner_id=new.owner_id, lease_expires_at=new.lease_expires_at
        )
        self._next_cursor += 1
        if new.request_id is not None:
            self._request_ids[new.request_id] = new.stream_id
        return record

    async def get_stream(self, stream_id: str) -> StreamRecord:
        await asyncio.sleep(0)
        return self._get(stream_id).record

    async def find_by_request_id(self, request_id: str) -> StreamRecord | None:
        stream_id = self._request_ids.get(request_id)
        return None if stream_id is None else self._streams[stream_id].record

    async def conversation_exists(self, conversation_id: str) -> bool:
        return conversation_id in self._conversations

    async def commit(self, batch: WriteBatch) -> CommitResult:
        await asyncio.sleep(0)
        if self.fail_next_commit is not None:
            error, self.fail_next_commit = self.fail_next_commit, None
            raise error
        touched = [stream_id for stream_id, _ in batch.runs]
        touched += [stream_id for stream_id, _ in batch.endings]
        for stream_id in touched:  # all or nothing, like a transaction
            if stream_id not in self._streams and all(
                new.stream_id != stream_id for new in batch.creations
            ):
                raise NotFound(stream_id)
        result = CommitResult()
        for new in batch.creations:
            try:
                result.created[new.stream_id] = self._create(new)
            except (NotFound, AlreadyExists) as exc:
                result.created[new.stream_id] = exc
        active = {sid for sid in touched if not self._streams[sid].record.state.is_terminal}
        self.commits += 1
        for stream_id, run in batch.runs:
            if stream_id in active:
                stream = self._streams[stream_id]
                if run.start_seq != stream.record.head_seq + 1:
                    raise ValueError(
                        f"run {run.start_seq} does not follow {stream.record.head_seq}"
                    )
                stream.runs.append(run)
                stream.record = replace(stream.record, head_seq=run.end_seq)
        for stream_id, ending in batch.endings:
            if stream_id in active:
                self._end(stream_id, ending, batch.at)
                active.discard(stream_id)
        result.terminal.update(
            (sid, self._streams[sid].record) for sid in touched if sid not in active
        )
        return result

    async def read_runs(self, stream_id: str, from_seq: int, max_chars: int) -> list[TokenRun]:
        await asyncio.sleep(0)
        stream = self._get(stream_id)
        if stream.compacted is not None:
            return [stream.compacted]
        runs, chars = [], 0
        for run in stream.runs:
            if run.end_seq >= from_seq and chars < max_chars:
                runs.append(run)
                chars += len(run.text)
        return runs

    async def list_turns(self, conversation_id: str, after: int, limit: int) -> Turns:
        if conversation_id not in self._conversations:
            raise NotFound(conversation_id)
        chosen = sorted(
            (s for s in self._streams.values() if s.record.conversation_id == conversation_id),
            key=lambda s: s.cursor,
        )
        turns = [
            Turn(s.record, (s.compacted or join_runs(s.runs)).text, s.cursor)
            for s in chosen
            if s.cursor > after
        ][:limit]
        return Turns(turns, len(self._events.get(conversation_id, [])) - 1)

    async def end_active_streams(self, ending: Ending, at: datetime) -> list[str]:
        return [sid for sid in list(self._streams) if self._end(sid, ending, at)]

    async def renew_leases(self, owner_id: str, stream_ids: Sequence[str], until: datetime) -> int:
        named = set(stream_ids)
        mine = [
            s
            for sid, s in self._streams.items()
            if sid in named and s.owner_id == owner_id and not s.record.state.is_terminal
        ]
        for stream in mine:
            stream.lease_expires_at = until
        return len(mine)

    async def end_expired_leases(self, now: datetime, ending: Ending) -> list[str]:
        expired = [
            sid
            for sid, s in self._streams.items()
            if not s.record.state.is_terminal
            and (s.lease_expires_at is None or s.lease_expires_at < now)
        ]
        return [sid for sid in expired if self._end(sid, ending, now)]

    async def purge_finished(self, before: datetime) -> PurgeResult:
        old = [
            sid
            for sid, s in self._streams.items()
            if s.record.finished_at is not None and s.record.finished_at < before
        ]
        for sid in old:
            stream = self._streams.pop(sid)
            if stream.record.request_id is not None:
                self._request_ids.pop(stream.record.request_id, None)
        in_use = {s.record.conversation_id for s in self._streams.values()}
        empty = [
            c
            for c in self._conversations
            if c not in in_use and self._conversation_created.get(c, before) < before
        ]
        self._conversations.difference_update(empty)
        for conversation_id in empty:
            self._members.pop(conversation_id, None)
            self._events.pop(conversation_id, None)
        return PurgeResult(len(old), len(empty))

    async def create_conversation(
        self, conversation_id: str, owner: str | None, at: datetime
    ) -> Conversation:
        if conversation_id in self._conversations:
            raise AlreadyExists(conversation_id)
        self._add_conversation(conversation_id, owner, at)
        return await self.get_conversation(conversation_id)

    async def get_conversation(self, conversation_id: str) -> Conversation:
        if conversation_id not in self._conversations:
            raise NotFound(conversation_id)
        people = sorted(self._members[conversation_id].values(), key=lambda m: (m.role, m.user_id))
        return Conversation(
            conversation_id,
            self._conversation_created[conversation_id],
            tuple(people),
            self._conversation_cursor[conversation_id],
        )

    async def active_streams(self, conversation_id: str) -> list[str]:
        return [
            sid
            for sid, s in self._streams.items()
            if s.record.conversation_id == conversation_id and not s.record.state.is_terminal
        ]

    async def role_of(self, conversation_id: str, user_id: str) -> Role | None:
        member = self._members.get(conversation_id, {}).get(user_id)
        return None if member is None else member.role

    async def list_conversations(
        self, user_id: str | None, before: int, limit: int
    ) -> list[Conversation]:
        chosen = sorted(
            (
                c
                for c in self._conversations
                if (user_id is None or user_id in self._members[c])
                and (not before or self._conversation_cursor[c] < before)
            ),
            key=lambda c: -self._conversation_cursor[c],
        )
        return [await self.get_conversation(c) for c in chosen[:limit]]

    async def set_member(
        self,
        conversation_id: str,
        user_id: str,
        role: Role,
        at: datetime,
        actor: str | None = None,
    ) -> Member:
        if conversation_id not in self._conversations:
            raise NotFound(conversation_id)
        member = self._members[conversation_id][user_id] = Member(user_id, role, at)
        self._event(member_added_event(conversation_id, user_id, role, at, actor))
        return member

    async def remove_member(
        self, conversation_id: str, user_id: str, actor: str | None = None
    ) -> bool:
        if self._members.get(conversation_id, {}).pop(user_id, None) is None:
            return False
        self._event(member_removed_event(conversation_id, user_id, datetime.now(UTC), actor))
        return True

    async def read_events(
        self, conversation_id: str, from_seq: int, limit: int
    ) -> tuple[list[ConversationEvent], int]:
        await asyncio.sleep(0)
        if conversation_id not in self._conversations:
            raise NotFound(conversation_id)
        events = self._events.get(conversation_id, [])
        return [e for e in events if e.seq >= from_seq][:limit], len(events) - 1

    def _event(self, event: NewEvent) -> None:
        events = self._events.setdefault(event.conversation_id, [])
        events.append(ConversationEvent(len(events), event.at, event.actor, event.kind, event.data))

    def _add_conversation(self, conversation_id: str, owner: str | None, at: datetime) -> None:
        self._conversations.add(conversation_id)
        self._conversation_created[conversation_id] = at
        self._conversation_cursor[conversation_id] = self._next_cursor
        self._next_cursor += 1
        self._members[conversation_id] = {}
        if owner:
            self._members[conversation_id][owner] = Member(owner, Role.OWNER, at)

    def _get(self, stream_id: str) -> _Stream:
        try:
            return self._streams[stream_id]
        except KeyError:
            raise NotFound(stream_id) from None

    def _end(self, stream_id: str, ending: Ending, at: datetime) -> bool:
        stream = self._get(stream_id)
        if stream.record.state.is_terminal:
            return False
        full = join_runs(stream.runs)
        stream.compacted, stream.runs = full, []
        stream.lease_expires_at = None
        final_seq = full.end_seq if full.ends else -1
        self._event(ending_event(stream.record.conversation_id, stream_id, ending, final_seq, at))
        if ending.forget_request and stream.record.request_id is not None:
            self._request_ids.pop(stream.record.request_id, None)
        stream.record = replace(
            stream.record,
            state=ending.state,
            reason=ending.reason,
            error=ending.error,
            finished_at=at,
            head_seq=final_seq,
        )
        return True
