"""job_end_counts, and a partial index of the jobs not yet ended by status (docs/operations.md "Metrics")

/metrics reported jobs by status with a count over the whole jobs table at every scrape: work that grows with the
history. The ended jobs are now counted as they end (one row per terminal status, updated in the transaction that
ends the job; filled here from the jobs already ended), and the others through this index.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-08
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ACTIVE = "status IN ('queued', 'running', 'paused')"
TERMINAL = ("succeeded", "failed", "cancelled")


def upgrade() -> None:
    op.create_table(
        "job_end_counts",
        sa.Column("status", sa.String(length=32), primary_key=True),
        sa.Column("count", sa.BigInteger(), nullable=False),
    )
    for status in TERMINAL:
        op.execute(sa.text("INSERT INTO job_end_counts (status, count) SELECT :status, count(*) FROM jobs WHERE status = :status")
                   .bindparams(status=status))
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.create_index("ix_jobs_active_status", ["status"], unique=False, postgresql_where=sa.text(ACTIVE), sqlite_where=sa.text(ACTIVE))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_index("ix_jobs_active_status")
    op.drop_table("job_end_counts")
