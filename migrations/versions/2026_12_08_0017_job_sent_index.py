"""jobs: a partial index of the queued jobs whose task was sent, by enqueued_at (docs/operations.md "Scale")

The sweeper asks every pass for the queued jobs sent before a time (expired messages, lost messages). Without this
index that is a scan of the whole jobs table (every queued job of every backlog, and the history); with it, a read of
the few jobs whose message waits in the broker (at most QLORA_QUEUED_MESSAGES_PER_PROJECT per project).

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-08
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SENT = "status = 'queued' AND enqueued_at IS NOT NULL"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.create_index("ix_jobs_sent", ["enqueued_at"], unique=False, postgresql_where=sa.text(SENT), sqlite_where=sa.text(SENT))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_index("ix_jobs_sent")
