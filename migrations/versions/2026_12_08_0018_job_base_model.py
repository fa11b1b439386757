"""jobs.base_model: the base model directory a job's adapter is trained on

A job may continue from a fine-tuned model (`model` an `ft:` model or checkpoint model): `model` keeps the name the
request gave (OpenAI echoes it), `base_model` names the base under it. Rows from before are jobs on a base, so the
column is filled with their `model`.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-08
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("base_model", sa.String(length=256), nullable=True))
    op.execute("UPDATE jobs SET base_model = model")


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_column("base_model")
