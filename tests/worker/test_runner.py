"""run_job in-process on a tiny random Llama: the whole life of a job against real PostgreSQL and SQLite."""

from __future__ import annotations

import csv
import io
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select, update

from api.schemas import FineTuningJob
from core.db import session_scope
from core.jobs import cancel_job
from core.model_names import fine_tuned_model_name
from core.storage import S3Storage
from core.tables import File, Job, JobMetric
from tests.worker.helpers import (
    MODEL,
    PROJECT,
    chat_lines,
    checkpoints,
    counts,
    create_job,
    events,
    get_job,
    local_objects,
    metric_steps,
    put_jsonl,
    stored_config,
    wait_until,
)
from worker import runner
from worker.database_sink import DatabaseSink
from worker.runner import results as runner_results
from worker.sweeper import sweep

CSV_HEADER = ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]


class RecordingCelery:
    """Stands in for the Celery app where a test only needs to see what was sent."""

    def __init__(self):
        self.sent: list[tuple[str, list, str, int]] = []

    def send_task(self, name, args=None, queue=None, expires=None, **_):  # noqa: ANN001
        self.sent.append((name, list(args or []), queue, expires))


def read_object(storage, key: str) -> bytes:  # noqa: ANN001
    return b"".join(storage.iter_bytes(key))


def unpack(data: bytes, target: Path) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        names = tar.getnames()
        tar.extractall(target, filter="data")
    return names


def leftover_workdirs(job_id: str) -> list[Path]:
    return list(Path(tempfile.gettempdir()).glob(f"qlora-{job_id}-*"))


