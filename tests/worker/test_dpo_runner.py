"""A dpo job through the worker's run_job on a tiny random Llama: it succeeds, its metric rows and events carry the
reward numbers, and its result files are written: the metrics CSV with OpenAI's columns, then the reward columns."""

from __future__ import annotations

import csv
import io
import json

from sqlalchemy import select

from core.tables import File, JobMetric
from tests.worker.helpers import create_job, events, get_job, put_jsonl, stored_config
from tests.worker.test_runner import CSV_HEADER, read_object
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

    # The result CSV: OpenAI's columns, then the reward numbers of each step (and of the steps that evaluated).
    with session_factory() as session:
        csv_key = session.execute(select(File.storage_key).where(File.id == job.result_files[0])).scalar_one()
    table = list(csv.DictReader(io.StringIO(read_object(storage, csv_key).decode())))
    header = list(table[0])
    assert header[:5] == CSV_HEADER and "train_rewards_accuracies" in header and "valid_rewards_margins" in header
    assert [int(r["step"]) for r in table] == [1, 2, 3, 4]
    for row, metric in zip(table, rows, strict=True):
        for name in ("train_loss", "train_rewards_accuracies", "train_rewards_margins", "train_logps_chosen", "train_logps_rejected"):
            assert float(row[name]) == metric.values[name], name
        assert row["train_accuracy"] == "" and row["valid_mean_token_accuracy"] == ""  # no token accuracy in dpo
    assert table[0]["valid_rewards_accuracies"] == "" and float(table[1]["valid_rewards_margins"]) == rows[1].values["valid_rewards_margins"]
