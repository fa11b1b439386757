"""exports: merged exports of fine-tuned models (POST /v1/fine_tuning/jobs/{job_id}/export)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "exports",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("file_id", sa.String(length=64), nullable=True),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("finished_at", sa.BigInteger(), nullable=True),
        sa.Column("started_at", sa.BigInteger(), nullable=True),
        sa.Column("enqueued_at", sa.Float(), nullable=True),
        sa.Column("worker_id", sa.String(length=256), nullable=True),
        sa.Column("heartbeat_at", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint("id"),
    )
    with op.batch_alter_table("exports") as batch_op:
        batch_op.create_index("ix_exports_job_seq", ["job_id", "seq"], unique=False)
        batch_op.create_index("ix_exports_status", ["status"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("exports") as batch_op:
        batch_op.drop_index("ix_exports_status")
        batch_op.drop_index("ix_exports_job_seq")
    op.drop_table("exports")
