"""The worker's side of n_gpus without a launch: a job for more GPUs than the worker owns, the sweeper's queue for a
lost multi-GPU job, a crashed launch recovered at once, and how a launch's messages become the run's outcome."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import update

from core.db import session_scope
from core.jobs import claim_job, recover_lost_run
from core.tables import Checkpoint, Job, now
from tests.worker.helpers import create_job, events, get_job, stored_config
from tests.worker.test_runner import RecordingCelery
from worker import runner
from worker.runner.gpus import LaunchCrashed, _Session
from worker.runner.inputs import JobFailure
from worker.sweeper import sweep
from worker.training.sinks import NullSink


def test_a_job_for_more_gpus_than_the_worker_owns_fails_before_training(make_settings, session_factory, storage):
    job_id = create_job(session_factory, storage, hyper=stored_config(n_gpus=2))
    assert runner.run_job(job_id, make_settings(), session_factory, storage) == runner.FAILED
    job = get_job(session_factory, job_id)
    assert job.error["code"] == "insufficient_gpus" and job.error["param"] == "hyperparameters.n_gpus"
    assert "QLORA_WORKER_GPUS" in job.error["message"]


def test_the_sweeper_sends_a_lost_two_gpu_job_to_the_two_gpu_queue(make_settings, session_factory, storage):
    settings = make_settings(heartbeat_timeout_s=60)
    job_id = create_job(session_factory, storage, hyper=stored_config(n_gpus=2), status="running", worker_id="dead",
                        heartbeat_at=time.time() - 3600, attempt=1)
    from core.tables import Checkpoint, now
    from tests.worker.test_runner import checkpoints  # noqa: F401  (the helpers' rows)

    with session_scope(session_factory) as session:
        session.add(Checkpoint(id="ckpt-x", job_id=job_id, step=2, metrics={}, storage_key="k", fine_tuned_model_checkpoint="m", created_at=now()))
    celery = RecordingCelery()
    assert sweep(settings, session_factory, celery)["sent"] == [job_id]
    assert celery.sent == [("qlora.train", [job_id], f"{settings.task_queue}-2gpu", settings.task_expires_s)]


@pytest.mark.parametrize(("attempt", "checkpoint", "status"), [(1, True, "queued"), (3, True, "failed"), (1, False, "failed")])
def test_a_crashed_launch_is_recovered_as_a_lost_worker_at_once(session_factory, storage, attempt, checkpoint, status):
    job_id = create_job(session_factory, storage, hyper=stored_config(n_gpus=2))
    with session_scope(session_factory) as session:
        assert claim_job(session, job_id, "me")
        session.execute(update(Job).where(Job.id == job_id).values(attempt=attempt))
        if checkpoint:
            session.add(Checkpoint(id="ckpt-y", job_id=job_id, step=2, metrics={}, storage_key="k", fine_tuned_model_checkpoint="m", created_at=now()))
    with session_scope(session_factory) as session:
        assert not recover_lost_run(session, job_id, max_attempts=3, guard={"owner": "someone-else"}, cause="rank 1 died",
                                    error_code="training_error")  # not ours: nothing
    with session_scope(session_factory) as session:
        assert recover_lost_run(session, job_id, max_attempts=3, guard={"owner": "me"}, cause="rank 1 died", error_code="training_error",
                                enqueued_at=None) == ("requeued" if status == "queued" else "failed")
    job = get_job(session_factory, job_id)
    assert job.status == status and job.worker_id is None if status == "queued" else job.error["code"] == "training_error"
    if status == "queued":
        assert job.enqueued_at is None and job.resume_checkpoint == "ckpt-y"  # unsent: dispatch sends it
    assert "rank 1 died" in events(session_factory, job_id)[-1].message.lower()


def _outcome(*messages: dict, returncode: int = 1, stop: bool = False):
    session = _Session(NullSink(), lambda: stop, lambda: False, None)
    for message in messages:
        session.handle(message)
    return session.outcome(returncode, Path("/nonexistent"))


def test_a_launch_ends_as_its_messages_say():
    result = {"status": "succeeded", "steps": 4, "total_steps": 4, "trained_tokens": 9, "final_train_loss": 1.0, "final_valid_loss": None,
              "adapter_dir": "/x/adapter", "checkpoints": ["/x/c"], "train_stats": {}, "validation_stats": None, "seconds": 1.0}
    done = _outcome({"kind": "result", "result": result}, returncode=0)
    assert done.status == "succeeded" and done.adapter_dir == Path("/x/adapter")
    with pytest.raises(JobFailure) as failure:  # the job's own error: as on one GPU, even if another rank's came first
        _outcome({"kind": "error", "error": "crash", "rank": 1, "message": "RuntimeError: gloo"},
                 {"kind": "error", "error": "data", "role": "validation", "rank": 0, "message": "line 3: not JSON"})
    assert (failure.value.code, failure.value.param) == ("invalid_validation_file", "validation_file")
    with pytest.raises(JobFailure) as failure:
        _outcome({"kind": "error", "error": "config", "rank": 0, "message": "bad", "param": "lora_r", "code": "invalid_hyperparameter"})
    assert (failure.value.code, failure.value.param) == ("invalid_hyperparameter", "lora_r")
    with pytest.raises(LaunchCrashed, match="rank 1 failed: RuntimeError: gloo"):
        _outcome({"kind": "metrics", "step": 3, "values": {"step": 3}}, {"kind": "error", "error": "crash", "rank": 1, "message": "RuntimeError: gloo"})
    with pytest.raises(LaunchCrashed, match="exited with status -9"):
        _outcome(returncode=-9)
    assert _outcome({"kind": "start", "total_steps": 10}, {"kind": "metrics", "step": 3, "values": {"step": 3}}, stop=True).steps == 3
