"""PostgreSQL: a group commit of tokens only, as one statement in one round trip.

A commit of streams paced like a model is a few dozen runs of a token or two. Written the
general way (`repository._commit`) it takes five round trips: BEGIN, lock the active
streams, insert their runs, send the change notice, COMMIT. Each is awaited on the event
loop behind its other work, which under load makes the commit, and every token waiting
for it, several times slower than the database. One statement in autocommit does the
same atomically: it locks the active streams in the usual order, inserts the runs of
those only (an ended stream takes no more tokens), and sends the notice `notify.encode`
would send, delivered at commit as before.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection

from tokenstream.server.domain import ACTIVE_STATES
from tokenstream.server.storage.repository import WriteBatch
from tokenstream.server.storage.sql.notify import CHANNEL

# Most runs written this way: the notice (at most ~115 bytes per stream, ids being at most
# 40 characters) must stay within PostgreSQL's 8000-byte payload limit.
MAX_RUNS = 48

_WRITE_TOKENS = text(
    """
WITH batch AS (
    SELECT * FROM unnest(
        CAST(:ids AS text[]), CAST(:start_seqs AS bigint[]), CAST(:end_seqs AS bigint[]),
        CAST(:texts AS text[]), CAST(:token_ends AS bytea[])
    ) AS b(stream_id, start_seq, end_seq, text, token_ends)
), active AS (
    SELECT stream_id, conversation_id FROM streams
    WHERE stream_id = ANY(CAST(:ids AS text[])) AND state = ANY(CAST(:active AS text[]))
    ORDER BY id
    FOR UPDATE
), written AS (
    INSERT INTO token_runs (stream_id, start_seq, end_seq, text, token_ends)
    SELECT b.stream_id, b.start_seq, b.end_seq, b.text, b.token_ends
    FROM batch b JOIN active a ON a.stream_id = b.stream_id
    RETURNING stream_id, end_seq
), notice AS (
    SELECT pg_notify(CAST(:channel AS text), json_build_object(
        'o', CAST(:origin AS text),
        't', (SELECT json_object_agg(stream_id, end_seq) FROM written),
        'c', (SELECT json_agg(DISTINCT a.conversation_id)
              FROM active a JOIN written w ON w.stream_id = a.stream_id)
    )::text)
    WHERE EXISTS (SELECT FROM written)
)
SELECT (SELECT array_agg(stream_id) FROM written), (SELECT count(*) FROM notice)
"""
)
_ACTIVE = [state.value for state in ACTIVE_STATES]


def fits(batch: WriteBatch) -> bool:
    """A batch of token runs only (no creations, no endings), few enough for one notice."""
    return 0 < len(batch.runs) <= MAX_RUNS and not batch.creations and not batch.endings


def write_tokens(conn: Connection, batch: WriteBatch, origin: str) -> set[str]:
    """Writes the batch's runs of streams still active; returns those streams' ids."""
    params: dict[str, Any] = {
        "ids": [stream_id for stream_id, _ in batch.runs],
        "start_seqs": [run.start_seq for _, run in batch.runs],
        "end_seqs": [run.end_seq for _, run in batch.runs],
        "texts": [run.text for _, run in batch.runs],
        "token_ends": [run.encode_ends() for _, run in batch.runs],
        "active": _ACTIVE,
        "channel": CHANNEL,
        "origin": origin,
    }
    written, _ = conn.execute(_WRITE_TOKENS, params).one()
    return set(written or ())
