"""Change notices between repositories sharing one PostgreSQL database (LISTEN/NOTIFY)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest
from sqlalchemy.engine import Connection

from tests.postgres import asyncpg_dsn
from tokenstream.server.domain import Ending, Role, StreamState, TokenRun
from tokenstream.server.storage.repository import NewStream, StoreChange, WriteBatch
from tokenstream.server.storage.sql import SqlStreamRepository, create_engine, upgrade_to_head
from tokenstream.server.storage.sql.notify import (
    APPLICATION_NAME,
    ChangeCollector,
    decode,
    encode,
)

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
CONV = "conv_" + "n" * 26


def new_stream(n: int, conversation_id: str = CONV, *, new: bool = False) -> NewStream:
    return NewStream(
        stream_id=f"strm_{'b' * 25}{n:05d}",
        conversation_id=conversation_id,
        new_conversation=new,
        prompt=f"prompt {n}",
        model="echo",
        max_tokens=100,
        request_id=None,
        request_hash=None,
        created_at=NOW,
    )


class Heard:
    """What one repository's listener reported, to wait on."""

    def __init__(self) -> None:
        self.changes: list[StoreChange | None] = []
        self._arrived = asyncio.Event()

    def __call__(self, change: StoreChange | None) -> None:
        self.changes.append(change)
        self._arrived.set()

    async def next(self) -> StoreChange | None:
        async with asyncio.timeout(5):
            while not self.changes:
                self._arrived.clear()
                await self._arrived.wait()
        return self.changes.pop(0)


@pytest.fixture
async def pair(postgres_url: str) -> AsyncIterator[tuple[SqlStreamRepository, SqlStreamRepository]]:
    """Two repositories (two servers, in effect) on one database."""
    engines = [create_engine(postgres_url), create_engine(postgres_url)]
    await upgrade_to_head(engines[0])
    first, second = SqlStreamRepository(engines[0]), SqlStreamRepository(engines[1])
    yield first, second
    await first.close()
    await second.close()


async def test_writes_are_announced_to_the_other_repository_only(
    pair: tuple[SqlStreamRepository, SqlStreamRepository],
) -> None:
    writer, reader = pair
    on_reader, on_writer = Heard(), Heard()
    assert await reader.listen(on_reader)
    assert await writer.listen(on_writer)

    first = new_stream(1, new=True)
    await writer.create_stream(first)
    assert await on_reader.next() == StoreChange(conversations=frozenset({CONV}))

    batch = WriteBatch(at=NOW, runs=[(first.stream_id, TokenRun.from_tokens(0, ["a", "b", "c"]))])
    await writer.commit(batch)
    assert await on_reader.next() == StoreChange(
        tokens={first.stream_id: 2}, conversations=frozenset({CONV})
    )

    await writer.commit(
        WriteBatch(at=NOW, endings=[(first.stream_id, Ending(StreamState.CANCELLED))])
    )
    assert await on_reader.next() == StoreChange(
        ended=frozenset({first.stream_id}), conversations=frozenset({CONV})
    )

    await writer.set_member(CONV, "ada", Role.MEMBER, NOW)
    assert await on_reader.next() == StoreChange(conversations=frozenset({CONV}))

    # Its own writes were not reported back to the writer (it wakes its readers itself):
    # once it hears the reader's write, it has heard nothing else.
    await reader.remove_member(CONV, "ada")
    assert await on_writer.next() == StoreChange(conversations=frozenset({CONV}))
    assert on_writer.changes == []


async def test_a_transaction_that_rolls_back_sends_no_notice(
    pair: tuple[SqlStreamRepository, SqlStreamRepository],
) -> None:
    writer, reader = pair
    heard = Heard()
    assert await reader.listen(heard)
    changes = ChangeCollector(conversations={"conv_" + "r" * 26})

    def fails(_conn: Connection) -> None:
        raise RuntimeError("the write fails after recording a change")

    with pytest.raises(RuntimeError):
        await writer._write(fails, changes)
    await writer.create_stream(new_stream(4, new=True))
    assert await heard.next() == StoreChange(conversations=frozenset({CONV}))  # only this one


async def listeners(url: str) -> int:
    """Listening connections on the test's database."""
    admin = await asyncpg.connect(asyncpg_dsn(url))
    try:
        found = await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE application_name = $1 AND datname = current_database()",
            APPLICATION_NAME,
        )
        return int(found)
    finally:
        await admin.close()


async def test_close_drops_the_listening_connection(
    pair: tuple[SqlStreamRepository, SqlStreamRepository], postgres_url: str
) -> None:
    writer, _ = pair
    assert await writer.listen(Heard())
    assert await listeners(postgres_url) == 1
    await writer.close()
    assert await listeners(postgres_url) == 0


async def test_the_listener_reconnects_and_says_it_may_have_missed_changes(
    pair: tuple[SqlStreamRepository, SqlStreamRepository], postgres_url: str
) -> None:
    writer, reader = pair
    heard = Heard()
    assert await reader.listen(heard)
    admin = await asyncpg.connect(asyncpg_dsn(postgres_url))
    try:
        terminated = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = $1 AND datname = current_database()",
            APPLICATION_NAME,
        )
    finally:
        await admin.close()
    assert terminated == 1
    assert await heard.next() is None  # back, and unsure what it missed
    await writer.create_stream(new_stream(3, new=True))
    assert await heard.next() == StoreChange(conversations=frozenset({CONV}))


async def test_the_listener_connects_like_the_pool_does(postgres_url: str) -> None:
    """URL options the driver takes (not database settings) reach the listener intact."""
    url = postgres_url + "?prepared_statement_cache_size=0&command_timeout=30"
    writer = SqlStreamRepository(create_engine(postgres_url))
    reader = SqlStreamRepository(create_engine(url))
    try:
        await upgrade_to_head(writer._engine)
        heard = Heard()
        assert await reader.listen(heard)
        await writer.create_stream(new_stream(5, new=True))
        assert await heard.next() == StoreChange(conversations=frozenset({CONV}))
    finally:
        await writer.close()
        await reader.close()


async def test_sqlite_sends_no_notices(tmp_path: object) -> None:
    db = create_engine(f"sqlite+aiosqlite:///{tmp_path}/store.db")
    repository = SqlStreamRepository(db)
    try:
        assert not await repository.listen(Heard())
    finally:
        await repository.close()


# Ids are plain ASCII; text JSON must escape is sized by encoding it, and stays in bounds.
@pytest.mark.parametrize("mark", ["_", 'é"\\\n'])
def test_large_changes_are_split_into_payloads_postgresql_accepts(mark: str) -> None:
    changes = ChangeCollector(
        tokens={f"strm{mark}{i:031d}": i for i in range(700)},
        ended={f"strm{mark}{i:031d}" for i in range(500, 900)},
        conversations={f"conv{mark}{i:026d}" for i in range(300)},
    )
    payloads = encode("origin", changes)
    assert len(payloads) > 1
    assert all(len(p.encode()) < 8000 for p in payloads)
    decoded = [decode(p) for p in payloads]
    assert {origin for origin, _ in decoded} == {"origin"}
    tokens: dict[str, int] = {}
    for _, change in decoded:
        tokens.update(change.tokens)
    assert tokens == changes.tokens
    assert set().union(*(c.ended for _, c in decoded)) == changes.ended
    assert set().union(*(c.conversations for _, c in decoded)) == changes.conversations


@pytest.mark.parametrize("payload", ["", "[]", json.dumps({"t": {}}), "{not json"])
def test_foreign_payloads_are_refused(payload: str) -> None:
    with pytest.raises(ValueError, match="not a change notice"):
        decode(payload)
