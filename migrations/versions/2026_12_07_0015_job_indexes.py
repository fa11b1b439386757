"""jobs: indexes for the control plane at scale (bench/control_plane.py, docs/operations.md "Scale")

- (project, seq): a project's jobs newest first (GET /v1/fine_tuning/jobs, its cursor) without sorting the
  project's whole history;
- (project, status): the active-job counts that job creation and dispatch take under the project's row lock, without
  reading the project's finished jobs;
- (project, seq) WHERE status = 'queued' AND enqueued_at IS NULL: the jobs waiting their turn (dispatch's next job
  of a project, the sweeper's projects with unsent jobs), a small index however long the backlog.
The single-column (project) index is dropped: both composites begin with it.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNSENT = "status = 'queued' AND enqueued_at IS NULL"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.create_index("ix_jobs_project_seq", ["project", "seq"], unique=False)
        batch_op.create_index("ix_jobs_project_status", ["project", "status"], unique=False)
        batch_op.create_index("ix_jobs_unsent", ["project", "seq"], unique=False, postgresql_where=sa.text(UNSENT),
                              sqlite_where=sa.text(UNSENT))
        batch_op.drop_index("ix_jobs_project")


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.create_index("ix_jobs_project", ["project"], unique=False)
        batch_op.drop_index("ix_jobs_unsent")
        batch_op.drop_index("ix_jobs_project_status")
        batch_op.drop_index("ix_jobs_project_seq")
