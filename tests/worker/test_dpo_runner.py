"""A dpo job through the worker's run_job on a tiny random Llama: it succeeds, its metric rows and events carry the
reward numbers, and its result files are written."""

from __future__ import annotations

import json

from sqlalchemy import select

from core.tables import JobMetric
from tests.worker.helpers import create_job, events, get_job, put_jsonl, stored_config
from worker import runner


def pair_lines(n: int) -> list[str]:
    return [json.dumps({"input": {"messages": [{"role": "user", "content": f"q {i}"}]},
                        "preferred_output": [{"role": "assistant", "content": f"Sure: a {i}"}],
                        "non_preferred_output": [{"role": "assistant", "content": f"a {i}"}]}) for i in range(n)]


def test_a_dpo_job_runs_to_succeeded_with_reward_metrics(make_settings, session_factory, storage):
    train_file = put_jsonl(session_factory, storage, pair_lines(12))
    valid_file = put_jsonl(session_factory, storage, pair_lines(3), filename="valid.jsonl")
    job_id = create_job(session_factory, storage, training_file=train_file, validation_file=valid_file,
                        hyper=stored_config(method="dpo", beta=0.2, rpo_alpha=1.0, max_seq_length=128, eval_every=2))
    assert runner.run_job(job_id, make_settings(), session_factory, storage) == runner.SUCCEEDED
    job = get_job(session_factory, job_id)
    assert job.status == "succeeded" and len(job.result_files) == 2
    with session_factory() as session:
        rows = session.execute(select(JobMetric).where(JobMetric.job_id == job_id).order_by(JobMetric.step)).scalars().all()
    assert [r.step for r in rows] == [1, 2, 3, 4]
    assert all("train_rewards_margins" in r.values and "train_rewards_accuracies" in r.values for r in rows)
    assert "valid_rewards_accuracies" in rows[1].values and "valid_logps_chosen" in rows[-1].values
    assert any(e.message.startswith("Reference log-probs computed") for e in events(session_factory, job_id))
