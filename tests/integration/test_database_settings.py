"""Connection settings for PostgreSQL: pool size, statement timeout, dropped connections."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.pool import QueuePool

from tests.postgres import asyncpg_dsn
from tokenstream.server.storage.errors import StorageUnavailable
from tokenstream.server.storage.sql import (
    DatabaseSettings,
    SqlStreamRepository,
    create_engine,
    upgrade_to_head,
)


async def test_pool_size_and_statement_timeout_are_applied(postgres_url: str) -> None:
    db = create_engine(
        postgres_url, DatabaseSettings(pool_size=3, max_overflow=1, statement_timeout=0.25)
    )
    try:
        assert isinstance(db.pool, QueuePool)
        assert (db.pool.size(), db.pool._max_overflow) == (3, 1)
        async with db.connect() as conn:
            assert await conn.scalar(text("SHOW statement_timeout")) == "250ms"
            with pytest.raises(sa_exc.DBAPIError, match="statement timeout"):
                await conn.execute(text("SELECT pg_sleep(2)"))
    finally:
        await db.dispose()


async def test_no_statement_timeout_when_set_to_zero(postgres_url: str) -> None:
    db = create_engine(postgres_url, DatabaseSettings(statement_timeout=0))
    try:
        async with db.connect() as conn:
            assert await conn.scalar(text("SHOW statement_timeout")) == "0"
    finally:
        await db.dispose()


async def drop_connections(postgres_url: str) -> int:
    admin = await asyncpg.connect(asyncpg_dsn(postgres_url))
    try:
        return int(
            await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        )
    finally:
        await admin.close()


async def test_idle_connections_the_database_dropped_are_replaced(postgres_url: str) -> None:
    db = create_engine(postgres_url, DatabaseSettings(ping_after_idle=0.2))
    await upgrade_to_head(db)
    repository = SqlStreamRepository(db)
    try:
        assert not await repository.conversation_exists("conv_" + "a" * 26)  # pool warmed
        assert await drop_connections(postgres_url) >= 1
        await asyncio.sleep(0.3)
        # The next call draws a dead connection idle for a while: pinged, replaced, no error.
        assert not await repository.conversation_exists("conv_" + "a" * 26)
    finally:
        await repository.close()


async def test_busy_connections_are_not_pinged_and_recover_after_one_failure(
    postgres_url: str,
) -> None:
    db = create_engine(postgres_url, DatabaseSettings(ping_after_idle=60))
    await upgrade_to_head(db)
    repository = SqlStreamRepository(db)
    try:
        assert not await repository.conversation_exists("conv_" + "a" * 26)
        assert await drop_connections(postgres_url) >= 1
        # Not pinged (used a moment ago): the call fails as an outage, and SQLAlchemy
        # replaces the pool's connections, so the next call works.
        with pytest.raises(StorageUnavailable):
            await repository.conversation_exists("conv_" + "a" * 26)
        assert not await repository.conversation_exists("conv_" + "a" * 26)
    finally:
        await repository.close()
