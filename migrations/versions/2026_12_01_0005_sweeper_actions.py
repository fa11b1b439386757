"""sweeper_actions: what the sweeper did, counted since the database was made (Prometheus' qlora_sweeper_actions_total)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# One row per action, made here so that the sweeper only ever increments (an UPDATE, never a racing INSERT).
ACTIONS = ("sweeps", "requeued", "failed", "resent", "failed_exports", "resent_exports", "expired_files")


def upgrade() -> None:
    table = op.create_table(
        "sweeper_actions",
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("action"),
    )
    op.bulk_insert(table, [{"action": action, "count": 0, "updated_at": None} for action in ACTIONS])


def downgrade() -> None:
    op.drop_table("sweeper_actions")
