"""jobs: the training method is an option of the stored config (training_config["method"])

A job's method (OpenAI's `method.type`) becomes `TrainingConfig.method`, stored with the other resolved options
and echoed from there. Every job created before this revision was a supervised one (the only method there was),
so existing rows get that value. A downgrade removes the option again, and refuses while a job of another method
exists: the older schema could not show or run it.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The one method before this revision. Written out, not imported: a migration records the past.
EARLIER_METHOD = "supervised"

jobs = sa.table("jobs", sa.column("id", sa.String), sa.column("training_config", sa.JSON))


def upgrade() -> None:
    connection = op.get_bind()
    for job_id, config in connection.execute(sa.select(jobs.c.id, jobs.c.training_config)).all():
        if "method" not in config:
            connection.execute(sa.update(jobs).where(jobs.c.id == job_id).values(training_config={"method": EARLIER_METHOD, **config}))


def downgrade() -> None:
    connection = op.get_bind()
    rows = connection.execute(sa.select(jobs.c.id, jobs.c.training_config)).all()
    others = [job_id for job_id, config in rows if config.get("method", EARLIER_METHOD) != EARLIER_METHOD]
    if others:
        raise RuntimeError(f"{len(others)} jobs (e.g. {others[0]}) use a method other than {EARLIER_METHOD!r}, which the "
                           "schema before this revision cannot hold; delete them first")
    for job_id, config in rows:
        if "method" in config:
            connection.execute(sa.update(jobs).where(jobs.c.id == job_id).values(
                training_config={k: v for k, v in config.items() if k != "method"}))
