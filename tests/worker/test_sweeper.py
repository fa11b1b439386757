"""The sweeper without training: lost jobs without a checkpoint or attempts fail, expired queued jobs are sent again."""

from __future__ import annotations

import secrets
import time

import pytest
from sqlalchemy import text

from core import ids
from core.db import session_scope
from core.queue import make_celery
from core.tables import Checkpoint, now
from tests.worker.helpers import create_job, events, get_job
from worker.sweeper import sweep


class RecordingCelery:
    def __init__(self, fail_for: set[str] = frozenset()):
        self.sent: list[str] = []
        self.fail_for = fail_for

    def send_task(self, name, args=None, queue=None, expires=None, **_):  # noqa: ANN001
        assert name == "qlora.train"
        if args[0] in self.fail_for:
            raise ConnectionError("broker down")
        self.sent.append(args[0])


def stale(**fields):
    return dict(status="running", worker_id="dead-worker", heartbeat_at=time.time() - 3600, **fields)


def test_lost_job_without_checkpoint_fails_worker_lost(make_settings, session_factory, storage):
    settings = make_settings(heartbeat_timeout_s=60)
    lost = create_job(session_factory, storage, **stale(attempt=1))
    alive = create_job(session_factory, storage, status="running", worker_id="live-worker", heartbeat_at=time.time(), attempt=1)
    celery = RecordingCelery()

    assert sweep(settings, session_factory, celery) == {"requeued": [], "failed": [lost], "sent": [], "failed_exports": [], "sent_exports": [],
                                                     "sent_webhooks": []}
    assert celery.sent == []
    job = get_job(session_factory, lost)
    assert job.status == "failed" and job.finished_at is not None
    assert job.error == {"code": "worker_lost", "param": None,
                         "message": "The job's run ended: worker dead-worker stopped responding (no checkpoint to resume from)."}
    assert events(session_factory, lost)[-1].level == "error"
    assert get_job(session_factory, alive).status == "running"  # a live heartbeat is left alone


def test_lost_job_out_of_attempts_fails_even_with_a_checkpoint(make_settings, session_factory, storage):
    settings = make_settings(heartbeat_timeout_s=60, max_attempts=2)
    job_id = create_job(session_factory, storage, **stale(attempt=2))
    with session_scope(session_factory) as session:
        session.add(Checkpoint(id=ids.checkpoint_id(), job_id=job_id, step=2, metrics={"step": 2.0}, created_at=now(),
                               storage_key=f"checkpoints/{job_id}/step-000002.tar.gz", fine_tuned_model_checkpoint="ft:x:ckpt-step-2"))
    celery = RecordingCelery()
    assert sweep(settings, session_factory, celery)["failed"] == [job_id]
    assert celery.sent == []
    job = get_job(session_factory, job_id)
    assert job.status == "failed" and job.error["code"] == "worker_lost" and "2 attempts" in job.error["message"]


def test_expired_queued_job_gets_a_new_task_message(make_settings, session_factory, storage, redis_url):
    # Room for three messages of the project, so that the never-sent job's turn has come (core/dispatch.py).
    settings = make_settings(broker_url=redis_url, task_queue=f"qlora-sweep-test-{secrets.token_hex(4)}", task_expires_s=60,
                             queued_messages_per_project=3)
    expired = create_job(session_factory, storage, enqueued_at=time.time() - 3600)
    never_sent = create_job(session_factory, storage)  # enqueued_at NULL: the API could not reach the broker
    fresh = create_job(session_factory, storage, enqueued_at=time.time())
    app = make_celery(settings)
    try:
        before = time.time()
        result = sweep(settings, session_factory, app)
        assert sorted(result["sent"]) == sorted([expired, never_sent]) and result["requeued"] == result["failed"] == []
        for job_id in (expired, never_sent):
            assert get_job(session_factory, job_id).enqueued_at >= before
        assert get_job(session_factory, fresh).enqueued_at < before

        # The messages are in the broker, by name, with the job id and an expiry.
        received = {}
        with app.connection_for_read() as conn:
            queue = conn.SimpleQueue(settings.task_queue)
            for _ in range(2):
                message = queue.get(timeout=5)
                received[message.payload[0][0]] = message.headers
                message.ack()
            with pytest.raises(queue.Empty):
                queue.get(timeout=0.2)
            queue.close()
        assert set(received) == {expired, never_sent}
        assert all(h["task"] == "qlora.train" and h["expires"] for h in received.values())
    finally:
        import redis

        client = redis.Redis.from_url(redis_url)
        client.delete(settings.task_queue, f"_kombu.binding.{settings.task_queue}")
        client.close()


