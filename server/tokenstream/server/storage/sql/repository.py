"""The repository on SQLAlchemy Core: one connection per call, never shared.

Each call is a plain function of a `Connection` (one transaction), started from the event
loop with one await (see transactions.py for where it runs on each engine)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import wraps
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy import and_, bindparam, delete, func, insert, or_, select, text, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.elements import BindParameter, ColumnElement

from tokenstream.server.domain import (
    ACTIVE_STATES,
    Conversation,
    ConversationEvent,
    Ending,
    Member,
    Role,
    StreamRecord,
    StreamState,
    TokenRun,
    Turn,
    decode_ends,
    join_runs,
)
from tokenstream.server.storage.errors import (
    AlreadyExists,
    NotFound,
    StorageError,
    StorageUnavailable,
)
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
from tokenstream.server.storage.sql import postgres_tokens
from tokenstream.server.storage.sql.notify import (
    CHANNEL,
    ChangeCollector,
    ChangeListener,
    connect_args,
    encode,
)
from tokenstream.server.storage.sql.schema import (
    conversation_events,
    conversations,
    members,
    streams,
    token_runs,
)
from tokenstream.server.storage.sql.transactions import transactions_for

_ACTIVE = [state.value for state in ACTIVE_STATES]
_RECORD_COLUMNS = [
    streams.c.id,
    streams.c.stream_id,
    streams.c.conversation_id,
    streams.c.prompt,
    streams.c.model,
    streams.c.max_tokens,
    streams.c.request_id,
    streams.c.request_hash,
    streams.c.state,
    streams.c.final_seq,
    streams.c.reason,
    streams.c.error,
    streams.c.created_at,
    streams.c.finished_at,
    streams.c.author,
]

# A brief group commit (see `_is_brief`) writes at most this much. Paced 100 x 50 tok/s
# commits ~60 runs of a token or two, and ~50 endings of 250 tokens when the streams end.
# Full speed commits ~100 runs of ~100 tokens; 1000 streams submitted at once are created
# dozens per commit (brief, each commit would take in only the few that arrived during
# the last: many small commits).
BRIEF_ROWS = 128  # streams created, appended to or ended
BRIEF_CREATIONS = 32
BRIEF_RUN_TOKENS = 1024
BRIEF_RESPONSE_TOKENS = 16_384  # of the ending streams, compacted into their rows

# The statements of the hot paths (group commit, subscribe, resume), built once: building
# and hashing a statement costs more CPU than SQLite takes to run it. Lists bind as
# expanding parameters.
_IDS: BindParameter[Any] = bindparam("ids", expanding=True)
# Most ids in one expanding list (SQLite and asyncpg take at most 32766 / 32767 parameters).
_MAX_IDS = 5000
_ID: BindParameter[Any] = bindparam("stream_id")
# Locks the active streams of a batch (PostgreSQL: no other replica ends them meanwhile),
# in one order everywhere: no deadlocks.
_LOCK_ACTIVE = (
    select(streams.c.stream_id, streams.c.conversation_id)
    .where(streams.c.stream_id.in_(_IDS), streams.c.state.in_(_ACTIVE))
    .order_by(streams.c.id)
    .with_for_update()
)
_INSERT_RUNS = insert(token_runs)
_RUNS_OF = (
    select(token_runs.c.stream_id, token_runs.c.start_seq, token_runs.c.text,
           token_runs.c.token_ends)
    .where(token_runs.c.stream_id.in_(_IDS))
    .order_by(token_runs.c.stream_id, token_runs.c.start_seq)
)  # fmt: skip
_END = update(streams).where(streams.c.stream_id == bindparam("b_stream_id"))
_END_FORGETTING_REQUEST = _END.values(request_id=None)
_DELETE_RUNS = delete(token_runs).where(token_runs.c.stream_id.in_(_IDS))
_RECORDS = select(*_RECORD_COLUMNS).where(streams.c.stream_id.in_(_IDS))
_RECORD = select(*_RECORD_COLUMNS).where(streams.c.stream_id == _ID)
_HEADS = (
    select(token_runs.c.stream_id, func.max(token_runs.c.end_seq))
    .where(token_runs.c.stream_id.in_(_IDS))
    .group_by(token_runs.c.stream_id)
)
# PostgreSQL: a writer holds its conversations' rows until it commits, so two replicas
# never number events from the same head. In one order, and NO KEY UPDATE, which the
# KEY SHARE locks that foreign-key checks took earlier in the transaction do not block:
# no deadlocks.
_LOCK_CONVERSATIONS = (
    select(conversations.c.id)
    .where(conversations.c.conversation_id.in_(_IDS))
    .order_by(conversations.c.id)
    .with_for_update(key_share=True)
)
_EVENT_HEADS = (
    select(conversation_events.c.conversation_id, func.max(conversation_events.c.seq))
    .where(conversation_events.c.conversation_id.in_(_IDS))
    .group_by(conversation_events.c.conversation_id)
)
_INSERT_EVENTS = insert(conversation_events)
_RUN_STATE = select(streams.c.state, streams.c.text, streams.c.token_ends).where(
    streams.c.stream_id == _ID
)
_NOTIFY = text("SELECT pg_notify(:channel, p) FROM unnest(CAST(:payloads AS text[])) p")
_RUNS_FROM = (
    select(token_runs.c.start_seq, token_runs.c.text, token_runs.c.token_ends)
    .where(token_runs.c.stream_id == _ID, token_runs.c.end_seq >= bindparam("from_seq"))
    .order_by(token_runs.c.start_seq)
)


P = ParamSpec("P")
T = TypeVar("T")


def _finish_even_if_cancelled(
    method: Callable[Concatenate[SqlStreamRepository, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[SqlStreamRepository, P], Coroutine[Any, Any, T]]:
    """Runs the call to completion even when its caller is cancelled.

    A database call interrupted half-way (a subscriber disconnecting mid-read, say) leaves
    the driver's connection to be torn down in the background, which can outlive the
    engine; shielded, the call finishes and returns its connection normally, while the
    cancelled caller moves on at once. `close()` waits for such calls before disposing.
    """

    @wraps(method)
    async def shielded(self: SqlStreamRepository, /, *args: P.args, **kwargs: P.kwargs) -> T:
        task = asyncio.ensure_future(method(self, *args, **kwargs))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        return await asyncio.shield(task)

    return shielded


def _is_outage(exc: Exception) -> bool:
    """Connection loss, lock timeouts and pool exhaustion: worth retrying later."""
    if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError | sa_exc.TimeoutError):
        return True
    return isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated


@asynccontextmanager
async def _unavailable_on_outage() -> AsyncIterator[None]:
    try:
        yield
    except sa_exc.SQLAlchemyError as exc:
        if _is_outage(exc):
            raise StorageUnavailable(str(exc)) from exc
        raise


def _stream_row(new: NewStream) -> dict[str, Any]:
    return {
        "stream_id": new.stream_id,
        "conversation_id": new.conversation_id,
        "request_id": new.request_id,
        "request_hash": new.request_hash,
        "prompt": new.prompt,
        "model": new.model,
        "max_tokens": new.max_tokens,
        "state": StreamState.RUNNING.value,
        "created_at": new.created_at,
        "owner_id": new.owner_id,
        "lease_expires_at": new.lease_expires_at,
        "author": new.author,
    }


def _owner_rows(creations: Sequence[NewStream]) -> list[dict[str, Any]]:
    """The first owner of each new conversation: its author."""
    return [
        {
            "conversation_id": n.conversation_id,
            "user_id": n.author,
            "role": int(Role.OWNER),
            "added_at": n.created_at,
        }
        for n in creations
        if n.new_conversation and n.author
    ]


def _append_events(conn: Connection, events: Sequence[NewEvent], changes: ChangeCollector) -> None:
    """Numbers events after each conversation's newest one and stores them."""
    if not events:
        return
    named = list({e.conversation_id: None for e in events})
    changes.conversations.update(named)
    conn.execute(_LOCK_CONVERSATIONS, {"ids": named})
    heads: dict[str, int] = {
        row[0]: int(row[1]) for row in conn.execute(_EVENT_HEADS, {"ids": named})
    }
    rows = []
    for event in events:
        conversation_id = event.conversation_id
        heads[conversation_id] = heads.get(conversation_id, -1) + 1
        rows.append(
            {
                "conversation_id": conversation_id,
                "seq": heads[conversation_id],
                "at": event.at,
                "actor": event.actor,
                "kind": event.kind,
                "data": json.dumps(event.data),
            }
        )
    conn.execute(_INSERT_EVENTS, rows)