def test_job_runs_to_succeeded_and_writes_everything(make_settings, session_factory, storage, models_dir, tmp_path):
    settings = make_settings()
    valid_file = put_jsonl(session_factory, storage, chat_lines(4), filename="valid.jsonl")
    job_id = create_job(session_factory, storage, validation_file=valid_file, hyper=stored_config(eval_every=3))

    assert runner.run_job(job_id, settings, session_factory, storage) == runner.SUCCEEDED

    job = get_job(session_factory, job_id)
    model_name = fine_tuned_model_name(MODEL, PROJECT, "unit", job_id)
    assert job.status == "succeeded" and job.error is None and job.finished_at is not None
    assert job.fine_tuned_model == model_name == f"ft:{MODEL}:{PROJECT}:unit:{job_id.removeprefix('ftjob-')}"
    assert job.attempt == 1 and job.estimated_finish is not None

    # metrics: one row a step, with the engine's values
    assert metric_steps(session_factory, job_id) == [1, 2, 3, 4]
    with session_scope(session_factory) as session:
        metric_values = {m.step: m.values for m in session.execute(select(JobMetric).where(JobMetric.job_id == job_id)).scalars()}
    assert job.trained_tokens == sum(v["tokens"] for v in metric_values.values()) > 0
    assert "valid_loss" in metric_values[3] and "valid_loss" in metric_values[4] and "valid_loss" not in metric_values[1]

    # events: info messages and one metrics event a step, in order
    evs = events(session_factory, job_id)
    assert {e.level for e in evs} <= {"info", "warn"}
    assert evs[0].message == "Fine-tuning job started"
    assert evs[-1].message == "The job has successfully completed"
    metric_events = [e for e in evs if e.type == "metrics"]
    assert [e.data["step"] for e in metric_events] == [1, 2, 3, 4]
    for e in metric_events:
        assert e.level == "info" and e.message.startswith(f"Step {e.data['step']}/4: training loss=")
        assert e.data["train_loss"] == pytest.approx(metric_values[e.data["step"]]["train_loss"])
        assert {"train_mean_token_accuracy", "learning_rate", "tokens_per_second", "total_steps"} <= set(e.data)
    assert "valid_mean_token_accuracy" in metric_events[3].data and "validation loss=" in metric_events[3].message
    assert any(e.type == "message" and e.message.startswith("Training file: 12 examples") for e in evs)

    # checkpoints: rows + archives in storage
    ckpts = checkpoints(session_factory, job_id)
    assert [c.step for c in ckpts] == [2, 4]
    for c in ckpts:
        assert c.id.startswith("ftckpt_") and c.storage_key.startswith(f"checkpoints/{job_id}/step-{c.step:06d}")
        assert c.fine_tuned_model_checkpoint == f"{model_name}:ckpt-step-{c.step}"
        assert c.metrics["step"] == c.step and c.metrics["train_loss"] == pytest.approx(metric_values[c.step]["train_loss"])
        assert set(c.metrics) <= {"step", "train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy"}
        names = unpack(read_object(storage, c.storage_key), tmp_path / f"ckpt-{c.step}")
        assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.pt", "trainer_state.json"} <= set(names)
    assert "valid_loss" in ckpts[1].metrics

    # result files: [csv, adapter], rows of the job's project
    assert len(job.result_files) == 2
    with session_scope(session_factory) as session:
        files = {f.id: f for f in session.execute(select(File).where(File.id.in_(job.result_files))).scalars()}
    csv_file, adapter_file = files[job.result_files[0]], files[job.result_files[1]]
    for f in (csv_file, adapter_file):
        assert f.project == PROJECT and f.purpose == "fine-tune-results" and f.status == "processed"
        data = read_object(storage, f.storage_key)
        assert f.bytes == len(data) and len(f.sha256) == 64
    assert csv_file.filename == f"{job_id}-metrics.csv" and adapter_file.filename == f"{job_id}-adapter.tar.gz"

    rows = list(csv.reader(io.StringIO(read_object(storage, csv_file.storage_key).decode())))
    assert rows[0] == CSV_HEADER
    assert [int(r[0]) for r in rows[1:]] == [1, 2, 3, 4]
    first, third = rows[1], rows[3]
    assert float(first[1]) == pytest.approx(metric_values[1]["train_loss"])
    assert float(first[2]) == pytest.approx(metric_values[1]["train_mean_token_accuracy"])
    assert first[3] == "" and first[4] == ""
    assert float(third[3]) == pytest.approx(metric_values[3]["valid_loss"]) and third[4] != ""

    # the adapter archive holds a peft adapter at its root that loads onto the base model, trained (lora_B != 0)
    adapter_dir = tmp_path / "adapter"
    names = unpack(read_object(storage, adapter_file.storage_key), adapter_dir)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(names) and all("/" not in n for n in names)
    assert "trainer_state.pt" not in names
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models_dir / MODEL), adapter_dir)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.abs().sum()) > 0 for p in lora_b)

    # a second task for the same job does nothing: the claim fails
    before = counts(session_factory, job_id)
    assert runner.run_job(job_id, settings, session_factory, storage) == runner.NOT_CLAIMED
    assert counts(session_factory, job_id) == before
    again = get_job(session_factory, job_id)
    assert (again.status, again.attempt, again.result_files) == ("succeeded", 1, job.result_files)
    assert leftover_workdirs(job_id) == []


def test_job_runs_with_s3_storage(postgres_url, s3_endpoint, aws_test_credentials, models_dir, tmp_path):
    from core.db import make_engine, make_session_factory
    from core.settings import Settings

    settings = Settings(home=tmp_path, database_url=postgres_url, storage="s3", s3_endpoint=s3_endpoint,
                        s3_bucket="qlora-worker-test", s3_region="us-east-1", models_dir=models_dir, heartbeat_interval_s=0.2)
    storage = S3Storage(settings.s3_bucket, settings.s3_endpoint, settings.s3_region)
    storage.ensure_bucket()
    engine = make_engine(postgres_url)
    try:
        factory = make_session_factory(engine)
        job_id = create_job(factory, storage)
        assert runner.run_job(job_id, settings, factory, storage) == runner.SUCCEEDED
        job = get_job(factory, job_id)
        keys = {o["Key"] for o in storage.client.list_objects_v2(Bucket=settings.s3_bucket)["Contents"]}
        ckpt_keys = {c.storage_key for c in checkpoints(factory, job_id)}
        with session_scope(factory) as session:
            result_keys = dict(session.execute(select(File.filename, File.storage_key).where(File.id.in_(job.result_files))).all())
        assert len(ckpt_keys) == 2 and len(result_keys) == 2
        assert ckpt_keys | set(result_keys.values()) <= keys
        assert read_object(storage, result_keys[f"{job_id}-metrics.csv"]).startswith(b"step,train_loss,train_accuracy,")
        names = unpack(read_object(storage, result_keys[f"{job_id}-adapter.tar.gz"]), tmp_path / "adapter")
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(names)
    finally:
        engine.dispose()


