"""Creating the async engine with per-backend settings."""

from __future__ import annotations

import fcntl
import time
from dataclasses import dataclass
from typing import IO, Any

from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

# Execution option marking a connection whose transaction will write (see `_sqlite_begin`).
WRITE_OPTION = "tokenstream_write"


def is_sqlite(url: str | URL) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def is_sqlite_file(url: URL) -> bool:
    """An SQLite database in a file (not one that lives only in its connection's memory)."""
    if not is_sqlite(url) or not url.database:
        return False
    return ":memory:" not in url.database and url.query.get("mode") != "memory"


@dataclass(frozen=True, slots=True)
class DatabaseSettings:
    """Connections to a PostgreSQL store (an embedded SQLite file needs no tuning). The
    defaults suit one server with thousands of readers: each call holds a connection only
    for its own short transaction."""

    # Connections kept open, and how many more may be opened under load.
    pool_size: int = 10
    max_overflow: int = 10
    # Seconds a call waits for a free connection before it fails UNAVAILABLE.
    pool_timeout: float = 10.0
    # Seconds after which the database aborts a statement (0: no limit). The driver gives
    # up on an unanswered statement 5 s later (a database host that vanished).
    statement_timeout: float = 30.0
    # A connection unused for this many seconds is pinged before use (see `_ping_when_idle`).
    ping_after_idle: float = 1.0


def create_engine(url: str, settings: DatabaseSettings | None = None) -> AsyncEngine:
    if is_sqlite(url):
        engine = create_async_engine(url)
        _use_sqlite_settings(engine.sync_engine)
        return engine
    settings = settings or DatabaseSettings()
    timeout = settings.statement_timeout
    engine = create_async_engine(
        url,
        pool_size=settings.pool_size,
        max_overflow=settings.max_overflow,
        pool_timeout=settings.pool_timeout,
        connect_args={
            "server_settings": {"statement_timeout": str(int(timeout * 1000))},
            "command_timeout": timeout + 5 if timeout else None,
        },
    )
    _ping_when_idle(engine.sync_engine, settings.ping_after_idle)
    return engine


def _ping_when_idle(engine: Engine, idle: float) -> None:
    """Pings a connection taken from the pool after `idle` seconds or more there: one the
    database dropped meanwhile (a restart, a failover) is replaced instead of failing the
    call that drew it. A busy connection is not pinged (SQLAlchemy's pool_pre_ping would:
    three round trips, more than a group commit's own statements). If the database goes
    away while connections are busy, the first call on one fails, and SQLAlchemy then
    replaces every connection of the pool."""

    @event.listens_for(engine, "checkin")
    def checked_in(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("idle_since")  # none: a new connection
        if since is None or time.monotonic() - since < idle:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            raise DisconnectionError("the database dropped this connection") from exc


def create_sqlite_thread_engine(url: URL, connections: int) -> Engine:
    """A synchronous engine on the same SQLite file as `url`, with the same settings, for
    transactions run whole on database threads (see transactions.py). A connection is
    used by one thread at a time, but not always the thread that opened it."""
    return _sqlite_sync_engine(url, connections)


def create_sqlite_loop_engine(url: URL) -> Engine:
    """One connection on the same SQLite file, for brief writes made on the event loop
    itself (see transactions.py). It never waits for the write lock (busy_timeout 0: the
    write goes to the writer thread instead) and never checkpoints the WAL at commit (a
    checkpoint writes and syncs the database file; the writer thread does that)."""
    # Also while connecting (setting WAL mode): the driver would wait 5 s by default.
    engine = _sqlite_sync_engine(url, 1, timeout=0)
    event.listen(engine, "connect", _never_wait)
    return engine


def _sqlite_sync_engine(url: URL, connections: int, **connect_args: Any) -> Engine:
    engine = create_sync_engine(
        url.set(drivername="sqlite+pysqlite"),
        pool_size=connections,
        max_overflow=0,
        connect_args={"check_same_thread": False, **connect_args},
    )
    _use_sqlite_settings(engine)
    return engine


def _never_wait(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=0")
    cursor.execute("PRAGMA wal_autocheckpoint=0")
    cursor.close()


def _use_sqlite_settings(engine: Engine) -> None:
    """Every SQLite connection: the pragmas below, and transactions begun explicitly."""
    event.listen(engine, "connect", _sqlite_connect)
    event.listen(engine, "begin", _sqlite_begin)


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # The driver's own transaction handling starts transactions only before writes, so a
    # read of several statements would see several snapshots. Take over: autocommit at the
    # driver, and an explicit BEGIN from `_sqlite_begin` (SQLAlchemy's documented recipe).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # WAL lets readers run beside the writer; NORMAL sync is durable across process crashes
    # (not power loss), which is the trade the embedded default makes for commit speed.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    # Writers take the write lock up front (IMMEDIATE), so they wait on busy_timeout instead
    # of failing when a read transaction would have to be upgraded to a write.
    immediate = conn.get_execution_options().get(WRITE_OPTION, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


class DatabaseInUse(RuntimeError):
    """Another server process already owns this embedded database file."""


class SqliteFileLock:
    """An exclusive lock on `<database>.lock`, held while a server uses an SQLite file.

    One process owns an embedded database: it recovers the streams it finds running as
    interrupted, which would be wrong if another live process were generating them.
    """

    def __init__(self, url: str) -> None:
        database = make_url(url).database
        self.path = None if not database or database == ":memory:" else f"{database}.lock"
        self._file: IO[bytes] | None = None

    def acquire(self) -> None:
        if self.path is None:
            return
        handle = open(self.path, "wb")  # noqa: SIM115  # held open for the server's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise DatabaseInUse(
                f"another tokenstream server is using {self.path.removesuffix('.lock')}; "
                "stop it or choose another --database-url"
            ) from None
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the lock
            self._file = None