def _member(row: Any) -> Member:
    return Member(row.user_id, Role(row.role), row.added_at)


def _record(conn: Connection, row: Any) -> StreamRecord:
    state = StreamState(row.state)
    # A running stream's head is its newest stored run; an ended one's, its final seq.
    head = (
        row.final_seq if state.is_terminal else _stored_heads(conn, [row.stream_id])[row.stream_id]
    )
    return StreamRecord(
        stream_id=row.stream_id,
        conversation_id=row.conversation_id,
        prompt=row.prompt,
        model=row.model,
        max_tokens=row.max_tokens,
        request_id=row.request_id,
        request_hash=row.request_hash,
        state=state,
        head_seq=-1 if head is None else int(head),
        created_at=row.created_at,
        finished_at=row.finished_at,
        reason=row.reason,
        error=row.error,
        author=row.author,
    )


def _conversation_exists(conn: Connection, conversation_id: str) -> bool:
    found = conn.scalar(
        select(conversations.c.id).where(conversations.c.conversation_id == conversation_id)
    )
    return found is not None


def _conversation(conn: Connection, conversation_id: str) -> Conversation:
    row = conn.execute(
        select(conversations.c.id, conversations.c.created_at).where(
            conversations.c.conversation_id == conversation_id
        )
    ).first()
    if row is None:
        raise NotFound(conversation_id)
    people = conn.execute(
        select(members.c.user_id, members.c.role, members.c.added_at)
        .where(members.c.conversation_id == conversation_id)
        .order_by(members.c.role, members.c.user_id)
    )
    return Conversation(conversation_id, row.created_at, tuple(_member(p) for p in people), row.id)


