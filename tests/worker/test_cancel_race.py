"""A cancel racing the worker's final commit, on PostgreSQL: the job ends cancelled with no result files (rows or
objects), or succeeded with all of them, never a mix. The worker's real result path (`_store_results`: uploads,
then one transaction that moves the job and adds the rows) runs against a cancel fired from another thread."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from sqlalchemy import select, text

from core.db import make_engine, make_session_factory, session_scope
from core.jobs import cancel_job
from core.storage import LocalStorage
from core.tables import File, Job
from tests.worker.helpers import create_job, get_job, local_objects, wait_until
from worker import runner
from worker.runner.inputs import ClaimedJob, load_spec
from worker.runner.results import store_results

WORKER = "race-worker"


def running_job(factory, storage) -> tuple[str, ClaimedJob]:  # noqa: ANN001
    job_id = create_job(factory, storage, status="running", worker_id=WORKER, heartbeat_at=time.time(), attempt=1)
    return job_id, load_spec(factory, job_id)


def store(spec: ClaimedJob, factory, storage, tmp_path: Path) -> str:  # noqa: ANN001
    workdir = tmp_path / f"work-{spec.id}"
    adapter = workdir / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 4096)
    (adapter / "adapter_config.json").write_text("{}")
    committed = store_results(spec, WORKER, factory, storage, workdir, adapter, 100, retry_window_s=5.0)
    return runner.SUCCEEDED if committed else runner.STOPPED


def assert_all_or_nothing(factory, storage, job_id: str, outcome: str, cancelled: bool) -> str:  # noqa: ANN001
    job = get_job(factory, job_id)
    with session_scope(factory) as session:
        rows = list(session.execute(select(File).where(File.filename.startswith(job_id))).scalars())
    objects = {key for key in local_objects(storage.root) if key.startswith("files/")} - {f"files/{job.training_file}"}
    stored = {key for key in objects if any(key == f"files/{file_id}" for file_id in job.result_files)}
    if job.status == "cancelled":
        assert cancelled and outcome == runner.STOPPED
        assert job.result_files == [] and job.fine_tuned_model is None and rows == []
    else:
        assert job.status == "succeeded" and not cancelled and outcome == runner.SUCCEEDED
        assert len(job.result_files) == 2 and sorted(r.id for r in rows) == sorted(job.result_files)
        assert stored == {r.storage_key for r in rows} and len(stored) == 2
    return job.status


def test_a_cancel_at_any_moment_of_the_final_commit_is_all_or_nothing(postgres_url, tmp_path):
    engine = make_engine(postgres_url)
    factory = make_session_factory(engine)
    storage = LocalStorage(tmp_path / "objects")
    try:
        job_id, spec = running_job(factory, storage)
        started = time.perf_counter()
        assert store(spec, factory, storage, tmp_path) == runner.SUCCEEDED  # how long the result path takes, uncontested
        duration = time.perf_counter() - started

        seen: dict[str, int] = {}
        rounds = 24
        for i in range(rounds):
            job_id, spec = running_job(factory, storage)
            before = local_objects(storage.root)
            offset = duration * 1.5 * i / (rounds - 1)  # from before the uploads to after the commit
            go = threading.Barrier(2)
            cancelled: list[bool] = []

            def cancel(job_id=job_id, offset=offset, go=go, cancelled=cancelled) -> None:  # noqa: ANN001
                go.wait()
                time.sleep(offset)
                with session_scope(factory) as session:
                    cancelled.append(cancel_job(session, job_id))

            thread = threading.Thread(target=cancel)
            thread.start()
            go.wait()
            outcome = store(spec, factory, storage, tmp_path)
            thread.join(30)
            status = assert_all_or_nothing(factory, storage, job_id, outcome, cancelled[0])
            if status == "cancelled":
                assert local_objects(storage.root) == before  # the uploaded results were deleted
            seen[status] = seen.get(status, 0) + 1
        assert set(seen) == {"cancelled", "succeeded"}, seen  # the offsets straddled the commit
    finally:
        engine.dispose()


def test_a_cancel_holding_the_row_lock_while_the_worker_commits_wins_cleanly(postgres_url, tmp_path):
    """The cancel's transaction locks the row first; the worker's commit waits on the lock, then finds the job no
    longer running, and deletes what it uploaded."""
    engine = make_engine(postgres_url)
    factory = make_session_factory(engine)
    storage = LocalStorage(tmp_path / "objects")
    try:
        job_id, spec = running_job(factory, storage)
        before = local_objects(storage.root)
        outcome: list[str] = []
        with session_scope(factory) as holder:
            holder.execute(select(Job.id).where(Job.id == job_id).with_for_update())
            worker = threading.Thread(target=lambda: outcome.append(store(spec, factory, storage, tmp_path)))
            worker.start()

            def worker_waits_on_the_lock() -> bool:
                with engine.connect() as conn:
                    return bool(conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                                  "AND wait_event_type = 'Lock'")).scalar())

            wait_until(worker_waits_on_the_lock, 30, message="the worker's commit waiting on the row lock")
            assert cancel_job(holder, job_id)
        worker.join(30)
        assert assert_all_or_nothing(factory, storage, job_id, outcome[0], True) == "cancelled"
        assert local_objects(storage.root) == before
    finally:
        engine.dispose()
