"""Conversations, streams (with compacted text) and token runs.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from tokenstream.server.storage.sql.schema import UtcDateTime

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "conversations",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("conversation_id", sa.String(length=40), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_conversations")),
        sa.UniqueConstraint("conversation_id", name=op.f("uq_conversations_conversation_id")),
    )
    op.create_table(
        "streams",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("stream_id", sa.String(length=40), nullable=False),
        sa.Column("conversation_id", sa.String(length=40), nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=True),
        sa.Column("request_hash", sa.String(length=64), nullable=True),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("max_tokens", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("final_seq", sa.BigInteger(), nullable=True),
        sa.Column("text", sa.Text(), nullable=True),
        sa.Column("token_ends", sa.LargeBinary(), nullable=True),
        sa.Column("reason", sa.String(length=32), server_default="", nullable=False),
        sa.Column("error", sa.Text(), server_default="", nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("finished_at", UtcDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.conversation_id"],
            name=op.f("fk_streams_conversation_id_conversations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_streams")),
        sa.UniqueConstraint("request_id", name=op.f("uq_streams_request_id")),
        sa.UniqueConstraint("stream_id", name=op.f("uq_streams_stream_id")),
    )
    op.create_index(
        op.f("ix_streams_conversation_id_id"), "streams", ["conversation_id", "id"], unique=False
    )
    op.create_index(op.f("ix_streams_state"), "streams", ["state"], unique=False)
    op.create_table(
        "token_runs",
        sa.Column("stream_id", sa.String(length=40), nullable=False),
        sa.Column("start_seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("end_seq", sa.BigInteger(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("token_ends", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["stream_id"],
            ["streams.stream_id"],
            name=op.f("fk_token_runs_stream_id_streams"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("stream_id", "start_seq", name=op.f("pk_token_runs")),
    )


def downgrade() -> None:
    op.drop_table("token_runs")
    op.drop_index(op.f("ix_streams_state"), table_name="streams")
    op.drop_index(op.f("ix_streams_conversation_id_id"), table_name="streams")
    op.drop_table("streams")
    op.drop_table("conversations")
