"""Bringing a database to the newest schema with Alembic, on an async engine."""

from __future__ import annotations

from collections.abc import Callable

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

SCRIPT_LOCATION = "tokenstream.server.storage:migrations"


def alembic_config(url: str = "") -> Config:
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    if url:
        config.set_main_option("sqlalchemy.url", url)
    return config


def run_alembic(connection: Connection, step: Callable[[Config, str], None], revision: str) -> None:
    """Runs an Alembic command (`command.upgrade`, `command.downgrade`) to `revision` on
    `connection`, inside its transaction."""
    config = alembic_config()
    config.attributes["connection"] = connection
    step(config, revision)


async def upgrade_to_head(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(run_alembic, command.upgrade, "head")
