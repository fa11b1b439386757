"""files.kind: what a validated file is for, "supervised" (examples) or "preference" (pairs for method dpo)

A job's method must match its files (a 400 on training_file / validation_file otherwise), so the upload records
the shape it found. Files uploaded before this revision could not hold pairs (they failed validation), so the
processed ones are supervised; a file that failed validation has no kind.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("files") as batch_op:
        batch_op.add_column(sa.Column("kind", sa.String(length=16), nullable=True))
    files = sa.table("files", sa.column("status", sa.String), sa.column("kind", sa.String))
    op.execute(sa.update(files).where(files.c.status == "processed").values(kind="supervised"))


def downgrade() -> None:
    with op.batch_alter_table("files") as batch_op:
        batch_op.drop_column("kind")
