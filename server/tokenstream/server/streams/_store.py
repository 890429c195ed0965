"""Repository calls as the engine makes them: outages become UNAVAILABLE."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from tokenstream.server.domain import Chunk, StreamRecord, join_runs
from tokenstream.server.errors import NotFound, Unavailable
from tokenstream.server.storage import errors as storage_errors
from tokenstream.server.storage.repository import StreamRepository

T = TypeVar("T")


async def guarded(call: Awaitable[T]) -> T:
    """Awaits a repository call; an outage becomes UNAVAILABLE, which clients retry."""
    try:
        return await call
    except storage_errors.StorageUnavailable as exc:
        raise Unavailable(
            "the database is unavailable right now; retry shortly",
            reason="STORAGE_UNAVAILABLE",
        ) from exc


def stream_not_found(stream_id: str) -> NotFound:
    return NotFound(
        f"stream {stream_id} does not exist; stream ids come from SubmitPrompt",
        reason="STREAM_NOT_FOUND",
        field="stream_id",
    )


def conversation_not_found(conversation_id: str) -> NotFound:
    return NotFound(
        f"conversation {conversation_id} does not exist; conversation ids come from "
        "SubmitPrompt or CreateConversation",
        reason="CONVERSATION_NOT_FOUND",
        field="conversation_id",
    )


async def get_record(repository: StreamRepository, stream_id: str) -> StreamRecord:
    try:
        return await guarded(repository.get_stream(stream_id))
    except storage_errors.NotFound as exc:
        raise stream_not_found(stream_id) from exc


async def stored_chunks(
    repository: StreamRepository, stream_id: str, from_seq: int, max_chars: int
) -> list[Chunk]:
    """Committed tokens from `from_seq` on, rolled up into as few chunks as `max_chars` allows,
    whatever batches they were committed in."""
    try:
        runs = await guarded(repository.read_runs(stream_id, from_seq, max_chars))
    except storage_errors.NotFound as exc:
        raise NotFound(
            f"stream {stream_id} no longer exists (purged)",
            reason="STREAM_NOT_FOUND",
            field="stream_id",
        ) from exc
    return list(join_runs(runs).chunks(from_seq, max_chars))
