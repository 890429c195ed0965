"""Where a repository transaction runs: a plain function of a `Connection`, started from the
event loop with one await however many statements it holds.

PostgreSQL (asyncpg): the function runs on the event loop through SQLAlchemy's greenlet
bridge (`AsyncConnection.run_sync`); each statement is a network round trip, awaited.

SQLite file: the function runs whole on a database thread (the standard `sqlite3` driver,
which lets go of the GIL while SQLite works). aiosqlite hands every cursor call to its
thread and back (cursor, execute, fetch, close: ~4 hand-offs per statement, ~11 per group
commit), and under load each hand-off waits its turn behind the loop's other work: a
commit of a few hundred bytes took 8-10 ms. Here a transaction is one hand-off. Writes go
to one thread, in the order they were asked for (SQLite has one writer at a time anyway);
reads to a few others, each with a snapshot of its own (WAL).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from tokenstream.server.storage.sql.database import (
    WRITE_OPTION,
    create_sqlite_thread_engine,
    is_sqlite_file,
)

T = TypeVar("T")
log = logging.getLogger(__name__)

# Threads reading an SQLite file at once (WAL readers do not wait for the writer).
SQLITE_READERS = 4


class Transactions(Protocol):
    async def read(self, body: Callable[[Connection], T]) -> T:
        """Runs `body` in a read transaction: all its statements see one snapshot."""
        ...

    async def write(self, body: Callable[[Connection], T]) -> T:
        """Runs `body` in a write transaction, committed if it returns, rolled back if
        it raises (SQLite: holding the write lock from the start)."""
        ...

    async def close(self) -> None:
        """Waits for the transactions under way (for a while), then lets go of the engine."""
        ...


def transactions_for(engine: AsyncEngine) -> Transactions:
    if is_sqlite_file(engine.url):
        return OnSqliteThreads(engine)
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

    async def write(self, body: Callable[[Connection], T]) -> T:
        return await self._run(body, {WRITE_OPTION: True})

    async def _run(self, body: Callable[[Connection], T], options: dict[str, Any]) -> T:
        async with self._engine.connect() as conn:
            if options:
                await conn.execution_options(**options)
            async with conn.begin():
                return await conn.run_sync(body)

    async def close(self) -> None:
        await self._engine.dispose()


class OnSqliteThreads:
    """Each transaction whole on a database thread: one writer, `SQLITE_READERS` readers."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._async_engine = engine  # migrations ran on it; disposed with this
        self._engine: Engine = create_sqlite_thread_engine(engine.url, SQLITE_READERS + 1)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="tokenstream-sqlite-write")
        self._readers = ThreadPoolExecutor(
            SQLITE_READERS, thread_name_prefix="tokenstream-sqlite-read"
        )

    async def read(self, body: Callable[[Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self._run, body, False)

    async def write(self, body: Callable[[Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._writer, self._run, body, True)

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
        await self._async_engine.dispose()
