"""The engine option keep_checkpoints applies in object storage too: as a run stores a checkpoint, the job's older
ones beyond the newest N lose their rows and objects, except the checkpoint the job resumes from."""

from __future__ import annotations

from core.storage import LocalStorage
from tests.worker.helpers import checkpoints, create_job, get_job, local_objects, stored_config
from tests.worker.test_runner import RecordingCelery, worker_dies_after
from worker import runner
from worker.sweeper import sweep


def checkpoint_objects(storage: LocalStorage) -> set[str]:
    return {key for key in local_objects(storage.root) if key.startswith("checkpoints/")}


def test_only_the_newest_checkpoints_stay_in_storage(make_settings, session_factory, storage):
    job_id = create_job(session_factory, storage, hyper=stored_config(max_steps=8, checkpoint_every=2, keep_checkpoints=2))
    assert runner.run_job(job_id, make_settings(), session_factory, storage) == runner.SUCCEEDED
    kept = checkpoints(session_factory, job_id)
    assert [c.step for c in kept] == [6, 8]
    assert checkpoint_objects(storage) == {c.storage_key for c in kept}


def test_the_checkpoint_a_job_resumed_from_is_kept(make_settings, session_factory, storage, monkeypatch):
    settings = make_settings(heartbeat_timeout_s=60)
    job_id = create_job(session_factory, storage, hyper=stored_config(max_steps=8, checkpoint_every=2, keep_checkpoints=2))
    worker_dies_after(monkeypatch, session_factory, job_id, "checkpoint", 4)
    assert runner.run_job(job_id, settings, session_factory, storage) == runner.STOPPED
    monkeypatch.undo()
    assert [c.step for c in checkpoints(session_factory, job_id)] == [2, 4]
    assert sweep(settings, session_factory, RecordingCelery())["requeued"] == [job_id]
    resume_from = get_job(session_factory, job_id).resume_checkpoint

    assert runner.run_job(job_id, settings, session_factory, storage) == runner.SUCCEEDED
    kept = checkpoints(session_factory, job_id)
    assert [c.step for c in kept] == [4, 6, 8] and kept[0].id == resume_from  # step 2 went when step 6 came
    assert checkpoint_objects(storage) == {c.storage_key for c in kept}

