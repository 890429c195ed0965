"""Where repository transactions run: whole on database threads for an SQLite file, on the
event loop for PostgreSQL and an in-memory SQLite; the same results either way."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.engine import Connection

from tokenstream.server.domain import Ending, StreamState, TokenRun
from tokenstream.server.storage.repository import NewStream, WriteBatch
from tokenstream.server.storage.sql import SqlStreamRepository, create_engine, upgrade_to_head
from tokenstream.server.storage.sql.schema import conversations
from tokenstream.server.storage.sql.transactions import Transactions, transactions_for

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def conversation(n: int) -> str:
    return "conv_" + "t" * 25 + "abcdefghij"[n]


@contextlib.asynccontextmanager
async def runner_on(url: str) -> AsyncIterator[Transactions]:
    """The transactions of a migrated database at `url` (closing them disposes it)."""
    db = create_engine(url)
    await upgrade_to_head(db)
    runner = transactions_for(db)
    try:
        yield runner
    finally:
        await runner.close()


@pytest.fixture
async def transactions(database_url: str) -> AsyncIterator[Transactions]:
    async with runner_on(database_url) as runner:
        yield runner


@pytest.fixture
def sqlite_file(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"


def add_conversation(n: int) -> Callable[[Connection], None]:
    def body(conn: Connection) -> None:
        conn.execute(insert(conversations).values(conversation_id=conversation(n), created_at=NOW))

    return body


def count(conn: Connection) -> int:
    return int(conn.scalar(select(func.count()).select_from(conversations)) or 0)


async def test_sqlite_file_transactions_run_off_the_event_loop(sqlite_file: str) -> None:
    async with runner_on(sqlite_file) as runner:
        threads = await asyncio.gather(
            runner.write(lambda _conn: threading.get_ident()),
            runner.read(lambda _conn: threading.get_ident()),
        )
    assert threading.get_ident() not in threads


async def test_postgres_transactions_run_on_the_event_loop(postgres_url: str) -> None:
    async with runner_on(postgres_url) as runner:
        assert await runner.read(lambda _conn: threading.get_ident()) == threading.get_ident()


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


async def test_a_read_is_not_held_up_by_a_write_in_progress(sqlite_file: str) -> None:
    """SQLite (WAL): a reader sees the last commit while a write holds the lock."""
    writing, release = threading.Event(), threading.Event()

    def slow_write(conn: Connection) -> None:
        add_conversation(0)(conn)
        writing.set()
        assert release.wait(10), "the test never released the write"

    async with runner_on(sqlite_file) as runner:
        try:
            write = asyncio.ensure_future(runner.write(slow_write))
            assert await asyncio.to_thread(writing.wait, 10)
            assert await asyncio.wait_for(runner.read(count), 5) == 0  # before the commit
            release.set()
            await write
            assert await runner.read(count) == 1
        finally:
            release.set()  # before closing, which waits for the write


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