def test_cancel_stops_the_run_and_nothing_is_written_after_it(make_settings, session_factory, storage, tmp_path):
    settings = make_settings(heartbeat_interval_s=0.2)
    job_id = create_job(session_factory, storage, hyper=stored_config(max_steps=100000, checkpoint_every=1))
    at_cancel: dict = {}

    def cancel_when_training():
        wait_until(lambda: len(metric_steps(session_factory, job_id)) >= 2, timeout_s=60, interval_s=0.02, message="two steps")
        with session_scope(session_factory) as session:
            assert cancel_job(session, job_id)
        at_cancel["time"] = time.monotonic()
        at_cancel["counts"] = counts(session_factory, job_id)
        at_cancel["checkpoints"] = {c.storage_key for c in checkpoints(session_factory, job_id)}

    canceller = threading.Thread(target=cancel_when_training)
    canceller.start()
    outcome = runner.run_job(job_id, settings, session_factory, storage)
    returned = time.monotonic()
    canceller.join()

    assert outcome == runner.STOPPED
    assert returned - at_cancel["time"] < 5, "the worker should stop within a few heartbeats"
    assert counts(session_factory, job_id) == at_cancel["counts"]
    assert {c.storage_key for c in checkpoints(session_factory, job_id)} == at_cancel["checkpoints"]
    job = get_job(session_factory, job_id)
    assert job.status == "cancelled" and job.result_files == [] and job.fine_tuned_model is None
    assert events(session_factory, job_id)[-1].message == "Job cancelled"
    # no orphan objects: the training file and the registered checkpoints only (uploads after the cancel were deleted)
    training_key = f"files/{job.training_file}"
    assert local_objects(storage.root) == {training_key} | at_cancel["checkpoints"]
    assert leftover_workdirs(job_id) == []


def test_invalid_training_data_fails_naming_the_line(make_settings, session_factory, storage):
    lines = chat_lines(12)
    lines[2] = '{"messages": [{"role": "user", "content": "q"}]}'  # line 3: no assistant message
    training_file = put_jsonl(session_factory, storage, lines)
    job_id = create_job(session_factory, training_file=training_file)

    assert runner.run_job(job_id, make_settings(), session_factory, storage) == runner.FAILED
    job = get_job(session_factory, job_id)
    assert job.status == "failed" and job.finished_at is not None
    assert job.error["code"] == "invalid_training_file" and job.error["param"] == "training_file"
    assert "line 3" in job.error["message"] and "assistant" in job.error["message"]
    last = events(session_factory, job_id)[-1]
    assert last.level == "error" and last.message == job.error["message"]
    assert counts(session_factory, job_id)["metrics"] == 0


def test_invalid_validation_file_is_named(make_settings, session_factory, storage):
    valid_file = put_jsonl(session_factory, storage, ["not json", *chat_lines(3)], filename="valid.jsonl")
    job_id = create_job(session_factory, storage, validation_file=valid_file)
    assert runner.run_job(job_id, make_settings(), session_factory, storage) == runner.FAILED
    error = get_job(session_factory, job_id).error
    assert error["code"] == "invalid_validation_file" and error["param"] == "validation_file" and "line 1" in error["message"]


@pytest.mark.parametrize(("change", "code", "param"), [
    ({"lora_rank": 8}, "unknown_hyperparameter", "lora_rank"),
    ({"lora_r": 0}, "invalid_hyperparameter", "lora_r"),
])
def test_bad_hyperparameter_fails_with_param(make_settings, session_factory, storage, change, code, param):
    job_id = create_job(session_factory, storage, hyper={**stored_config(), **change})
    assert runner.run_job(job_id, make_settings(), session_factory, storage) == runner.FAILED
    job = get_job(session_factory, job_id)
    assert job.status == "failed"
    assert job.error["code"] == code and job.error["param"] == param and param in job.error["message"]


