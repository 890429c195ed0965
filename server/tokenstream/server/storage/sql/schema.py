"""Table definitions. Alembic migrations create them; this module mirrors the head revision."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
)


class UtcDateTime(TypeDecorator[datetime]):
    """Stores naive UTC and reads back aware UTC on every engine (SQLite has no time zones)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are ambiguous; pass an aware datetime")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC)


metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

conversations = Table(
    "conversations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("conversation_id", String(40), nullable=False, unique=True),
    Column("created_at", UtcDateTime(), nullable=False),
)

streams = Table(
    "streams",
    metadata,
    # Monotonic position: orders a conversation's turns and backs history page tokens.
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("stream_id", String(40), nullable=False, unique=True),
    Column(
        "conversation_id",
        String(40),
        ForeignKey("conversations.conversation_id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("request_id", String(128), nullable=True, unique=True),
    Column("request_hash", String(64), nullable=True),
    Column("prompt", Text, nullable=False),
    Column("model", String(64), nullable=False),
    Column("max_tokens", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    # Set when the stream ends: last seq (-1 for none), and the compacted response.
    Column("final_seq", BigInteger, nullable=True),
    Column("text", Text, nullable=True),
    Column("token_ends", LargeBinary, nullable=True),
    Column("reason", String(32), nullable=False, server_default=""),
    Column("error", Text, nullable=False, server_default=""),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("finished_at", UtcDateTime(), nullable=True),
    # The server generating an active stream, and until when its claim holds unless renewed.
    Column("owner_id", String(40), nullable=True),
    Column("lease_expires_at", UtcDateTime(), nullable=True),
    # Who submitted it (NULL when the server ran without authentication).
    Column("author", String(200), nullable=True),
    Index(None, "conversation_id", "id"),
    Index(None, "state", "lease_expires_at"),
    Index(None, "finished_at"),
)

# Tokens of streams that have not ended yet, one row per stream per group commit. They
# are written only for active streams and deleted when the stream ends, so no foreign key
# checks each one (see revision 0005). SQLite clusters them by their key (WITHOUT ROWID).
token_runs = Table(
    "token_runs",
    metadata,
    Column("stream_id", String(40), primary_key=True),
    Column("start_seq", BigInteger, primary_key=True, autoincrement=False),
    Column("end_seq", BigInteger, nullable=False),
    Column("text", Text, nullable=False),
    Column("token_ends", LargeBinary, nullable=False),
    sqlite_with_rowid=False,
)

# Who belongs to a conversation, and with which role (1 owner, 2 member, 3 viewer).
members = Table(
    "members",
    metadata,
    Column(
        "conversation_id",
        String(40),
        ForeignKey("conversations.conversation_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("user_id", String(200), primary_key=True),
    Column("role", Integer, nullable=False),
    Column("added_at", UtcDateTime(), nullable=False),
    Index(None, "user_id"),
)

# What happened in each conversation, numbered from 0 per conversation (WatchConversation).
conversation_events = Table(
    "conversation_events",
    metadata,
    Column(
        "conversation_id",
        String(40),
        ForeignKey("conversations.conversation_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("at", UtcDateTime(), nullable=False),
    Column("actor", String(200), nullable=True),
    Column("kind", String(32), nullable=False),
    Column("data", Text, nullable=False),  # JSON object
)
