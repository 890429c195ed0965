"""Plain data shared by the engine, storage and transport: no gRPC, no SQL."""

from __future__ import annotations

import enum
import sys
from array import array
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import pairwise


class StreamState(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({StreamState.COMPLETED, StreamState.CANCELLED, StreamState.FAILED})
ACTIVE_STATES = (StreamState.PENDING, StreamState.RUNNING)


class Role(enum.IntEnum):
    """What a member may do; a higher value may do less (OWNER < MEMBER < VIEWER)."""

    OWNER = 1
    MEMBER = 2
    VIEWER = 3

    def allows(self, needed: Role) -> bool:
        return self <= needed


class CancelPolicy(enum.StrEnum):
    """Who may cancel a stream besides nobody: a server-wide policy."""

    AUTHOR_OR_OWNER = "author-or-owner"  # the default
    OWNER = "owner"  # owners only, even for their members' streams
    MEMBER = "member"  # anyone who may submit (owners and members, not viewers)

    def allows(self, role: Role, is_author: bool) -> bool:
        if self is CancelPolicy.AUTHOR_OR_OWNER:
            return is_author or role is Role.OWNER
        if self is CancelPolicy.OWNER:
            return role is Role.OWNER
        return role.allows(Role.MEMBER)

    def describe(self) -> str:
        return {
            CancelPolicy.AUTHOR_OR_OWNER: "its author or the conversation's owners",
            CancelPolicy.OWNER: "the conversation's owners",
            CancelPolicy.MEMBER: "the conversation's owners and members (not viewers)",
        }[self]

    @property
    def refusal_reason(self) -> str:
        """The ErrorInfo reason of a refusal: role-only policies refuse like other role
        checks; the default keeps the reason it has always had."""
        return "NOT_AUTHOR_OR_OWNER" if self is CancelPolicy.AUTHOR_OR_OWNER else "ROLE_TOO_LOW"


class EndReason:
    """Short causes of FAILED streams, part of the public contract (StreamEnd.reason)."""

    INTERRUPTED = "interrupted"
    SHUTDOWN = "shutdown"
    MODEL_ERROR = "model_error"
    TIMEOUT = "timeout"


@dataclass(frozen=True, slots=True)
class Chunk:
    """Tokens ``start_seq..end_seq`` (inclusive), concatenated."""

    start_seq: int
    end_seq: int
    text: str


@dataclass(frozen=True, slots=True)
class TokenRun:
    """Consecutive tokens stored as one text plus the end offset of each token.

    Storage keeps tokens this way (one row per commit batch, and one row for a whole
    finished stream), so any ``from_seq`` can be served by slicing, without a row per token.
    """

    start_seq: int
    text: str
    ends: Sequence[int]  # ends[i] = offset in `text` just past token start_seq + i

    @classmethod
    def from_tokens(cls, start_seq: int, tokens: Sequence[str]) -> TokenRun:
        ends = array("I")
        offset = 0
        for token in tokens:
            offset += len(token)
            ends.append(offset)
        return cls(start_seq, "".join(tokens), ends)

    @property
    def end_seq(self) -> int:
        return self.start_seq + len(self.ends) - 1

    def offset_of(self, seq: int) -> int:
        """Offset in `text` where token `seq` starts."""
        index = seq - self.start_seq
        return 0 if index == 0 else self.ends[index - 1]

    def chunks(self, from_seq: int, max_chars: int) -> Iterator[Chunk]:
        """Tokens from `from_seq` on, as chunks of at most `max_chars` (at least one token)."""
        seq = max(from_seq, self.start_seq)
        while seq <= self.end_seq:
            base = self.offset_of(seq)
            last = self.start_seq + bisect_right(self.ends, base + max_chars) - 1
            last = max(last, seq)
            stop = self.ends[last - self.start_seq]
            yield Chunk(seq, last, self.text[base:stop])
            seq = last + 1

    def encode_ends(self) -> bytes:
        return encode_ends(self.ends)


def encode_ends(ends: Sequence[int]) -> bytes:
    packed = ends if isinstance(ends, array) and ends.typecode == "I" else array("I", ends)
    if sys.byteorder == "big":  # stored little-endian on every platform
        packed = array("I", packed)
        packed.byteswap()
    return packed.tobytes()


def decode_ends(data: bytes) -> array[int]:
    ends = array("I")
    ends.frombytes(data)
    if sys.byteorder == "big":
        ends.byteswap()
    return ends


def join_runs(runs: Sequence[TokenRun]) -> TokenRun:
    """Concatenates consecutive runs into one (used to compact a finished stream)."""
    if not runs:
        return TokenRun(0, "", array("I"))
    ends = array("I")
    offset = 0
    for previous, run in pairwise(runs):
        if run.start_seq != previous.end_seq + 1:
            raise ValueError(f"runs are not consecutive: {previous.end_seq} then {run.start_seq}")
    for run in runs:
        ends.extend(offset + end for end in run.ends)
        offset += len(run.text)
    return TokenRun(runs[0].start_seq, "".join(run.text for run in runs), ends)


@dataclass(frozen=True, slots=True)
class StreamRecord:
    """A response stream as stored: its prompt, where it is, and how it ended."""

    stream_id: str
    conversation_id: str
    prompt: str
    model: str
    max_tokens: int
    request_id: str | None
    request_hash: str | None
    state: StreamState
    head_seq: int  # last durable token, -1 if none; the final seq once terminal
    created_at: datetime
    finished_at: datetime | None = None
    reason: str = ""
    error: str = ""
    author: str | None = None  # the user who submitted it (None: unauthenticated)


@dataclass(frozen=True, slots=True)
class Turn:
    """One prompt and its response text, for history."""

    stream: StreamRecord
    response: str
    cursor: int  # position in the conversation, for pagination


@dataclass(frozen=True, slots=True)
class Ending:
    """How a stream ends: written once, when it leaves PENDING/RUNNING."""

    state: StreamState
    reason: str = ""
    error: str = ""
    # Release the stream's request_id, so a retry of the request starts a new stream.
    forget_request: bool = False


@dataclass(frozen=True, slots=True)
class Member:
    user_id: str
    role: Role
    added_at: datetime


@dataclass(frozen=True, slots=True)
class Conversation:
    conversation_id: str
    created_at: datetime
    members: tuple[Member, ...]
    cursor: int  # position among conversations, for pagination

    def is_last_owner(self, user_id: str) -> bool:
        """True when `user_id` is its only owner: they cannot leave or stop being one."""
        return {m.user_id for m in self.members if m.role is Role.OWNER} == {user_id}


@dataclass(frozen=True, slots=True)
class ConversationEvent:
    """Something that happened in a conversation; `kind` names it and `data` describes it:

    prompt_submitted {stream_id, prompt}, stream_started {stream_id, model},
    stream_ended {stream_id, state, final_seq, reason}, member_added {user_id, role},
    member_removed {user_id}.
    """

    seq: int
    at: datetime
    actor: str | None
    kind: str
    data: dict[str, object]