def _create(conn: Connection, new: NewStream, changes: ChangeCollector) -> None:
    if new.new_conversation:
        conn.execute(
            insert(conversations).values(
                conversation_id=new.conversation_id, created_at=new.created_at
            )
        )
        if owners := _owner_rows([new]):
            conn.execute(insert(members), owners)
    elif not _conversation_exists(conn, new.conversation_id):
        raise NotFound(new.conversation_id)
    conn.execute(insert(streams).values(**_stream_row(new)))
    _append_events(conn, new.events(), changes)


def _create_many(
    conn: Connection, creations: list[NewStream], changes: ChangeCollector
) -> dict[str, StreamRecord | StorageError]:
    """Creates many streams with a few statements; one that fails fails alone."""
    named = {new.conversation_id for new in creations if not new.new_conversation}
    known = set(
        conn.scalars(
            select(conversations.c.conversation_id).where(
                conversations.c.conversation_id.in_(named)
            )
        ).all()
        if named
        else ()
    )
    outcome: dict[str, StreamRecord | StorageError] = {}
    valid = []
    for new in creations:
        if new.new_conversation or new.conversation_id in known:
            valid.append(new)
        else:
            outcome[new.stream_id] = NotFound(new.conversation_id)
    try:
        with conn.begin_nested():
            fresh = [
                {"conversation_id": n.conversation_id, "created_at": n.created_at}
                for n in valid
                if n.new_conversation
            ]
            if fresh:
                conn.execute(insert(conversations), fresh)
            if owners := _owner_rows(valid):
                conn.execute(insert(members), owners)
            if valid:
                conn.execute(insert(streams), [_stream_row(n) for n in valid])
                _append_events(conn, [e for n in valid for e in n.events()], changes)
    except sa_exc.DBAPIError as exc:
        if _is_outage(exc):
            raise
        # One of them is refused (e.g. a request id taken by a retry racing its
        # original): one at a time, so only that one fails.
        for new in valid:
            try:
                with conn.begin_nested():
                    _create(conn, new, changes)
                outcome[new.stream_id] = new.record()
            except NotFound as missing:
                outcome[new.stream_id] = missing
            except sa_exc.IntegrityError:
                outcome[new.stream_id] = AlreadyExists(new.request_id or new.stream_id)
            except sa_exc.DBAPIError as refused:
                if _is_outage(refused):
                    raise
                outcome[new.stream_id] = StorageError(f"the store refused it: {refused.orig}")
        return outcome
    outcome.update((new.stream_id, new.record()) for new in valid)
    return outcome


