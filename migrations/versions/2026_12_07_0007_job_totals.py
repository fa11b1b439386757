"""jobs: total_steps and memory_estimate on the row, no longer only in events

The job's step count (known once its worker loaded the model) and the memory estimate (made when the job is
created) were kept only in events (every metrics event's `total_steps`, one message event's data), so readers
searched the event log for them. Existing rows take them from those events.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ESTIMATE_MESSAGE = "Estimated peak GPU memory:%"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("total_steps", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("memory_estimate", sa.JSON(), nullable=True))
    connection = op.get_bind()
    jobs = sa.table("jobs", sa.column("id", sa.String), sa.column("total_steps", sa.Integer), sa.column("memory_estimate", sa.JSON))
    events = sa.table("job_events", sa.column("seq", sa.Integer), sa.column("job_id", sa.String), sa.column("type", sa.String),
                      sa.column("message", sa.Text), sa.column("data", sa.JSON))
    for (job_id,) in connection.execute(sa.select(jobs.c.id)).all():
        estimate = connection.execute(sa.select(events.c.data).where(
            events.c.job_id == job_id, events.c.type == "message", events.c.message.like(ESTIMATE_MESSAGE))
            .order_by(events.c.seq).limit(1)).scalar_one_or_none()
        newest = connection.execute(sa.select(events.c.data).where(events.c.job_id == job_id, events.c.type == "metrics")
                                    .order_by(events.c.seq.desc()).limit(1)).scalar_one_or_none()
        total_steps = (newest or {}).get("total_steps")
        if estimate is not None or total_steps is not None:
            connection.execute(sa.update(jobs).where(jobs.c.id == job_id)
                               .values(memory_estimate=estimate, total_steps=total_steps if isinstance(total_steps, int) else None))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_column("memory_estimate")
        batch_op.drop_column("total_steps")