def worker_dies_after(monkeypatch, session_factory, job_id: str, method: str, at_step: int) -> None:  # noqa: ANN001
    """The worker "dies" right after DatabaseSink.`method` reports step `at_step`: its heartbeat stops and nobody
    owns the run any more (what the sweeper then sees)."""
    original = getattr(DatabaseSink, method)

    def then_die(self, step, *args):  # noqa: ANN001, ANN002
        original(self, step, *args)
        if step == at_step:
            with session_scope(session_factory) as session:
                session.execute(update(Job).where(Job.id == job_id).values(worker_id="dead-worker", heartbeat_at=time.time() - 3600))

    monkeypatch.setattr(DatabaseSink, method, then_die)


def test_lost_worker_is_resumed_from_its_checkpoint(make_settings, session_factory, storage, monkeypatch):
    settings = make_settings(heartbeat_timeout_s=60)
    job_id = create_job(session_factory, storage, hyper=stored_config(max_steps=6, checkpoint_every=2))
    worker_dies_after(monkeypatch, session_factory, job_id, "checkpoint", 4)
    assert runner.run_job(job_id, settings, session_factory, storage) == runner.STOPPED
    monkeypatch.undo()
    assert get_job(session_factory, job_id).status == "running"
    assert metric_steps(session_factory, job_id) == [1, 2, 3, 4]  # step 5 was not written: the run was no longer ours
    step4 = checkpoints(session_factory, job_id)[-1]
    assert step4.step == 4

    celery = RecordingCelery()
    assert sweep(settings, session_factory, celery) == {"requeued": [job_id], "failed": [], "sent": [job_id], "failed_exports": [], "sent_exports": [], "sent_webhooks": []}
    assert celery.sent == [("qlora.train", [job_id], settings.task_queue, settings.task_expires_s)]
    job = get_job(session_factory, job_id)
    assert (job.status, job.resume_checkpoint, job.worker_id) == ("queued", step4.id, None) and job.enqueued_at is not None
    assert "resuming from the checkpoint at step 4" in events(session_factory, job_id)[-1].message

    assert runner.run_job(job_id, settings, session_factory, storage) == runner.SUCCEEDED
    job = get_job(session_factory, job_id)
    assert job.status == "succeeded" and job.attempt == 2
    assert metric_steps(session_factory, job_id) == [1, 2, 3, 4, 5, 6]
    evs = events(session_factory, job_id)
    assert [e.data["step"] for e in evs if e.type == "metrics"] == [1, 2, 3, 4, 5, 6]  # the resumed run starts at 5
    assert any(e.message.startswith("Resumed from") and e.message.endswith("at step 4") for e in evs)
    assert [c.step for c in checkpoints(session_factory, job_id)] == [2, 4, 6]
    with session_scope(session_factory) as session:
        tokens = sum(v["tokens"] for v in session.execute(select(JobMetric.values).where(JobMetric.job_id == job_id)).scalars())
    assert job.trained_tokens == tokens  # the resumed position carries the tokens of the first run


def test_cancel_while_results_upload_discards_them(make_settings, session_factory, storage, monkeypatch):
    job_id = create_job(session_factory, storage)
    original = runner_results.pack_directory

    def cancel_then_pack(directory, archive):  # noqa: ANN001
        with session_scope(session_factory) as session:  # the cancel lands after training, before the results commit
            assert cancel_job(session, job_id)
        return original(directory, archive)

    monkeypatch.setattr(runner_results, "pack_directory", cancel_then_pack)
    assert runner.run_job(job_id, make_settings(), session_factory, storage) == runner.STOPPED
    job = get_job(session_factory, job_id)
    assert job.status == "cancelled" and job.result_files == [] and job.fine_tuned_model is None
    with session_scope(session_factory) as session:
        assert session.execute(select(File).where(File.purpose == "fine-tune-results")).first() is None
    ckpt_keys = {c.storage_key for c in checkpoints(session_factory, job_id)}
    assert local_objects(storage.root) == {f"files/{job.training_file}"} | ckpt_keys  # uploaded results were deleted
    assert events(session_factory, job_id)[-1].message == "Job cancelled"


@pytest.mark.parametrize("model", ["no-such-model", "../outside"])
def test_unknown_base_model_fails_with_param_model(make_settings, session_factory, storage, model):
    job_id = create_job(session_factory, storage)
    with session_scope(session_factory) as session:
        session.execute(update(Job).where(Job.id == job_id).values(model=model))
    assert runner.run_job(job_id, make_settings(), session_factory, storage) == runner.FAILED
    error = get_job(session_factory, job_id).error
    assert error["code"] == "model_not_found" and error["param"] == "model"