def _runs_of(conn: Connection, ids: Sequence[str]) -> dict[str, list[TokenRun]]:
    """Every stored run of each stream, in seq order (an empty list for none)."""
    runs: dict[str, list[TokenRun]] = {stream_id: [] for stream_id in ids}
    for row in conn.execute(_RUNS_OF, {"ids": list(ids)}):
        runs[row.stream_id].append(TokenRun(row.start_seq, row.text, decode_ends(row.token_ends)))
    return runs


def _end_all_where(
    conn: Connection,
    condition: ColumnElement[bool],
    ending: Ending,
    at: datetime,
    changes: ChangeCollector,
) -> list[str]:
    """Locks the active streams matching `condition` (in the lock order of every writer)
    and ends them all with `ending`; returns their ids."""
    locked = conn.execute(
        select(streams.c.stream_id, streams.c.conversation_id)
        .where(condition)
        .order_by(streams.c.id)
        .with_for_update()
    )
    conversation_of = {row[0]: row[1] for row in locked}
    ids = list(conversation_of)
    _end_streams(conn, [(i, ending) for i in ids], conversation_of, at, changes)
    return ids


def _end_streams(
    conn: Connection,
    endings: Sequence[tuple[str, Ending]],
    conversation_of: dict[str, str],
    at: datetime,
    changes: ChangeCollector,
    known: dict[str, TokenRun] | None = None,
) -> None:
    """Ends active streams (locked by the caller) and compacts each one's runs into its
    row: a few statements for all of them, however many end in one commit. `known`
    holds responses the caller already has whole; the others are read back."""
    if len(endings) > _MAX_IDS:  # recovery may end many: stay under bind-parameter limits
        for at_most in range(0, len(endings), _MAX_IDS):
            part = endings[at_most : at_most + _MAX_IDS]
            _end_streams(conn, part, conversation_of, at, changes, known)
        return
    if not endings:
        return
    known = known or {}
    ids = [stream_id for stream_id, _ in endings]
    unknown = [stream_id for stream_id in ids if stream_id not in known]
    runs = _runs_of(conn, unknown) if unknown else {}
    rows: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    events = []
    for stream_id, ending in endings:
        full = known.get(stream_id) or join_runs(runs[stream_id])
        final_seq = full.end_seq if full.ends else -1
        rows[ending.forget_request].append(
            {
                "b_stream_id": stream_id,
                "state": ending.state.value,
                "reason": ending.reason,
                "error": ending.error,
                "finished_at": at,
                "final_seq": final_seq,
                "text": full.text,
                "token_ends": full.encode_ends(),
                "lease_expires_at": None,
            }
        )
        conversation_id = conversation_of[stream_id]
        events.append(ending_event(conversation_id, stream_id, ending, final_seq, at))
    for forget, values in rows.items():
        if values:
            conn.execute(_END_FORGETTING_REQUEST if forget else _END, values)
    conn.execute(_DELETE_RUNS, {"ids": ids})
    changes.ended.update(ids)
    _append_events(conn, events, changes)


def _records(conn: Connection, ids: list[str]) -> dict[str, StreamRecord]:
    """The records of the streams of `ids` that exist."""
    return {row.stream_id: _record(conn, row) for row in conn.execute(_RECORDS, {"ids": ids})}


def _stored_heads(conn: Connection, ids: list[str]) -> dict[str, int]:
    """The newest stored seq of each stream (-1: none yet)."""
    heads = {stream_id: -1 for stream_id in ids}
    heads.update((row[0], int(row[1])) for row in conn.execute(_HEADS, {"ids": ids}))
    return heads


def _is_brief(batch: WriteBatch) -> bool:
    """A group commit as streams paced like a model make it: few rows, few tokens each.
    One that must read an ending stream's runs back is never brief."""
    if len(batch.creations) + len(batch.runs) + len(batch.endings) > BRIEF_ROWS:
        return False
    if len(batch.creations) > BRIEF_CREATIONS:
        return False
    if any(stream_id not in batch.responses for stream_id, _ in batch.endings):
        return False
    if sum(len(run.ends) for _, run in batch.runs) > BRIEF_RUN_TOKENS:
        return False
    return sum(len(response.ends) for response in batch.responses.values()) <= (
        BRIEF_RESPONSE_TOKENS
    )


