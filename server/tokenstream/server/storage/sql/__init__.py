"""SQLAlchemy implementation of the repository (SQLite via aiosqlite, PostgreSQL via asyncpg)."""

from tokenstream.server.storage.sql.database import (
    DatabaseInUse,
    DatabaseSettings,
    SqliteFileLock,
    create_engine,
    is_sqlite,
)
from tokenstream.server.storage.sql.migrate import upgrade_to_head
from tokenstream.server.storage.sql.repository import SqlStreamRepository

__all__ = [
    "DatabaseInUse",
    "DatabaseSettings",
    "SqlStreamRepository",
    "SqliteFileLock",
    "create_engine",
    "is_sqlite",
    "upgrade_to_head",
]