def test_auto_compute_dtype_is_decided_by_the_worker_and_stored(make_settings, session_factory, storage, monkeypatch):
    """The worker resolves 'auto' for its device (here: a CPU without native bf16, injected) and records the choice
    in the stored config, which the wire's hyperparameters and method both show."""
    from worker.training import model as model_module

    monkeypatch.setattr(model_module, "cpu_bf16_is_fast", lambda: False)
    hyper = stored_config()
    assert hyper["compute_dtype"] == "auto"
    job_id = create_job(session_factory, storage, hyper=hyper)
    assert runner.run_job(job_id, make_settings(), session_factory, storage) == runner.SUCCEEDED
    job = get_job(session_factory, job_id)
    wire = FineTuningJob.from_row(job)
    assert wire.hyperparameters["compute_dtype"] == "fp32"
    assert wire.method["supervised"]["hyperparameters"]["compute_dtype"] == "fp32"
    assert job.training_config["lora_r"] == hyper["lora_r"]  # the rest as stored
    loaded = next(e for e in events(session_factory, job_id) if e.message.startswith("Model loaded"))
    assert loaded.data["compute_dtype"] == "fp32"


def test_a_non_finite_loss_fails_the_job_with_its_own_code(make_settings, session_factory, storage, models_dir, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    broken_models = tmp_path / "models"
    shutil.copytree(models_dir / MODEL, broken_models / MODEL)
    weights = load_file(broken_models / MODEL / "model.safetensors")
    name = next(k for k in weights if "embed_tokens" in k)
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, broken_models / MODEL / "model.safetensors", metadata={"format": "pt"})

    job_id = create_job(session_factory, storage)
    assert runner.run_job(job_id, make_settings(models_dir=broken_models), session_factory, storage) == runner.FAILED
    job = get_job(session_factory, job_id)
    assert job.error["code"] == "non_finite_loss" and "not a finite number" in job.error["message"]
    assert counts(session_factory, job_id)["checkpoints"] == 0 and metric_steps(session_factory, job_id) == []


def test_a_worker_lost_after_its_final_checkpoint_is_finished_cleanly(make_settings, session_factory, storage, monkeypatch):
    """The worker dies between the final checkpoint and 'succeeded': the resumed run trains nothing, publishes that
    checkpoint as the adapter, and the job succeeds with each step and checkpoint recorded once."""
    settings = make_settings(heartbeat_timeout_s=60)
    job_id = create_job(session_factory, storage, hyper=stored_config(max_steps=4, checkpoint_every=2))
    worker_dies_after(monkeypatch, session_factory, job_id, "checkpoint", 4)
    assert runner.run_job(job_id, settings, session_factory, storage) == runner.STOPPED
    monkeypatch.undo()
    assert sweep(settings, session_factory, RecordingCelery())["requeued"] == [job_id]

    assert runner.run_job(job_id, settings, session_factory, storage) == runner.SUCCEEDED
    job = get_job(session_factory, job_id)
    assert job.status == "succeeded" and job.attempt == 2 and len(job.result_files) == 2
    assert metric_steps(session_factory, job_id) == [1, 2, 3, 4]
    assert [c.step for c in checkpoints(session_factory, job_id)] == [2, 4]
    assert any(e.message.startswith("Training finished: 4 steps") for e in events(session_factory, job_id))


def test_steps_after_the_resume_checkpoint_are_listed_once(make_settings, session_factory, storage, monkeypatch):
    """The worker dies after step 5 with its last checkpoint at step 4: the resumed run trains step 5 again, and
    step 5's metrics (row and event) appear once, from the run that finished the job."""
    settings = make_settings(heartbeat_timeout_s=60)
    job_id = create_job(session_factory, storage, hyper=stored_config(max_steps=6, checkpoint_every=2))
    worker_dies_after(monkeypatch, session_factory, job_id, "metrics", 5)
    assert runner.run_job(job_id, settings, session_factory, storage) == runner.STOPPED
    monkeypatch.undo()
    first_run_step5 = [e.data["train_loss"] for e in events(session_factory, job_id) if e.type == "metrics" and e.data["step"] == 5]
    assert len(first_run_step5) == 1
    assert sweep(settings, session_factory, RecordingCelery())["requeued"] == [job_id]
    assert runner.run_job(job_id, settings, session_factory, storage) == runner.SUCCEEDED
    metric_events = [e for e in events(session_factory, job_id) if e.type == "metrics"]
    assert [e.data["step"] for e in metric_events] == [1, 2, 3, 4, 5, 6]
    assert metric_steps(session_factory, job_id) == [1, 2, 3, 4, 5, 6]