def _commit(conn: Connection, batch: WriteBatch, changes: ChangeCollector) -> CommitResult:
    touched = {stream_id for stream_id, _ in batch.runs}
    touched.update(stream_id for stream_id, _ in batch.endings)
    result = CommitResult()
    if not touched:
        if batch.creations:
            result.created = _create_many(conn, batch.creations, changes)
        return result
    conversation_of: dict[str, str] = {
        row[0]: row[1] for row in conn.execute(_LOCK_ACTIVE, {"ids": list(touched)})
    }
    active = set(conversation_of)
    rows = [
        {
            "stream_id": stream_id,
            "start_seq": run.start_seq,
            "end_seq": run.end_seq,
            "text": run.text,
            "token_ends": run.encode_ends(),
        }
        for stream_id, run in batch.runs
        if stream_id in active  # an ended stream takes no more tokens
    ]
    if rows:
        conn.execute(_INSERT_RUNS, rows)
        for stream_id, run in batch.runs:
            if stream_id in active:
                changes.tokens[stream_id] = run.end_seq
                changes.conversations.add(conversation_of[stream_id])
    ending_now = [(s, e) for s, e in batch.endings if s in active]
    written = {stream_id: run.end_seq for stream_id, run in batch.runs}
    if unwritten := [s for s, _ in ending_now if s not in written and s in batch.responses]:
        written.update(_stored_heads(conn, unwritten))
    known = {
        stream_id: response
        for stream_id, response in batch.responses.items()
        if written.get(stream_id, -2) == response.end_seq and response.start_seq == 0
    }
    _end_streams(conn, ending_now, conversation_of, batch.at, changes, known)
    active.difference_update(s for s, _ in ending_now)
    if ended := touched - active:  # just now, or earlier (then it took nothing)
        result.terminal = _records(conn, list(ended))
    # Last: locks are taken streams first, then conversations, in every transaction.
    if batch.creations:
        result.created = _create_many(conn, batch.creations, changes)
    return result


def _read_runs(conn: Connection, stream_id: str, from_seq: int, max_chars: int) -> list[TokenRun]:
    row = conn.execute(_RUN_STATE, {"stream_id": stream_id}).first()
    if row is None:
        raise NotFound(stream_id)
    if row.text is not None:  # compacted: the whole response is one run
        return [TokenRun(0, row.text, decode_ends(row.token_ends))]
    # Streamed (PostgreSQL: a server-side cursor): reading stops at `max_chars`.
    result = conn.execute(
        _RUNS_FROM,
        {"stream_id": stream_id, "from_seq": from_seq},
        execution_options={"stream_results": True},
    )
    runs: list[TokenRun] = []
    chars = 0
    for run_row in result:
        run = TokenRun(run_row.start_seq, run_row.text, decode_ends(run_row.token_ends))
        runs.append(run)
        chars += len(run.text) - (run.offset_of(from_seq) if len(runs) == 1 else 0)
        if chars >= max_chars:
            break
    result.close()
    return runs


def _list_turns(conn: Connection, conversation_id: str, after: int, limit: int) -> Turns:
    if not _conversation_exists(conn, conversation_id):
        raise NotFound(conversation_id)
    rows = conn.execute(
        select(*_RECORD_COLUMNS, streams.c.text)
        .where(streams.c.conversation_id == conversation_id, streams.c.id > after)
        .order_by(streams.c.id)
        .limit(limit)
    ).all()
    turns = []
    for row in rows:
        record = _record(conn, row)
        if row.text is not None:  # compacted: one row, no token replay
            response = row.text
        else:
            runs = _runs_of(conn, [record.stream_id])
            response = join_runs(runs[record.stream_id]).text
        turns.append(Turn(record, response, row.id))
    head = conn.scalar(
        select(func.max(conversation_events.c.seq)).where(
            conversation_events.c.conversation_id == conversation_id
        )
    )
    return Turns(turns, -1 if head is None else int(head))


