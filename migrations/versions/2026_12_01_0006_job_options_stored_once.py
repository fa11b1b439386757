"""jobs: the hyperparameters as given plus the resolved config (training_config); method and seed columns gone

A job stored its resolved hyperparameters twice (`hyperparameters` and `method`) and its seed twice. Now
`hyperparameters` holds the object as the request gave it and `training_config` the options resolved from it
(seed included); the wire's `hyperparameters`, `method` and `seed` are rendered from the two. Existing rows did
not keep the object as given: their three OpenAI keys (resolved numbers) stand in for it, which renders the same
wire values.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

from contract.hyperparameters import OPENAI_KEYS, wire_hyperparameters

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("training_config", sa.JSON(), nullable=True))
    connection = op.get_bind()
    old = sa.table("jobs", sa.column("id", sa.String), sa.column("hyperparameters", sa.JSON), sa.column("seed", sa.BigInteger))
    new = sa.table("jobs", sa.column("id", sa.String), sa.column("hyperparameters", sa.JSON), sa.column("training_config", sa.JSON))
    for job_id, echoed, seed in connection.execute(sa.select(old.c.id, old.c.hyperparameters, old.c.seed)).all():
        echoed = dict(echoed or {})
        given = {key: echoed[key] for key in OPENAI_KEYS if key in echoed}
        config: dict[str, Any] = {key: value for key, value in echoed.items() if key != "learning_rate_multiplier"}
        config["seed"] = seed
        connection.execute(sa.update(new).where(new.c.id == job_id).values(hyperparameters=given, training_config=config))
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.alter_column("training_config", existing_type=sa.JSON(), nullable=False)
        batch_op.drop_column("method")
        batch_op.drop_column("seed")


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("method", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("seed", sa.BigInteger(), nullable=True))
    connection = op.get_bind()
    jobs = sa.table("jobs", sa.column("id", sa.String), sa.column("hyperparameters", sa.JSON), sa.column("training_config", sa.JSON),
                    sa.column("method", sa.JSON), sa.column("seed", sa.BigInteger))
    for job_id, given, config in connection.execute(sa.select(jobs.c.id, jobs.c.hyperparameters, jobs.c.training_config)).all():
        echoed = wire_hyperparameters(dict(given or {}), dict(config))
        connection.execute(sa.update(jobs).where(jobs.c.id == job_id).values(
            hyperparameters=echoed, method={"type": "supervised", "supervised": {"hyperparameters": echoed}}, seed=config["seed"]))
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.alter_column("seed", existing_type=sa.BigInteger(), nullable=False)
        batch_op.drop_column("training_config")

