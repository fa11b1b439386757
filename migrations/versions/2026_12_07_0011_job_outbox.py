"""job_outbox: one row per job that reached a terminal status, consumed by the qlora.job_ended task

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "job_outbox",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("sent_at", sa.Float(), nullable=True),
        sa.Column("handled_at", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint("id"),
    )
    with op.batch_alter_table("job_outbox") as batch_op:
        batch_op.create_index("ix_job_outbox_job_id", ["job_id"], unique=False)
        batch_op.create_index("ix_job_outbox_handled_at", ["handled_at"], unique=False)
    # The sweeper's counter of its resends (0005 makes one row per action, so that it only ever increments).
    op.execute("INSERT INTO sweeper_actions (action, count, updated_at) VALUES ('resent_job_ended', 0, NULL)")


def downgrade() -> None:
    op.execute("DELETE FROM sweeper_actions WHERE action = 'resent_job_ended'")
    with op.batch_alter_table("job_outbox") as batch_op:
        batch_op.drop_index("ix_job_outbox_handled_at")
        batch_op.drop_index("ix_job_outbox_job_id")
    op.drop_table("job_outbox")