def _renew_leases(
    conn: Connection, owner_id: str, stream_ids: Sequence[str], until: datetime
) -> int:
    mine = conn.scalars(
        select(streams.c.id)
        .where(
            streams.c.owner_id == owner_id,
            streams.c.stream_id.in_(stream_ids),
            streams.c.state.in_(_ACTIVE),
        )
        .order_by(streams.c.id)  # the lock order of every writer: no deadlocks
        .with_for_update(key_share=True)
    ).all()
    if mine:
        conn.execute(update(streams).where(streams.c.id.in_(mine)).values(lease_expires_at=until))
    return len(mine)


def _purge_finished(conn: Connection, before: datetime) -> PurgeResult:
    purged = conn.execute(
        delete(streams).where(streams.c.state.not_in(_ACTIVE), streams.c.finished_at < before)
    )
    remaining = select(streams.c.id).where(
        streams.c.conversation_id == conversations.c.conversation_id
    )
    emptied = conn.execute(
        delete(conversations).where(conversations.c.created_at < before, ~remaining.exists())
    )
    return PurgeResult(int(purged.rowcount), int(emptied.rowcount))


def _create_conversation(
    conn: Connection, conversation_id: str, owner: str | None, at: datetime
) -> Conversation:
    conn.execute(insert(conversations).values(conversation_id=conversation_id, created_at=at))
    if owner:
        conn.execute(
            insert(members).values(
                conversation_id=conversation_id, user_id=owner, role=int(Role.OWNER), added_at=at
            )
        )
    return _conversation(conn, conversation_id)


def _list_conversations(
    conn: Connection, user_id: str | None, before: int, limit: int
) -> list[Conversation]:
    query = select(conversations.c.conversation_id).order_by(conversations.c.id.desc())
    if before:
        query = query.where(conversations.c.id < before)
    if user_id is not None:
        query = query.where(
            conversations.c.conversation_id.in_(
                select(members.c.conversation_id).where(members.c.user_id == user_id)
            )
        )
    ids = conn.scalars(query.limit(limit)).all()
    return [_conversation(conn, cid) for cid in ids]


def _set_member(
    conn: Connection,
    conversation_id: str,
    user_id: str,
    role: Role,
    at: datetime,
    actor: str | None,
    changes: ChangeCollector,
) -> Member:
    if not _conversation_exists(conn, conversation_id):
        raise NotFound(conversation_id)
    changed = conn.execute(
        update(members)
        .where(members.c.conversation_id == conversation_id, members.c.user_id == user_id)
        .values(role=int(role), added_at=at)
    )
    if changed.rowcount == 0:
        conn.execute(
            insert(members).values(
                conversation_id=conversation_id, user_id=user_id, role=int(role), added_at=at
            )
        )
    _append_events(conn, [member_added_event(conversation_id, user_id, role, at, actor)], changes)
    return Member(user_id, role, at)


def _remove_member(
    conn: Connection,
    conversation_id: str,
    user_id: str,
    actor: str | None,
    changes: ChangeCollector,
) -> bool:
    removed = conn.execute(
        delete(members).where(
            members.c.conversation_id == conversation_id, members.c.user_id == user_id
        )
    )
    if not removed.rowcount:
        return False
    event = member_removed_event(conversation_id, user_id, datetime.now(UTC), actor)
    _append_events(conn, [event], changes)
    return True


def _read_events(
    conn: Connection, conversation_id: str, from_seq: int, limit: int
) -> tuple[list[ConversationEvent], int]:
    if not _conversation_exists(conn, conversation_id):
        raise NotFound(conversation_id)
    newest = conn.scalar(
        select(func.max(conversation_events.c.seq)).where(
            conversation_events.c.conversation_id == conversation_id
        )
    )
    rows = conn.execute(
        select(conversation_events)
        .where(
            conversation_events.c.conversation_id == conversation_id,
            conversation_events.c.seq >= from_seq,
        )
        .order_by(conversation_events.c.seq)
        .limit(limit)
    )
    events = [ConversationEvent(r.seq, r.at, r.actor, r.kind, json.loads(r.data)) for r in rows]
    return events, -1 if newest is None else int(newest)