def test_a_failed_send_leaves_the_job_for_the_next_sweep(make_settings, session_factory, storage):
    settings = make_settings(task_expires_s=60)
    unlucky = create_job(session_factory, storage)
    other = create_job(session_factory, storage)
    celery = RecordingCelery(fail_for={unlucky})
    assert sweep(settings, session_factory, celery)["sent"] == []  # the project's next job is unlucky: the broker refuses it
    assert get_job(session_factory, unlucky).enqueued_at is None and get_job(session_factory, unlucky).status == "queued"
    assert sweep(settings, session_factory, RecordingCelery())["sent"] == [unlucky]  # the next pass sends it ...
    assert get_job(session_factory, other).enqueued_at is None  # ... and the other waits its turn behind it


def test_expired_files_are_deleted_row_first_then_object(make_settings, session_factory, storage, tmp_path):
    from sqlalchemy import select

    from core.tables import File, Project

    payload = tmp_path / "data.jsonl"
    payload.write_text("{}\n")
    rows = {}
    with session_scope(session_factory) as session:
        if session.get(Project, "sweep-files") is None:
            session.add(Project(name="sweep-files"))
        session.flush()
        for name, expires_at in (("expired", now() - 5), ("live", now() + 3600), ("forever", None)):
            file_id = ids.file_id()
            stored = storage.put_file(f"files/{file_id}", payload)
            session.add(File(id=file_id, project="sweep-files", filename=f"{name}.jsonl", purpose="fine-tune", bytes=stored.size,
                             sha256=stored.sha256, status="processed", storage_key=stored.key, expires_at=expires_at))
            rows[name] = file_id
    result = sweep(make_settings(), session_factory, RecordingCelery(), storage)
    assert result["expired_files"] == [rows["expired"]]
    with session_scope(session_factory) as session:
        left = set(session.scalars(select(File.id).where(File.project == "sweep-files")))
    assert left == {rows["live"], rows["forever"]}
    assert not storage.exists(f"files/{rows['expired']}")
    assert storage.exists(f"files/{rows['live']}") and storage.exists(f"files/{rows['forever']}")


def test_the_sweep_removes_partial_objects_that_killed_writers_left(make_settings, session_factory, storage):
    import os

    from core.storage import STALE_PARTIAL_S

    leftover = storage.root / "files" / "file-killed.partial"
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"half an upload")
    old = time.time() - STALE_PARTIAL_S - 60
    os.utime(leftover, (old, old))
    assert sweep(make_settings(), session_factory, RecordingCelery(), storage)["stale_partials"] == [str(leftover)]
    assert not leftover.exists()


def test_the_sweep_locks_no_project_whose_share_is_full(make_settings, session_factory, storage):
    """A backlog whose turn has not come costs a sweep nothing: it used to take the row lock of every project with
    unsent jobs, one transaction each (seconds per pass with hundreds of projects: docs/operations.md "Scale")."""
    from sqlalchemy import event

    settings = make_settings(queued_messages_per_project=1, max_running_jobs_per_project=2)
    create_job(session_factory, storage, enqueued_at=time.time())  # its message waits in the broker: the share is full
    backlog = [create_job(session_factory, storage) for _ in range(3)]
    engine = session_factory.kw["bind"]
    statements: list[str] = []

    def record(conn, cursor, statement, *_):  # noqa: ANN001
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        celery = RecordingCelery()
        assert sweep(settings, session_factory, celery)["sent"] == [] and celery.sent == []
        assert not [s for s in statements if "FROM projects" in s]  # dispatch's first statement locks the project's row

        # The message taken (its job running) and one more allowed to run: now the project has room, and its oldest
        # unsent job is sent.
        with session_scope(session_factory) as session:
            session.execute(text("UPDATE jobs SET status = 'running', worker_id = 'w', heartbeat_at = :t WHERE enqueued_at IS NOT NULL"),
                            {"t": time.time()})
        assert sweep(settings, session_factory, celery)["sent"] == [backlog[0]] and celery.sent == [backlog[0]]
    finally:
        event.remove(engine, "before_cursor_execute", record)
