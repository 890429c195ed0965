"""What the client returns: plain, typed values (no protobuf messages)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime

from tokenstream.v1 import tokenstream_pb2 as pb


def state_name(value: pb.StreamState.ValueType) -> str:
    """`STREAM_STATE_COMPLETED` -> `COMPLETED`."""
    return pb.StreamState.Name(value).removeprefix("STREAM_STATE_")


@dataclass(frozen=True, slots=True)
class Submitted:
    stream_id: str
    conversation_id: str
    model: str


@dataclass(frozen=True, slots=True)
class Chunk:
    """Tokens `start_seq..end_seq` (inclusive), concatenated in `text`."""

    start_seq: int
    end_seq: int
    text: str


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """How the stream ended: the last item `stream()` yields."""

    state: str  # COMPLETED, CANCELLED or FAILED
    final_seq: int  # -1 when the stream has no token
    reason: str = ""  # for FAILED: interrupted, shutdown, model_error, timeout, ...
    error: str = ""


@dataclass(frozen=True, slots=True)
class CancelResult:
    state: str
    final_seq: int


@dataclass(frozen=True, slots=True)
class Turn:
    stream_id: str
    prompt: str
    response: str
    state: str
    model: str
    head_seq: int
    created_at: datetime
    finished_at: datetime | None
    reason: str
    error: str

    @classmethod
    def from_proto(cls, turn: pb.Turn) -> Turn:
        return cls(
            stream_id=turn.stream_id,
            prompt=turn.prompt,
            response=turn.response,
            state=state_name(turn.state),
            model=turn.model,
            head_seq=turn.head_seq,
            created_at=turn.created_at.ToDatetime(tzinfo=UTC),
            finished_at=(
                turn.finished_at.ToDatetime(tzinfo=UTC) if turn.HasField("finished_at") else None
            ),
            reason=turn.reason,
            error=turn.error,
        )


@dataclass(frozen=True, slots=True)
class StreamInfo:
    conversation_id: str
    turn: Turn


@dataclass(frozen=True, slots=True)
class Reconnect:
    """Passed to `on_reconnect`: why the client is about to reconnect, and where to."""

    attempt: int  # consecutive attempts without progress, from 1
    error: str
    target: str
    from_seq: int
    delay: float


def role_name(value: pb.Role.ValueType) -> str:
    """`ROLE_OWNER` -> `OWNER`."""
    return pb.Role.Name(value).removeprefix("ROLE_")


@dataclass(frozen=True, slots=True)
class Member:
    user_id: str
    role: str  # OWNER, MEMBER or VIEWER
    added_at: datetime

    @classmethod
    def from_proto(cls, member: pb.Member) -> Member:
        return cls(member.user_id, role_name(member.role), member.added_at.ToDatetime(tzinfo=UTC))


@dataclass(frozen=True, slots=True)
class Conversation:
    conversation_id: str
    created_at: datetime
    members: tuple[Member, ...]

    @classmethod
    def from_proto(cls, conversation: pb.Conversation) -> Conversation:
        return cls(
            conversation.conversation_id,
            conversation.created_at.ToDatetime(tzinfo=UTC),
            tuple(Member.from_proto(m) for m in conversation.members),
        )


@dataclass(frozen=True, slots=True)
class ConversationEvent:
    """Something that happened in a conversation, as `watch()` yields it.

    `kind` is prompt_submitted, stream_started, stream_ended, member_added or member_removed;
    the fields that do not apply to it keep their defaults.
    """

    seq: int
    at: datetime
    actor: str
    kind: str
    stream_id: str = ""
    prompt: str = ""  # prompt_submitted
    model: str = ""  # stream_started
    state: str = ""  # stream_ended: COMPLETED, CANCELLED or FAILED
    final_seq: int = -1  # stream_ended
    reason: str = ""  # stream_ended, for FAILED
    user_id: str = ""  # member_added, member_removed
    role: str = ""  # member_added

    @classmethod
    def from_proto(cls, event: pb.ConversationEvent) -> ConversationEvent:
        kind = str(event.WhichOneof("kind"))
        base = cls(event.seq, event.time.ToDatetime(tzinfo=UTC), event.actor, kind)
        if kind == "prompt_submitted":
            submitted = event.prompt_submitted
            return replace(base, stream_id=submitted.stream_id, prompt=submitted.prompt)
        if kind == "stream_started":
            started = event.stream_started
            return replace(base, stream_id=started.stream_id, model=started.model)
        if kind == "stream_ended":
            ended = event.stream_ended
            return replace(
                base,
                stream_id=ended.stream_id,
                state=state_name(ended.state),
                final_seq=ended.final_seq,
                reason=ended.reason,
            )
        if kind == "member_added":
            added = event.member_added
            return replace(base, user_id=added.user_id, role=role_name(added.role))
        if kind == "member_removed":
            return replace(base, user_id=event.member_removed.user_id)
        return base  # a kind newer than this client: seq and time still count


@dataclass(frozen=True, slots=True)
class StreamTokens:
    """Tokens of one stream of a watched conversation (`watch(include_tokens=True)`)."""

    stream_id: str
    chunk: Chunk