class SqlStreamRepository:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._transactions = transactions_for(engine)
        self._inflight: set[asyncio.Future[Any]] = set()
        # PostgreSQL: writes tell other processes what changed (see notify.py), signed with
        # this repository's name so that its own listener skips them.
        self._notifies = engine.dialect.name == "postgresql"
        self._origin = uuid.uuid4().hex[:16]
        self._listener: ChangeListener | None = None
        self._closed = False

    async def listen(self, on_change: ChangeHandler) -> bool:
        if not self._notifies:
            return False  # SQLite: one process per database file
        if self._listener is not None:
            self._listener.on_change = on_change  # the newest caller hears from now on
            return True
        self._listener = ChangeListener(connect_args(self._engine), self._origin, on_change)
        await self._listener.start()
        return True

    async def close(self) -> None:
        if self._listener is not None:
            await self._listener.stop()
            self._listener = None
        self._closed = True
        if self._inflight:  # calls whose callers were cancelled: let them return connections
            await asyncio.wait(set(self._inflight), timeout=10)
        await self._transactions.close()

    async def _read(self, body: Callable[[Connection], T]) -> T:
        """Runs `body` in a read transaction: every statement in it sees one snapshot."""
        self._check_open()
        async with _unavailable_on_outage():
            return await self._transactions.read(body)

    async def _write(
        self,
        body: Callable[[Connection], T],
        changes: ChangeCollector | None = None,
        brief: bool = False,
        one_statement: bool = False,
    ) -> T:
        """Runs `body` in a write transaction, holding the write lock from its start on
        SQLite. `brief`: it writes a few rows (see `Transactions.write`).

        What the body records in `changes` is announced to other processes as the
        transaction commits (PostgreSQL NOTIFY is delivered at commit, and only then).
        """

        def then_notify(conn: Connection) -> T:
            result = body(conn)
            if changes:
                payloads = encode(self._origin, changes)
                conn.execute(_NOTIFY, {"channel": CHANNEL, "payloads": payloads})
            return result

        self._check_open()
        async with _unavailable_on_outage():
            return await self._transactions.write(
                then_notify if self._notifies else body, brief, one_statement
            )

    def _check_open(self) -> None:
        if self._closed:
            raise StorageUnavailable("the store is closed (the server is stopping)")

    @_finish_even_if_cancelled
    async def create_stream(self, new: NewStream) -> StreamRecord:
        changes = ChangeCollector()
        try:
            await self._write(lambda conn: _create(conn, new, changes), changes)
        except sa_exc.IntegrityError as exc:
            raise AlreadyExists(new.request_id or new.stream_id) from exc
        return new.record()

    @_finish_even_if_cancelled
    async def get_stream(self, stream_id: str) -> StreamRecord:
        def body(conn: Connection) -> StreamRecord:
            row = conn.execute(_RECORD, {"stream_id": stream_id}).first()
            if row is None:
                raise NotFound(stream_id)
            return _record(conn, row)

        return await self._read(body)

    @_finish_even_if_cancelled
    async def find_by_request_id(self, request_id: str) -> StreamRecord | None:
        def body(conn: Connection) -> StreamRecord | None:
            query = select(*_RECORD_COLUMNS).where(streams.c.request_id == request_id)
            row = conn.execute(query).first()
            return None if row is None else _record(conn, row)

        return await self._read(body)

    @_finish_even_if_cancelled
    async def conversation_exists(self, conversation_id: str) -> bool:
        return await self._read(lambda conn: _conversation_exists(conn, conversation_id))

    @_finish_even_if_cancelled
    async def commit(self, batch: WriteBatch) -> CommitResult:
        if self._notifies and postgres_tokens.fits(batch):
            return await self._commit_tokens(batch)
        changes = ChangeCollector()
        return await self._write(
            lambda conn: _commit(conn, batch, changes), changes, brief=_is_brief(batch)
        )

    async def _commit_tokens(self, batch: WriteBatch) -> CommitResult:
        """Tokens only, on PostgreSQL: one statement (see postgres_tokens.py)."""
        written = await self._write(
            lambda conn: postgres_tokens.write_tokens(conn, batch, self._origin),
            one_statement=True,
        )
        result = CommitResult()
        if ended := [stream_id for stream_id, _ in batch.runs if stream_id not in written]:
            # Ended meanwhile (e.g. cancelled through the store): they took nothing.
            result.terminal = await self._read(lambda conn: _records(conn, ended))
        return result

    @_finish_even_if_cancelled
    async def read_runs(self, stream_id: str, from_seq: int, max_chars: int) -> list[TokenRun]:
        return await self._read(lambda conn: _read_runs(conn, stream_id, from_seq, max_chars))

    @_finish_even_if_cancelled
    async def list_turns(self, conversation_id: str, after: int, limit: int) -> Turns:
        return await self._read(lambda conn: _list_turns(conn, conversation_id, after, limit))

    @_finish_even_if_cancelled
    async def end_active_streams(self, ending: Ending, at: datetime) -> list[str]:
        changes = ChangeCollector()
        active = streams.c.state.in_(_ACTIVE)
        return await self._write(
            lambda conn: _end_all_where(conn, active, ending, at, changes), changes
        )

    @_finish_even_if_cancelled
    async def renew_leases(self, owner_id: str, stream_ids: Sequence[str], until: datetime) -> int:
        if not stream_ids:
            return 0
        return await self._write(lambda conn: _renew_leases(conn, owner_id, stream_ids, until))

    @_finish_even_if_cancelled
    async def end_expired_leases(self, now: datetime, ending: Ending) -> list[str]:
        changes = ChangeCollector()
        expired = and_(
            streams.c.state.in_(_ACTIVE),
            or_(streams.c.lease_expires_at < now, streams.c.lease_expires_at.is_(None)),
        )
        return await self._write(
            lambda conn: _end_all_where(conn, expired, ending, now, changes), changes
        )

    @_finish_even_if_cancelled
    async def purge_finished(self, before: datetime) -> PurgeResult:
        return await self._write(lambda conn: _purge_finished(conn, before))

    # -- conversations and members ----------------------------------------------------------

    @_finish_even_if_cancelled
    async def create_conversation(
        self, conversation_id: str, owner: str | None, at: datetime
    ) -> Conversation:
        return await self._write(
            lambda conn: _create_conversation(conn, conversation_id, owner, at)
        )

    @_finish_even_if_cancelled
    async def get_conversation(self, conversation_id: str) -> Conversation:
        return await self._read(lambda conn: _conversation(conn, conversation_id))

    @_finish_even_if_cancelled
    async def active_streams(self, conversation_id: str) -> list[str]:
        query = (
            select(streams.c.stream_id)
            .where(streams.c.conversation_id == conversation_id, streams.c.state.in_(_ACTIVE))
            .order_by(streams.c.id)
        )
        return await self._read(lambda conn: list(conn.scalars(query)))

    @_finish_even_if_cancelled
    async def role_of(self, conversation_id: str, user_id: str) -> Role | None:
        query = select(members.c.role).where(
            members.c.conversation_id == conversation_id, members.c.user_id == user_id
        )
        role = await self._read(lambda conn: conn.scalar(query))
        return None if role is None else Role(role)

    @_finish_even_if_cancelled
    async def list_conversations(
        self, user_id: str | None, before: int, limit: int
    ) -> list[Conversation]:
        return await self._read(lambda conn: _list_conversations(conn, user_id, before, limit))

    @_finish_even_if_cancelled
    async def set_member(
        self,
        conversation_id: str,
        user_id: str,
        role: Role,
        at: datetime,
        actor: str | None = None,
    ) -> Member:
        changes = ChangeCollector()
        return await self._write(
            lambda conn: _set_member(conn, conversation_id, user_id, role, at, actor, changes),
            changes,
        )

    @_finish_even_if_cancelled
    async def remove_member(
        self, conversation_id: str, user_id: str, actor: str | None = None
    ) -> bool:
        changes = ChangeCollector()
        return await self._write(
            lambda conn: _remove_member(conn, conversation_id, user_id, actor, changes), changes
        )

    @_finish_even_if_cancelled
    async def read_events(
        self, conversation_id: str, from_seq: int, limit: int
    ) -> tuple[list[ConversationEvent], int]:
        return await self._read(lambda conn: _read_events(conn, conversation_id, from_seq, limit))
