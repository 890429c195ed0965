"""Conversion between protobuf messages and domain values."""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from tokenstream.server.domain import (
    Chunk,
    Conversation,
    ConversationEvent,
    Member,
    Role,
    StreamRecord,
    StreamState,
    Turn,
)
from tokenstream.server.streams import End, Heartbeat, StreamEvent
from tokenstream.server.streams.events import EventBatch, StreamTokens, WatchEvent
from tokenstream.v1 import tokenstream_pb2 as pb

_STATES: dict[StreamState, pb.StreamState.ValueType] = {
    StreamState.PENDING: pb.STREAM_STATE_PENDING,
    StreamState.RUNNING: pb.STREAM_STATE_RUNNING,
    StreamState.COMPLETED: pb.STREAM_STATE_COMPLETED,
    StreamState.CANCELLED: pb.STREAM_STATE_CANCELLED,
    StreamState.FAILED: pb.STREAM_STATE_FAILED,
}


def state_to_proto(state: StreamState) -> pb.StreamState.ValueType:
    return _STATES[state]


def timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def event_to_proto(event: StreamEvent) -> pb.SubscribeResponse:
    if isinstance(event, Chunk):
        return pb.SubscribeResponse(chunk=chunk_to_proto(event))
    if isinstance(event, Heartbeat):
        return pb.SubscribeResponse(
            heartbeat=pb.Heartbeat(
                head_seq=event.head_seq,
                state=state_to_proto(event.state),
                server_time=timestamp(event.at),
            )
        )
    assert isinstance(event, End)
    return pb.SubscribeResponse(
        end=pb.StreamEnd(
            state=state_to_proto(event.state),
            final_seq=event.final_seq,
            error=event.error,
            reason=event.reason,
        )
    )


def turn_to_proto(record: StreamRecord, response: str = "") -> pb.Turn:
    turn = pb.Turn(
        stream_id=record.stream_id,
        prompt=record.prompt,
        response=response,
        state=state_to_proto(record.state),
        created_at=timestamp(record.created_at),
        model=record.model,
        head_seq=record.head_seq,
        reason=record.reason,
        error=record.error,
    )
    if record.finished_at is not None:
        turn.finished_at.CopyFrom(timestamp(record.finished_at))
    return turn


def history_turn_to_proto(turn: Turn) -> pb.Turn:
    return turn_to_proto(turn.stream, turn.response)


_ROLES: dict[Role, pb.Role.ValueType] = {
    Role.OWNER: pb.ROLE_OWNER,
    Role.MEMBER: pb.ROLE_MEMBER,
    Role.VIEWER: pb.ROLE_VIEWER,
}
_ROLES_BACK = {value: role for role, value in _ROLES.items()}


def role_from_proto(value: pb.Role.ValueType) -> Role | None:
    return _ROLES_BACK.get(value)


def member_to_proto(member: Member) -> pb.Member:
    return pb.Member(
        user_id=member.user_id, role=_ROLES[member.role], added_at=timestamp(member.added_at)
    )


def conversation_to_proto(conversation: Conversation) -> pb.Conversation:
    return pb.Conversation(
        conversation_id=conversation.conversation_id,
        created_at=timestamp(conversation.created_at),
        members=[member_to_proto(m) for m in conversation.members],
    )


def conversation_event_to_proto(event: ConversationEvent) -> pb.ConversationEvent:
    message = pb.ConversationEvent(seq=event.seq, time=timestamp(event.at), actor=event.actor or "")
    data = event.data
    if event.kind == "prompt_submitted":
        message.prompt_submitted.CopyFrom(
            pb.PromptSubmitted(stream_id=str(data["stream_id"]), prompt=str(data["prompt"]))
        )
    elif event.kind == "stream_started":
        message.stream_started.CopyFrom(
            pb.StreamStarted(stream_id=str(data["stream_id"]), model=str(data["model"]))
        )
    elif event.kind == "stream_ended":
        final_seq = data["final_seq"]
        assert isinstance(final_seq, int)
        message.stream_ended.CopyFrom(
            pb.StreamEnded(
                stream_id=str(data["stream_id"]),
                state=state_to_proto(StreamState(data["state"])),
                final_seq=final_seq,
                reason=str(data["reason"]),
            )
        )
    elif event.kind == "member_added":
        message.member_added.CopyFrom(
            pb.MemberAdded(user_id=str(data["user_id"]), role=_ROLES[Role[str(data["role"])]])
        )
    elif event.kind == "member_removed":
        message.member_removed.CopyFrom(pb.MemberRemoved(user_id=str(data["user_id"])))
    return message


def chunk_to_proto(chunk: Chunk) -> pb.TokenChunk:
    return pb.TokenChunk(start_seq=chunk.start_seq, end_seq=chunk.end_seq, text=chunk.text)


def watch_event_to_proto(event: WatchEvent) -> pb.WatchConversationResponse:
    if isinstance(event, EventBatch):
        return pb.WatchConversationResponse(
            events=pb.ConversationEvents(
                events=[conversation_event_to_proto(e) for e in event.events]
            )
        )
    if isinstance(event, StreamTokens):
        return pb.WatchConversationResponse(
            tokens=pb.StreamTokens(stream_id=event.stream_id, chunk=chunk_to_proto(event.chunk))
        )
    return pb.WatchConversationResponse(
        heartbeat=pb.ConversationHeartbeat(
            head_event_seq=event.head_event_seq, server_time=timestamp(event.at)
        )
    )
