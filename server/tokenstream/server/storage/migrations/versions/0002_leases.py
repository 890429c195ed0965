"""Generation leases (owner, expiry) and an index for retention.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from tokenstream.server.storage.sql.schema import UtcDateTime

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("streams") as batch:
        batch.add_column(sa.Column("owner_id", sa.String(length=40), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", UtcDateTime(), nullable=True))
        batch.drop_index("ix_streams_state")
        batch.create_index("ix_streams_state_lease_expires_at", ["state", "lease_expires_at"])
        batch.create_index("ix_streams_finished_at", ["finished_at"])


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        # Dropping columns rebuilds the table on SQLite, and the rebuild's DROP TABLE would
        # cascade to token_runs. Restore a backup instead.
        raise NotImplementedError("0002 cannot be downgraded on SQLite without losing tokens")
    with op.batch_alter_table("streams") as batch:
        batch.drop_index("ix_streams_finished_at")
        batch.drop_index("ix_streams_state_lease_expires_at")
        batch.create_index("ix_streams_state", ["state"])
        batch.drop_column("lease_expires_at")
        batch.drop_column("owner_id")
