"""exports.reserved_bytes: what a queued or running export holds against its project's stored-bytes limit

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("exports") as batch_op:
        batch_op.add_column(sa.Column("reserved_bytes", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("exports") as batch_op:
        batch_op.drop_column("reserved_bytes")
