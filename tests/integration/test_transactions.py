"""Where repository transactions run: for an SQLite file, whole on database threads, or brief
writes at once on the event loop; on the event loop for PostgreSQL and an in-memory SQLite;
the same results either way."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select, text
from sqlalchemy.engine import Connection

from tokenstream.server.domain import Ending, StreamState, TokenRun
from tokenstream.server.storage.repository import NewStream, WriteBatch
from tokenstream.server.storage.sql import SqlStreamRepository, create_engine, upgrade_to_head
from tokenstream.server.storage.sql.repository import BRIEF_CREATIONS, _is_brief
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


def thread_of(_conn: Connection) -> int:
    return threading.get_ident()


async def test_sqlite_file_transactions_run_off_the_event_loop(sqlite_file: str) -> None:
    async with runner_on(sqlite_file) as runner:
        threads = await asyncio.gather(runner.write(thread_of), runner.read(thread_of))
    assert threading.get_ident() not in threads


async def test_a_brief_sqlite_write_runs_on_the_event_loop(sqlite_file: str) -> None:
    async with runner_on(sqlite_file) as runner:
        assert await runner.write(thread_of, brief=True) == threading.get_ident()
        await runner.write(add_conversation(0), brief=True)
        assert await runner.read(count) == 1


async def test_brief_writes_take_at_most_half_of_the_loop(sqlite_file: str) -> None:
    """After a brief write that held the loop for a while, the next one asked within that
    while goes to the writer thread; later ones run on the loop again."""

    def slow(_conn: Connection) -> int:
        time.sleep(0.3)
        return threading.get_ident()

    loop_thread = threading.get_ident()
    async with runner_on(sqlite_file) as runner:
        began = time.monotonic()
        assert await runner.write(slow, brief=True) == loop_thread
        took = time.monotonic() - began
        assert await runner.write(thread_of, brief=True) != loop_thread
        await asyncio.sleep(2 * took)
        assert await runner.write(thread_of, brief=True) == loop_thread


async def test_a_brief_write_waits_on_the_thread_while_another_process_writes(
    sqlite_file: str, tmp_path: Path
) -> None:
    """Another connection (the CLI, the sqlite3 shell) holds the write lock: the brief write
    does not fail, and the loop is not blocked: it waits on the writer thread, then lands."""
    async with runner_on(sqlite_file) as runner:
        other = sqlite3.connect(tmp_path / "store.db", isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            write = asyncio.ensure_future(runner.write(add_conversation(0), brief=True))
            began = time.monotonic()
            await asyncio.sleep(0.2)  # the loop runs meanwhile: the write does not block it
            assert time.monotonic() - began < 1.5
            assert not write.done()
            other.execute("COMMIT")
            await asyncio.wait_for(write, 10)
        finally:
            other.close()
        assert await runner.read(count) == 1
        assert await runner.write(thread_of, brief=True) == threading.get_ident()


async def test_a_brief_write_asked_behind_a_thread_write_lands_after_it(
    sqlite_file: str,
) -> None:
    order: list[str] = []

    def log(name: str) -> Callable[[Connection], None]:
        def body(_conn: Connection) -> None:
            time.sleep(0.05 if name == "long" else 0)
            order.append(name)

        return body

    async with runner_on(sqlite_file) as runner:
        tried_on_loop = []
        write_here = runner._write_here  # type: ignore[attr-defined]

        def spy(body: Callable[[Connection], None]) -> None:
            tried_on_loop.append(body)
            write_here(body)

        runner._write_here = spy  # type: ignore[attr-defined]
        await asyncio.gather(runner.write(log("long")), runner.write(log("brief"), brief=True))
    assert order == ["long", "brief"]
    assert tried_on_loop == []  # it queued behind the thread's write, not raced it


async def test_brief_writes_are_checkpointed_into_the_database_file(
    sqlite_file: str, tmp_path: Path
) -> None:
    """The loop's connection never checkpoints at commit; the writer thread does, so the
    WAL does not grow without end and the database file takes the writes."""
    database = tmp_path / "store.db"
    async with runner_on(sqlite_file) as runner:
        await runner.write(lambda conn: conn.execute(text("CREATE TABLE filler (x BLOB)")))
        before = database.stat().st_size
        for _ in range(20):  # 2 MB over ~1 s, several checkpoint intervals
            await runner.write(
                lambda conn: conn.execute(text("INSERT INTO filler VALUES (randomblob(100000))")),
                brief=True,
            )
            await asyncio.sleep(0.05)
        for _ in range(100):
            if database.stat().st_size >= before + 1_000_000:
                break
            await asyncio.sleep(0.05)
        assert database.stat().st_size >= before + 1_000_000


async def test_postgres_transactions_run_on_the_event_loop(postgres_url: str) -> None:
    async with runner_on(postgres_url) as runner:
        assert await runner.read(thread_of) == threading.get_ident()


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


def test_a_model_paced_group_commit_is_brief() -> None:
    """Few tokens per stream is brief; full-speed runs, a burst of creations, or an ending
    whose response must be read back are not."""
    streams = [f"strm_{n:026d}" for n in range(100)]
    paced = WriteBatch(NOW, runs=[(s, TokenRun.from_tokens(7, [" tok"])) for s in streams[:60]])
    assert _is_brief(paced)
    full_speed = WriteBatch(
        NOW, runs=[(s, TokenRun.from_tokens(0, [" tok"] * 100)) for s in streams]
    )
    assert not _is_brief(full_speed)
    new = [
        NewStream(s, conversation(0), True, "p", "echo", 10, None, None, NOW)
        for s in streams[: BRIEF_CREATIONS + 1]
    ]
    assert _is_brief(WriteBatch(NOW, creations=new[:BRIEF_CREATIONS]))
    assert not _is_brief(WriteBatch(NOW, creations=new))
    done = Ending(StreamState.COMPLETED)
    last = TokenRun.from_tokens(249, [" tok"])
    known = WriteBatch(
        NOW,
        runs=[(streams[0], last)],
        endings=[(streams[0], done)],
        responses={streams[0]: TokenRun.from_tokens(0, [" tok"] * 250)},
    )
    assert _is_brief(known)
    assert not _is_brief(WriteBatch(NOW, runs=[(streams[0], last)], endings=[(streams[0], done)]))
