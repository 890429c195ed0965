"""What a subscription yields: chunks of tokens, heartbeats, and one end."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from tokenstream.server.domain import Chunk, ConversationEvent, StreamRecord, StreamState


@dataclass(frozen=True, slots=True)
class Heartbeat:
    head_seq: int
    state: StreamState
    at: datetime


@dataclass(frozen=True, slots=True)
class End:
    state: StreamState
    final_seq: int
    reason: str = ""
    error: str = ""

    @classmethod
    def of(cls, record: StreamRecord) -> End:
        return cls(record.state, record.head_seq, record.reason, record.error)


StreamEvent = Chunk | Heartbeat | End


@dataclass(frozen=True, slots=True)
class EventBatch:
    """Consecutive conversation events (everything missed, when catching up)."""

    events: list[ConversationEvent]


@dataclass(frozen=True, slots=True)
class WatchHeartbeat:
    head_event_seq: int
    at: datetime


@dataclass(frozen=True, slots=True)
class StreamTokens:
    """Tokens of one stream of a watched conversation."""

    stream_id: str
    chunk: Chunk


WatchEvent = EventBatch | WatchHeartbeat | StreamTokens
