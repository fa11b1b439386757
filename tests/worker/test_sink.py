"""DatabaseSink on its own: what it writes while the job is the worker's, and that it writes nothing after."""

from __future__ import annotations

import io
import tarfile
import time

from sqlalchemy import select

from contract.metrics import StepMetrics
from core.db import session_scope
from core.jobs import cancel_job
from core.tables import JobMetric
from tests.worker.helpers import checkpoints, counts, create_job, events, get_job, local_objects
from worker.database_sink import DatabaseSink


def running_job(session_factory, storage, worker_id="w1"):  # noqa: ANN001
    return create_job(session_factory, storage, status="running", worker_id=worker_id, heartbeat_at=time.time() - 10, attempt=1)


def test_sink_writes_events_metrics_and_checkpoints(session_factory, storage, tmp_path):
    job_id = running_job(session_factory, storage)
    lost = []
    sink = DatabaseSink(job_id, "w1", session_factory, storage, on_lost=lambda: lost.append(True))
    before = get_job(session_factory, job_id).heartbeat_at

    sink.start(total_steps=10)
    sink.event("info", "Model loaded", {"total_steps": 10, "nested": {"x": float("inf")}})
    sink.event("warning", "careful")  # the engine's levels are info/warn/error; anything else is mapped
    sink.metrics(1, StepMetrics(step=1, train_loss=2.5, train_mean_token_accuracy=0.25, learning_rate=1e-4, tokens=40))
    sink.metrics(2, StepMetrics(step=2, train_loss=float("nan"), train_mean_token_accuracy=0.5, valid_loss=2.0,
                                valid_mean_token_accuracy=0.5, tokens=40))
    sink.metrics(2, StepMetrics(step=2, train_loss=1.5, train_mean_token_accuracy=0.5, tokens=40))  # a step produced again

    evs = events(session_factory, job_id)
    assert [(e.level, e.type) for e in evs] == [("info", "message"), ("warn", "message")] + [("info", "metrics")] * 3
    assert evs[0].data == {"total_steps": 10, "nested": {"x": None}}  # JSON-safe: PostgreSQL rejects NaN/Infinity
    assert evs[2].message == "Step 1/10: training loss=2.5000"
    assert list(evs[2].data)[:3] == ["step", "train_loss", "train_mean_token_accuracy"]
    assert evs[2].data["learning_rate"] == 1e-4 and evs[2].data["total_steps"] == 10
    assert evs[3].data["train_loss"] is None and evs[3].message == "Step 2/10: training loss=n/a, validation loss=2.0000"
    with session_scope(session_factory) as session:
        rows = session.execute(select(JobMetric.step, JobMetric.values).where(JobMetric.job_id == job_id).order_by(JobMetric.step)).all()
    assert [(step, values["train_loss"]) for step, values in rows] == [(1, 2.5), (2, 1.5)]  # upserted by (job, step)
    job = get_job(session_factory, job_id)
    assert job.heartbeat_at > before and job.estimated_finish is not None and job.estimated_finish >= int(time.time()) - 1
    assert job.total_steps == 10  # on the row, where the job object and /metrics read it

    ckpt_dir = tmp_path / "step-000002"
    ckpt_dir.mkdir()
    (ckpt_dir / "adapter_config.json").write_text("{}")
    (ckpt_dir / "trainer_state.pt").write_bytes(b"state")
    sink.checkpoint(2, ckpt_dir, StepMetrics(step=2, train_loss=1.5, learning_rate=1e-4))
    [ckpt] = checkpoints(session_factory, job_id)
    assert ckpt.step == 2 and ckpt.metrics == {"step": 2.0, "train_loss": 1.5}
    assert ckpt.fine_tuned_model_checkpoint.endswith(f":{job_id.removeprefix('ftjob-')}:ckpt-step-2")
    with tarfile.open(fileobj=io.BytesIO(b"".join(storage.iter_bytes(ckpt.storage_key))), mode="r:gz") as tar:
        assert sorted(tar.getnames()) == ["adapter_config.json", "trainer_state.pt"]
    assert lost == [] and not list(tmp_path.glob(".step-*"))  # the temporary archive is gone


def test_sink_writes_nothing_once_the_job_is_not_its_own(session_factory, storage, tmp_path):
    job_id = running_job(session_factory, storage)
    lost = []
    sink = DatabaseSink(job_id, "w1", session_factory, storage, on_lost=lambda: lost.append(True))
    sink.event("info", "before")
    with session_scope(session_factory) as session:
        assert cancel_job(session, job_id)
    at_cancel = counts(session_factory, job_id)
    objects = local_objects(storage.root)

    ckpt_dir = tmp_path / "step-000001"
    ckpt_dir.mkdir()
    (ckpt_dir / "adapter_config.json").write_text("{}")
    sink.checkpoint(1, ckpt_dir, StepMetrics(step=1))
    assert lost == [True] and sink.lost
    sink.metrics(1, StepMetrics(step=1, train_loss=1.0))
    sink.event("info", "after")
    assert counts(session_factory, job_id) == at_cancel
    assert local_objects(storage.root) == objects  # the checkpoint object uploaded for the failed write was deleted

    # Another worker's run (a takeover) is not ours either.
    other = running_job(session_factory, storage, worker_id="w2")
    other_lost = []
    DatabaseSink(other, "w1", session_factory, storage, on_lost=lambda: other_lost.append(True)).event("info", "x")
    assert other_lost == [True] and events(session_factory, other) == []


def test_a_step_updates_the_job_row_once(session_factory, storage):
    """A step's write renews the lease and stores the estimated finish in one UPDATE of the job row (one new row version
    per step: the jobs table is the hottest row set of the service), beside its metrics row and event."""
    from sqlalchemy import event

    job_id = running_job(session_factory, storage)
    sink = DatabaseSink(job_id, "w1", session_factory, storage, on_lost=lambda: None)
    sink.start(total_steps=10)
    sink.metrics(1, StepMetrics(step=1, train_loss=2.5, tokens=40))  # the estimate's origin
    time.sleep(0.01)
    engine = session_factory.kw["bind"]
    statements: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        statements.append(" ".join(statement.split()).upper())

    event.listen(engine, "before_cursor_execute", count)
    try:
        sink.metrics(2, StepMetrics(step=2, train_loss=2.0, tokens=40))
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert sum(s.startswith("UPDATE JOBS") for s in statements) == 1, statements
    assert get_job(session_factory, job_id).estimated_finish is not None
