"""Where repository transactions run: whole on database threads for an SQLite file, on the
event loop for PostgreSQL and an in-memory SQLite; the same results either way."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from tokenstream.server.domain import Ending, StreamState, TokenRun
from tokenstream.server.storage.repository import NewStream, WriteBatch
from tokenstream.server.storage.sql import SqlStreamRepository, create_engine, upgrade_to_head
from tokenstream.server.storage.sql.schema import conversations
from tokenstream.server.storage.sql.transactions import Transactions, transactions_for

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def conversation(n: int) -> str:
    return "conv_" + "t" * 25 + "abcdefghij"[n]


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    db = create_engine(database_url)
    await upgrade_to_head(db)
    yield db
    await db.dispose()


@pytest.fixture
async def transactions(engine: AsyncEngine) -> AsyncIterator[Transactions]:
    runner = transactions_for(engine)
    yield runner
    await runner.close()


def add_conversation(n: int) -> Callable[[Connection], None]:
    def body(conn: Connection) -> None:
        conn.execute(insert(conversations).values(conversation_id=conversation(n), created_at=NOW))

    return body


def count(conn: Connection) -> int:
    return int(conn.scalar(select(func.count()).select_from(conversations)) or 0)


async def test_sqlite_file_transactions_run_off_the_event_loop(tmp_path: Path) -> None:
    db = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'store.db'}")
    await upgrade_to_head(db)
    runner = transactions_for(db)
    try:
        loop_thread = threading.get_ident()
        threads = await asyncio.gather(
            runner.write(lambda _conn: threading.get_ident()),
            runner.read(lambda _conn: threading.get_ident()),
        )
        assert loop_thread not in threads
    finally:
        await runner.close()


async def test_postgres_transactions_run_on_the_event_loop(postgres_url: str) -> None:
    db = create_engine(postgres_url)
    await upgrade_to_head(db)
    runner = transactions_for(db)
    try:
        assert await runner.read(lambda _conn: threading.get_ident()) == threading.get_ident()
    finally:
        await runner.close()


async def test_a_write_commits_when_its_body_returns_and_rolls_back_when_it_raises(
    transactions: Transactions,
) -> None:
    await transactions.write(add_conversation(0))

    def add_then_fail(conn: Connection) -> None:
        add_conversation(1)(conn)
        raise RuntimeError("refused after writing")

    with pytest.raises(RuntimeError, match="refused after writing"):
        await transactions.write(add_then_fail)
    assert await transactions.read(count) == 1


async def test_a_read_is_not_held_up_by_a_write_in_progress(tmp_path: Path) -> None:
    """SQLite (WAL): a reader sees the last commit while a write holds the lock."""
    db = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'store.db'}")
    await upgrade_to_head(db)
    runner = transactions_for(db)
    writing, release = threading.Event(), threading.Event()

    def slow_write(conn: Connection) -> None:
        add_conversation(0)(conn)
        writing.set()
        assert release.wait(10), "the test never released the write"

    try:
        write = asyncio.ensure_future(runner.write(slow_write))
        assert await asyncio.to_thread(writing.wait, 10)
        assert await asyncio.wait_for(runner.read(count), 5) == 0  # before the commit
        release.set()
        await write
        assert await runner.read(count) == 1
    finally:
        release.set()
        await runner.close()


async def test_writes_asked_at_once_all_land(transactions: Transactions, database_url: str) -> None:
    order: list[int] = []

    def numbered(n: int) -> Callable[[Connection], None]:
        def body(conn: Connection) -> None:
            order.append(n)
            add_conversation(n)(conn)

        return body

    await asyncio.gather(*(transactions.write(numbered(n)) for n in range(8)))
    assert await transactions.read(count) == 8
    if database_url.startswith("sqlite"):  # one writer thread, in the order asked
        assert order == list(range(8))
    else:
        assert sorted(order) == list(range(8))


async def test_repository_on_an_in_memory_sqlite() -> None:
    """A database that lives only in its connection still works (on the event loop)."""
    db = create_engine("sqlite+aiosqlite://")
    await upgrade_to_head(db)
    repository = SqlStreamRepository(db)
    stream = "strm_" + "m" * 26
    try:
        new = NewStream(stream, conversation(0), True, "p", "echo", 10, None, None, NOW)
        await repository.commit(WriteBatch(NOW, creations=[new]))
        run = TokenRun.from_tokens(0, ["a", "b"])
        ended = Ending(StreamState.COMPLETED)
        result = await repository.commit(
            WriteBatch(NOW, runs=[(stream, run)], endings=[(stream, ended)])
        )
        assert result.terminal[stream].head_seq == 1
        (stored,) = await repository.read_runs(stream, 0, 100)
        assert stored.text == "ab"
    finally:
        await repository.close()
