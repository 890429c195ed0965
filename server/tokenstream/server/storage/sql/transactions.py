"""Where a repository transaction runs: a plain function of a `Connection`, started from the
event loop with one await however many statements it holds.

PostgreSQL (asyncpg): the function runs on the event loop through SQLAlchemy's greenlet
bridge (`AsyncConnection.run_sync`); each statement is a network round trip, awaited.

SQLite file (the standard `sqlite3` driver):
- Reads run whole on a few reader threads, each with a snapshot of its own (WAL).
- Writes run whole on one writer thread, in the order they were asked for (SQLite has one
  writer at a time anyway). aiosqlite handed every cursor call to its thread and back
  (~11 hand-offs per group commit, each waiting its turn behind the loop's other work).
- Brief writes (a model-paced group commit: a few rows) run at once on the event loop,
  for at most half of the loop's time, unless this process has writes waiting for the
  writer thread or another process holds the write lock (then they wait on the thread).
  The driver lets go of the GIL around every SQLite call (each statement, each row), and
  while the loop is busy a thread gets it back only after the switch interval: a commit
  of 60 rows that takes 0.2 ms alone took ~50 ms on a thread beside a busy loop. Large
  writes stay on the thread, where SQLite's own work runs beside the loop's. The loop's
  connection never waits for the lock and never checkpoints the WAL: the thread does.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from tokenstream.server.storage.sql.database import (
    WRITE_OPTION,
    create_sqlite_loop_engine,
    create_sqlite_thread_engine,
    is_sqlite_file,
)

T = TypeVar("T")
log = logging.getLogger(__name__)

# Threads reading an SQLite file at once (WAL readers do not wait for the writer).
SQLITE_READERS = 4
# Seconds between WAL checkpoints after brief writes (SQLite's own default is every ~4 MB).
CHECKPOINT_INTERVAL = 0.25


class Transactions(Protocol):
    async def read(self, body: Callable[[Connection], T]) -> T:
        """Runs `body` in a read transaction: all its statements see one snapshot."""
        ...

    async def write(
        self, body: Callable[[Connection], T], brief: bool = False, one_statement: bool = False
    ) -> T:
        """Runs `body` in a write transaction, committed if it returns, rolled back if
        it raises (SQLite: holding the write lock from the start). `brief`: it writes a
        few rows (an SQLite file may then run it on the event loop). `one_statement`: it
        runs a single statement, atomic by itself, so PostgreSQL runs it in autocommit
        (no BEGIN and COMMIT round trips)."""
        ...

    async def close(self) -> None:
        """Waits for the transactions under way (for a while), then lets go of the engine."""
        ...


def transactions_for(engine: AsyncEngine) -> Transactions:
    if is_sqlite_file(engine.url):
        return OnSqliteFile(engine)
    return OnEventLoop(engine)


class OnEventLoop:
    """Each statement awaited on the event loop (asyncpg; also an in-memory SQLite, which
    exists only inside the engine's own connection)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        # A read of several statements must see one snapshot: SQLite's explicit BEGIN gives
        # that; PostgreSQL needs REPEATABLE READ (read-only, so it never fails to serialize).
        self._read_options: dict[str, Any] = (
            {"isolation_level": "REPEATABLE READ", "postgresql_readonly": True}
            if engine.dialect.name == "postgresql"
            else {}
        )

    async def read(self, body: Callable[[Connection], T]) -> T:
        return await self._run(body, self._read_options)

    async def write(
        self, body: Callable[[Connection], T], brief: bool = False, one_statement: bool = False
    ) -> T:
        return await self._run(
            body, {"isolation_level": "AUTOCOMMIT"} if one_statement else {WRITE_OPTION: True}
        )

    async def _run(self, body: Callable[[Connection], T], options: dict[str, Any]) -> T:
        async with self._engine.connect() as conn:
            if options:
                await conn.execution_options(**options)
            async with conn.begin():
                return await conn.run_sync(body)

    async def close(self) -> None:
        await self._engine.dispose()


class _WriteLockTaken(Exception):
    """Another connection holds SQLite's write lock (or the loop must not wait for it)."""


class OnSqliteFile:
    """Reads on `SQLITE_READERS` threads; writes on one writer thread, or at once on the
    event loop when brief, no write of this process waits for the thread, and no other
    process holds the write lock."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._async_engine = engine  # migrations ran on it; disposed with this
        self._engine: Engine = create_sqlite_thread_engine(engine.url, SQLITE_READERS + 1)
        self._loop_engine = create_sqlite_loop_engine(engine.url)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="tokenstream-sqlite-write")
        self._readers = ThreadPoolExecutor(
            SQLITE_READERS, thread_name_prefix="tokenstream-sqlite-read"
        )
        # Writes handed to the writer thread and not done yet. A brief write asked meanwhile
        # queues behind them, so writes still land in the order they were asked for.
        self._on_writer_thread = 0
        self._checkpoint: asyncio.Future[None] | None = None
        self._checkpoint_started = float("-inf")
        self._loop_free_until = float("-inf")  # no write on the loop before then

    async def read(self, body: Callable[[Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self._run, body, False)

    async def write(
        self, body: Callable[[Connection], T], brief: bool = False, one_statement: bool = False
    ) -> T:
        loop = asyncio.get_running_loop()
        if brief and not self._on_writer_thread and loop.time() >= self._loop_free_until:
            began = loop.time()
            try:
                result = self._write_here(body)
            except _WriteLockTaken:
                pass  # another process is writing (e.g. the CLI): wait on the thread
            else:
                self._checkpoint_soon()
                return result
            finally:
                # Writes take at most half of the loop's time. A loop that is busy anyway
                # gets more done with the writes on the thread beside it; and writes that
                # kept it from taking in new work would each find little to write.
                finished = loop.time()
                self._loop_free_until = finished + (finished - began)
        self._on_writer_thread += 1
        try:
            return await loop.run_in_executor(self._writer, self._run, body, True)
        finally:
            self._on_writer_thread -= 1

    def _write_here(self, body: Callable[[Connection], T]) -> T:
        """Runs the write on the calling thread (the loop's), if the lock is free now."""
        with self._loop_engine.connect() as conn:
            conn.execution_options(**{WRITE_OPTION: True})
            try:
                transaction = conn.begin()  # BEGIN IMMEDIATE: takes the lock or fails
            except OperationalError as exc:
                code = getattr(exc.orig, "sqlite_errorcode", 0)
                if code & 0xFF == sqlite3.SQLITE_BUSY:
                    raise _WriteLockTaken from exc
                raise
            with transaction:
                return body(conn)

    def _checkpoint_soon(self) -> None:
        """Copies the WAL into the database file on the writer thread, at most every
        CHECKPOINT_INTERVAL s. PASSIVE: it takes no lock that writers or readers wait for."""
        loop = asyncio.get_running_loop()
        if self._checkpoint is not None and not self._checkpoint.done():
            return
        if loop.time() - self._checkpoint_started < CHECKPOINT_INTERVAL:
            return
        self._checkpoint_started = loop.time()
        self._checkpoint = loop.run_in_executor(self._writer, self._checkpoint_wal)

    def _checkpoint_wal(self) -> None:
        try:
            connection = self._engine.raw_connection()
            try:  # the driver connection is in autocommit: no transaction around this
                cursor = connection.cursor()
                cursor.execute("PRAGMA wal_checkpoint(PASSIVE)")
                cursor.close()
            finally:
                connection.close()
        except Exception:  # the next one may succeed; SQLite would retry later too
            log.warning("WAL checkpoint failed", exc_info=True)

    def _run(self, body: Callable[[Connection], T], write: bool) -> T:
        with self._engine.connect() as conn:
            if write:
                conn.execution_options(**{WRITE_OPTION: True})
            with conn.begin():
                return body(conn)

    async def close(self, wait_up_to: float = 10.0) -> None:
        """Stops the threads once their current transaction is done (the caller then lets
        go of the database file: nothing may commit after that), up to `wait_up_to` s."""
        for executor in (self._writer, self._readers):
            executor.shutdown(wait=False, cancel_futures=True)

        def finish() -> None:
            for executor in (self._writer, self._readers):
                executor.shutdown(wait=True)

        try:
            await asyncio.wait_for(asyncio.to_thread(finish), wait_up_to)
        except TimeoutError:
            log.warning("a database thread was still busy after %.0f s; closing anyway", wait_up_to)
        self._engine.dispose()
        self._loop_engine.dispose()
        await self._async_engine.dispose()