def test_work_directories_of_killed_workers_are_removed(tmp_path):
    import os
    import signal
    import subprocess

    killed = subprocess.Popen(["sleep", "60"])
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        dead_dir = tmp_path / f"qlora-ftjob-abc-{killed.pid}-x1"
        live_dir = tmp_path / f"qlora-ftjob-def-{alive.pid}-x2"
        own_dir = tmp_path / f"qlora-ftjob-ghi-{os.getpid()}-x3"
        dead_export = tmp_path / f"qlora-export-jkl-{killed.pid}-x4"  # a merged export's (worker/export.py)
        live_export = tmp_path / f"qlora-export-mno-{alive.pid}-x5"
        for path in (dead_dir, live_dir, own_dir, dead_export, live_export):
            (path / "output").mkdir(parents=True)
        assert runner.remove_dead_workdirs(tmp_path) == [dead_dir, dead_export]
        assert not dead_dir.exists() and live_dir.exists() and own_dir.exists()
        assert not dead_export.exists() and live_export.exists()
    finally:
        alive.kill()
        alive.wait()


def test_a_job_past_its_wall_clock_limit_is_stopped_and_failed(make_settings, session_factory, storage, monkeypatch):
    original = DatabaseSink.metrics

    def slow_metrics(self, step, values):  # noqa: ANN001
        time.sleep(0.3)  # a tiny model's step takes milliseconds
        original(self, step, values)

    monkeypatch.setattr(DatabaseSink, "metrics", slow_metrics)
    job_id = create_job(session_factory, storage, hyper=stored_config(max_steps=200, checkpoint_every=1000))
    started = time.monotonic()
    assert runner.run_job(job_id, make_settings(max_job_seconds=4.0), session_factory, storage) == runner.FAILED
    assert time.monotonic() - started < 30
    job = get_job(session_factory, job_id)
    assert job.error["code"] == "job_timeout" and "QLORA_MAX_JOB_SECONDS" in job.error["message"]
    assert len(metric_steps(session_factory, job_id)) < 200 and job.result_files == []  # stopped, not run to the end


def test_a_job_resumes_on_a_worker_where_auto_decides_lean_activations_otherwise(make_settings, session_factory, storage,
                                                                                  monkeypatch):
    """lean_activations stays 'auto' in the job: checkpointed where auto means lean (as on a GPU, injected), the job
    resumes where it does not (this CPU) instead of failing on changed options."""
    import dataclasses

    from worker.training import model as model_module

    settings = make_settings(heartbeat_timeout_s=60)
    job_id = create_job(session_factory, storage, hyper=stored_config(max_steps=4, checkpoint_every=2))
    decide = model_module.decide_auto  # lean_activations 'auto' decided as on a GPU, the rest for this CPU
    monkeypatch.setattr(model_module, "decide_auto", lambda cfg, *a, **k: dataclasses.replace(
        decide(cfg, *a, **k), lean_activations=cfg.lean_activations is not False))
    worker_dies_after(monkeypatch, session_factory, job_id, "checkpoint", 2)
    assert runner.run_job(job_id, settings, session_factory, storage) == runner.STOPPED
    monkeypatch.undo()
    assert sweep(settings, session_factory, RecordingCelery())["requeued"] == [job_id]
    assert runner.run_job(job_id, settings, session_factory, storage) == runner.SUCCEEDED
    loaded = [e.data["lean_activations"] for e in events(session_factory, job_id) if e.message.startswith("Model loaded")]
    assert loaded == [True, False]
    assert get_job(session_factory, job_id).training_config["lean_activations"] == "auto"
