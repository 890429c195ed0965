"""The storage interface the stream engine depends on."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from tokenstream.server.domain import (
    Conversation,
    ConversationEvent,
    Ending,
    Member,
    Role,
    StreamRecord,
    StreamState,
    TokenRun,
    Turn,
)
from tokenstream.server.storage.errors import StorageError


@dataclass(frozen=True, slots=True)
class NewStream:
    """A stream to create (and its conversation, when `new_conversation`)."""

    stream_id: str
    conversation_id: str
    new_conversation: bool
    prompt: str
    model: str
    max_tokens: int
    request_id: str | None
    request_hash: str | None
    created_at: datetime
    # The generating server's claim on the stream (see `renew_leases`).
    owner_id: str | None = None
    lease_expires_at: datetime | None = None
    # Who submits it; for a new conversation, its first owner (None: unauthenticated).
    author: str | None = None

    def record(self) -> StreamRecord:
        """The stream as stored right after its creation."""
        return StreamRecord(
            stream_id=self.stream_id,
            conversation_id=self.conversation_id,
            prompt=self.prompt,
            model=self.model,
            max_tokens=self.max_tokens,
            request_id=self.request_id,
            request_hash=self.request_hash,
            state=StreamState.RUNNING,
            head_seq=-1,
            created_at=self.created_at,
            author=self.author,
        )

    def events(self) -> list[NewEvent]:
        """The conversation events its creation writes."""
        return [
            NewEvent(self.conversation_id, self.created_at, self.author, "prompt_submitted",
                     {"stream_id": self.stream_id, "prompt": self.prompt}),
            NewEvent(self.conversation_id, self.created_at, self.author, "stream_started",
                     {"stream_id": self.stream_id, "model": self.model}),
        ]  # fmt: skip


@dataclass(frozen=True, slots=True)
class NewEvent:
    """A conversation event to store; the store numbers it (see ConversationEvent)."""

    conversation_id: str
    at: datetime
    actor: str | None
    kind: str
    data: dict[str, object]


def ending_event(
    conversation_id: str, stream_id: str, ending: Ending, final_seq: int, at: datetime
) -> NewEvent:
    return NewEvent(conversation_id, at, None, "stream_ended", {
        "stream_id": stream_id,
        "state": ending.state.value,
        "final_seq": final_seq,
        "reason": ending.reason,
    })  # fmt: skip


def member_added_event(
    conversation_id: str, user_id: str, role: Role, at: datetime, actor: str | None
) -> NewEvent:
    return NewEvent(
        conversation_id, at, actor, "member_added", {"user_id": user_id, "role": role.name}
    )


def member_removed_event(
    conversation_id: str, user_id: str, at: datetime, actor: str | None
) -> NewEvent:
    return NewEvent(conversation_id, at, actor, "member_removed", {"user_id": user_id})


@dataclass(frozen=True, slots=True)
class PurgeResult:
    streams: int
    conversations: int


@dataclass(slots=True)
class WriteBatch:
    """Everything one group commit writes, in one transaction.

    `creations` come first (each on its own: one that fails does not fail the others),
    then `runs` are appended, then `endings` are applied; an ending compacts the stream's
    runs into one row (full text plus token boundaries) and deletes them.
    """

    at: datetime
    creations: list[NewStream] = field(default_factory=list)
    runs: list[tuple[str, TokenRun]] = field(default_factory=list)
    endings: list[tuple[str, Ending]] = field(default_factory=list)
    # The whole response of an ending stream, from seq 0, when the writer holds it in memory:
    # it spares reading back a run per commit (a model-paced stream has a run per token).
    # Used only when it ends where the stream's stored tokens (this batch's included) end;
    # else read back.
    responses: dict[str, TokenRun] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Turns:
    turns: list[Turn]
    # The newest conversation event when the turns were read (-1: none), so a reader can
    # watch from the next one without a gap between this snapshot and the live events.
    head_event_seq: int


@dataclass(slots=True)
class CommitResult:
    # The record of every stream of the batch that is terminal after it.
    terminal: dict[str, StreamRecord] = field(default_factory=dict)
    # Per creation (by stream id): the new record, or why it was not created
    # (NotFound: no such conversation; AlreadyExists: the request id is taken).
    created: dict[str, StreamRecord | StorageError] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StoreChange:
    """What another process wrote (see `StreamRepository.listen`): enough to wake readers.

    `tokens` maps streams given new tokens to their stored head seq; `ended` are streams
    that reached a terminal state; `conversations` are those with new events or with new
    tokens in one of their streams.
    """

    tokens: dict[str, int] = field(default_factory=dict)
    ended: frozenset[str] = frozenset()
    conversations: frozenset[str] = frozenset()

    @property
    def streams(self) -> set[str]:
        return set(self.tokens) | self.ended


# Called with each change another process made; None when changes may have been missed
# (the listener lost its connection): every reader should look again.
ChangeHandler = Callable[[StoreChange | None], None]


class StreamRepository(Protocol):
    async def create_stream(self, new: NewStream) -> StreamRecord:
        """Creates the stream (and its conversation if new).

        Raises NotFound when an existing conversation is named but missing, and AlreadyExists
        when the request id is taken.
        """
        ...

    async def get_stream(self, stream_id: str) -> StreamRecord:
        """Raises NotFound."""
        ...

    async def find_by_request_id(self, request_id: str) -> StreamRecord | None: ...

    async def conversation_exists(self, conversation_id: str) -> bool: ...

    async def commit(self, batch: WriteBatch) -> CommitResult:
        """Writes the batch in one transaction.

        Runs for a stream that has already ended are not stored (its record in
        `terminal` says where its tokens stop), and an ending for such a stream changes
        nothing: the first ending wins. Streams of the batch absent from `terminal` are
        still active and all their runs are stored.
        """
        ...

    async def read_runs(self, stream_id: str, from_seq: int, max_chars: int) -> list[TokenRun]:
        """Stored tokens from `from_seq` on, as consecutive runs.

        Stops after the run that brings the text past `max_chars` (so at least one run is
        returned when any token at or after `from_seq` is stored). A finished stream is one run.
        """
        ...

    async def list_turns(self, conversation_id: str, after: int, limit: int) -> Turns:
        """Turns with cursor > `after`, oldest first, and the newest conversation event's seq
        as of the same read. Raises NotFound for no conversation."""
        ...

    async def active_streams(self, conversation_id: str) -> list[str]:
        """Ids of the conversation's PENDING/RUNNING streams, oldest first."""
        ...

    async def end_active_streams(self, ending: Ending, at: datetime) -> list[str]:
        """Ends every PENDING/RUNNING stream (crash recovery); returns their ids."""
        ...

    async def renew_leases(self, owner_id: str, stream_ids: Sequence[str], until: datetime) -> int:
        """Extends the leases of `owner_id` on the given active streams; returns how many.

        Only streams the owner is actually generating are named, so a stream it created but
        never started (or lost track of) expires and is swept like any other.
        """
        ...

    async def end_expired_leases(self, now: datetime, ending: Ending) -> list[str]:
        """Ends active streams whose lease ran out before `now` (their server is gone), and
        active streams with no lease at all (made before leases existed)."""
        ...

    async def purge_finished(self, before: datetime) -> PurgeResult:
        """Deletes streams that ended before `before`, and conversations left empty by it
        that were created before `before`."""
        ...

    async def create_conversation(
        self, conversation_id: str, owner: str | None, at: datetime
    ) -> Conversation: ...

    async def get_conversation(self, conversation_id: str) -> Conversation:
        """Raises NotFound."""
        ...

    async def role_of(self, conversation_id: str, user_id: str) -> Role | None:
        """The user's role, or None when they are not a member (or there is no such
        conversation)."""
        ...

    async def list_conversations(
        self, user_id: str | None, before: int, limit: int
    ) -> list[Conversation]:
        """Conversations `user_id` belongs to (all, for None), newest first, with cursor
        below `before` (0: from the newest)."""
        ...

    async def set_member(
        self,
        conversation_id: str,
        user_id: str,
        role: Role,
        at: datetime,
        actor: str | None = None,
    ) -> Member:
        """Adds the member or changes their role. Raises NotFound."""
        ...

    async def remove_member(
        self, conversation_id: str, user_id: str, actor: str | None = None
    ) -> bool:
        """False when they were not a member."""
        ...

    async def read_events(
        self, conversation_id: str, from_seq: int, limit: int
    ) -> tuple[list[ConversationEvent], int]:
        """Events from `from_seq` on (at most `limit`), and the newest event's seq (-1 for
        none). Raises NotFound."""
        ...

    async def listen(self, on_change: ChangeHandler) -> bool:
        """Starts reporting other processes' writes to `on_change`, until `close()`.

        False when this store cannot tell (one process per store, or no notification
        channel): then other processes' writes are found only by reading.
        """
        ...

    async def close(self) -> None: ...
