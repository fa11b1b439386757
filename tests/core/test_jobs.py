"""The job state machine (core.jobs) on PostgreSQL and SQLite, each built by the migrations.

Rows are written with the ORM through the small factories below; every move goes through core.jobs, and
every check reads the row back in a fresh session (the moves are bulk UPDATEs that bypass the identity map).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import product

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from core import ids
from core.jobs import (
    TERMINAL,
    TRANSITIONS,
    JobStatus,
    add_event,
    cancel_job,
    claim_job,
    expired_queued_jobs,
    fail_job,
    heartbeat,
    mark_enqueued,
    succeed_job,
    sweep_lost_jobs,
    transition,
)
from core.tables import ACTIVE_JOBS, Checkpoint, Job, JobEndCount, JobEvent, JobMetric, JobOutbox, Project

TIMEOUT_S = 120.0
MAX_ATTEMPTS = 3

# --- factories ------------------------------------------------------------------------------------------------


def make_project(session: Session, name: str = "default") -> Project:
    project = session.get(Project, name)
    if project is None:
        project = Project(name=name)
        session.add(project)
        session.flush()
    return project


def make_job(factory: sessionmaker[Session], status: JobStatus = JobStatus.QUEUED, *, project: str = "default", **fields) -> str:
    """A committed job row in `status`; returns its id."""
    with factory() as session:
        make_project(session, project)
        job = Job(
            id=ids.job_id(),
            project=project,
            model="SmolLM2-135M-Instruct",
            training_file=ids.file_id(),
            hyperparameters={"n_epochs": 1},
            training_config={"n_epochs": 1, "seed": 42},
            status=status.value,
            **fields,
        )
        session.add(job)
        session.commit()
        return job.id


def make_checkpoint(factory: sessionmaker[Session], job_id: str, step: int) -> str:
    with factory() as session:
        checkpoint = Checkpoint(
            id=ids.checkpoint_id(),
            job_id=job_id,
            step=step,
            metrics={"step": float(step)},
            storage_key=f"checkpoints/{job_id}/{step}.tar.gz",
            fine_tuned_model_checkpoint=f"ft:base:default::{job_id}:ckpt-step-{step}",
        )
        session.add(checkpoint)
        session.commit()
        return checkpoint.id


def make_metric(factory: sessionmaker[Session], job_id: str, step: int) -> None:
    with factory() as session:
        session.add(JobMetric(job_id=job_id, step=step, values={"step": step, "train_loss": 1.0 / step}))
        session.commit()


def running_job(
    factory: sessionmaker[Session], worker_id: str = "worker-1", *, heartbeat_age_s: float = 0.0, attempt: int | None = None
) -> str:
    """A job claimed by `worker_id` (through claim_job), its heartbeat `heartbeat_age_s` old."""
    job_id = make_job(factory, JobStatus.QUEUED)
    with factory() as session:
        assert claim_job(session, job_id, worker_id)
        session.commit()
    values: dict = {"heartbeat_at": time.time() - heartbeat_age_s}
    if attempt is not None:
        values["attempt"] = attempt
    set_fields(factory, job_id, **values)
    return job_id


def set_fields(factory: sessionmaker[Session], job_id: str, **values) -> None:
    with factory() as session:
        job = session.execute(select(Job).where(Job.id == job_id)).scalar_one()
        for name, value in values.items():
            setattr(job, name, value)
        session.commit()


def load(factory: sessionmaker[Session], job_id: str) -> Job:
    with factory() as session:
        return session.execute(select(Job).where(Job.id == job_id)).scalar_one()


def running_owner(session: Session, job_id: str) -> str | None:
    """The worker that runs the job, read in the caller's session; None when it is not running."""
    row = session.execute(select(Job.status, Job.worker_id).where(Job.id == job_id)).one()
    return row.worker_id if row.status == JobStatus.RUNNING.value else None


def events(factory: sessionmaker[Session], job_id: str) -> list[JobEvent]:
    with factory() as session:
        return list(session.execute(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)).scalars())


def metric_steps(factory: sessionmaker[Session], job_id: str) -> list[int]:
    with factory() as session:
        return list(session.execute(select(JobMetric.step).where(JobMetric.job_id == job_id).order_by(JobMetric.step)).scalars())


# --- the transition table -------------------------------------------------------------------------------------


def test_every_status_has_a_row_in_the_table():
    assert set(TRANSITIONS) == set(JobStatus)
    assert all(not TRANSITIONS[s] for s in TERMINAL), "a terminal state has no way out"
    # The partial index and /metrics' count of the jobs not yet ended name exactly the other statuses.
    assert ACTIVE_JOBS == "status IN ({})".format(", ".join(f"'{s.value}'" for s in JobStatus if s not in TERMINAL))


@pytest.mark.parametrize("source, target", list(product(JobStatus, JobStatus)), ids=lambda s: s.value)
def test_transition_follows_the_table(session_factory, source, target):
    job_id = make_job(session_factory, source)
    with session_factory() as session:
        moved = transition(session, job_id, target)
        session.commit()
    allowed = target in TRANSITIONS[source]
    assert moved is allowed
    job = load(session_factory, job_id)
    assert job.status == (target if allowed else source).value
    if allowed and target in TERMINAL:
        assert job.finished_at is not None and abs(job.finished_at - time.time()) < 60
    else:
        assert job.finished_at is None
    # "A job ended" is one outbox row, written with the move to a terminal status and only then.
    with session_factory() as session:
        ended = session.execute(select(JobOutbox.status).where(JobOutbox.job_id == job_id)).scalars().all()
    assert ended == ([target.value] if allowed and target in TERMINAL else [])
    # ... and counted once, for /metrics, in the same transaction.
    with session_factory() as session:
        counts = dict(session.execute(select(JobEndCount.status, JobEndCount.count)).all())
    assert counts == {s.value: int(allowed and target == s) for s in TERMINAL}


def test_transition_only_from_narrows_the_sources(session_factory):
    job_id = make_job(session_factory, JobStatus.QUEUED)
    with session_factory() as session:
        assert not transition(session, job_id, JobStatus.FAILED, only_from={JobStatus.RUNNING})
        assert transition(session, job_id, JobStatus.FAILED, only_from={JobStatus.QUEUED})
        session.commit()
    assert load(session_factory, job_id).status == JobStatus.FAILED


def test_transition_of_an_unknown_job_moves_nothing(session_factory):
    with session_factory() as session:
        assert not transition(session, "ftjob-missing", JobStatus.CANCELLED)


# --- claim, heartbeat, cancel, finish -------------------------------------------------------------------------


def test_claim_twice_only_the_first_succeeds(session_factory):
    job_id = make_job(session_factory, JobStatus.QUEUED)
    with session_factory() as session:
        assert claim_job(session, job_id, "worker-1")
        session.commit()
    with session_factory() as session:
        assert not claim_job(session, job_id, "worker-2")
        session.commit()
    job = load(session_factory, job_id)
    assert (job.status, job.worker_id, job.attempt) == ("running", "worker-1", 1)
    assert job.started_at is not None and job.heartbeat_at is not None


def test_claim_from_two_threads_exactly_one_wins(pg_session_factory):
    job_id = make_job(pg_session_factory, JobStatus.QUEUED)
    start = threading.Barrier(2)

    def claim(worker_id: str) -> bool:
        with pg_session_factory() as session:
            start.wait(timeout=10)
            moved = claim_job(session, job_id, worker_id)
            session.commit()
            return moved

    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(["worker-1", "worker-2"], pool.map(claim, ["worker-1", "worker-2"]), strict=True))
    assert sorted(results.values()) == [False, True]
    winner = next(w for w, moved in results.items() if moved)
    job = load(pg_session_factory, job_id)
    assert (job.status, job.worker_id, job.attempt) == ("running", winner, 1)


def test_claim_waits_for_a_concurrent_claim_and_then_refuses(pg_session_factory):
    """Both UPDATEs in flight at once: the second blocks on the row lock the first holds (seen in pg_locks)
    and, once the first commits, re-reads the row, finds it running and moves nothing."""
    job_id = make_job(pg_session_factory, JobStatus.QUEUED)
    first = pg_session_factory()
    try:
        assert claim_job(first, job_id, "worker-1")  # row locked, not committed
        with ThreadPoolExecutor(1) as pool:
            second = pool.submit(lambda: _claim_and_commit(pg_session_factory, job_id, "worker-2"))
            _wait_for_a_lock_wait(pg_session_factory)
            assert not second.done()
            first.commit()
            assert second.result(timeout=10) is False
    finally:
        first.close()
    job = load(pg_session_factory, job_id)
    assert (job.worker_id, job.attempt) == ("worker-1", 1)


def _claim_and_commit(factory: sessionmaker[Session], job_id: str, worker_id: str) -> bool:
    with factory() as session:
        moved = claim_job(session, job_id, worker_id)
        session.commit()
        return moved


def _wait_for_a_lock_wait(factory: sessionmaker[Session], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    with factory() as session:
        while time.monotonic() < deadline:
            waiting = session.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'")
            ).scalar_one()
            session.rollback()  # a fresh snapshot of pg_stat_activity each round
            if waiting:
                return
            time.sleep(0.02)
    raise AssertionError("the second claim never waited for the first one's row lock")


def test_heartbeat_only_for_the_owner_of_a_running_job(session_factory):
    job_id = running_job(session_factory, "worker-1", heartbeat_age_s=30)
    before = load(session_factory, job_id).heartbeat_at
    with session_factory() as session:
        assert heartbeat(session, job_id, "worker-1")
        assert not heartbeat(session, job_id, "worker-2")
        assert running_owner(session, job_id) == "worker-1"
        session.commit()
    assert load(session_factory, job_id).heartbeat_at > before


def test_heartbeat_is_false_after_cancel(session_factory):
    job_id = running_job(session_factory, "worker-1")
    with session_factory() as session:
        assert cancel_job(session, job_id)
        session.commit()
    with session_factory() as session:
        assert not heartbeat(session, job_id, "worker-1")
        assert running_owner(session, job_id) is None


def test_cancel_of_a_running_job_wins_over_the_workers_finish(session_factory):
    job_id = running_job(session_factory, "worker-1")
    with session_factory() as session:
        assert cancel_job(session, job_id)
        session.commit()
    with session_factory() as session:
        assert not succeed_job(session, job_id, "worker-1", fine_tuned_model="ft:x", trained_tokens=10, result_files=["file-r"])
        assert not fail_job(session, job_id, code="oom", message="out of memory", worker_id="worker-1")
        session.commit()
    job = load(session_factory, job_id)
    assert (job.status, job.fine_tuned_model, job.trained_tokens, job.result_files, job.error) == ("cancelled", None, None, [], None)
    assert job.finished_at is not None
    assert [(e.level, e.message) for e in events(session_factory, job_id)] == [("info", "Job cancelled")]


def test_succeed_job_needs_the_owner(session_factory):
    job_id = running_job(session_factory, "worker-1")
    with session_factory() as session:
        assert not succeed_job(session, job_id, "worker-2", fine_tuned_model="ft:x", trained_tokens=1, result_files=[])
        assert succeed_job(session, job_id, "worker-1", fine_tuned_model="ft:x", trained_tokens=7, result_files=["file-r"])
        session.commit()
    job = load(session_factory, job_id)
    assert (job.status, job.fine_tuned_model, job.trained_tokens, job.result_files) == ("succeeded", "ft:x", 7, ["file-r"])
    assert job.finished_at is not None
    with session_factory() as session:
        assert not cancel_job(session, job_id), "a finished job cannot be cancelled"


def test_succeed_job_only_from_running(session_factory):
    job_id = make_job(session_factory, JobStatus.QUEUED, worker_id="worker-1")
    with session_factory() as session:
        assert not succeed_job(session, job_id, "worker-1", fine_tuned_model="ft:x", trained_tokens=1, result_files=[])


def test_fail_job_records_the_error_and_an_error_event(session_factory):
    job_id = running_job(session_factory, "worker-1")
    with session_factory() as session:
        assert not fail_job(session, job_id, code="oom", message="nope", worker_id="worker-2")
        assert fail_job(
            session, job_id, code="invalid_file_format", message="line 3: not JSON", param="training_file", worker_id="worker-1"
        )
        session.commit()
    job = load(session_factory, job_id)
    assert job.status == "failed" and job.finished_at is not None
    assert job.error == {"code": "invalid_file_format", "message": "line 3: not JSON", "param": "training_file"}
    assert [(e.level, e.message) for e in events(session_factory, job_id)] == [("error", "line 3: not JSON")]


def test_cancel_of_a_queued_job(session_factory):
    job_id = make_job(session_factory, JobStatus.QUEUED)
    with session_factory() as session:
        assert cancel_job(session, job_id)
        session.commit()
    with session_factory() as session:
        assert not claim_job(session, job_id, "worker-1"), "a cancelled job is never claimed"
        assert not cancel_job(session, job_id)
    assert load(session_factory, job_id).status == "cancelled"


# --- the sweeper ----------------------------------------------------------------------------------------------


def test_sweep_requeues_a_lost_job_from_its_newest_checkpoint(session_factory):
    job_id = running_job(session_factory, "worker-1", heartbeat_age_s=TIMEOUT_S + 60)
    # Written out of step order: the newest is the highest step, not the last row.
    newest = make_checkpoint(session_factory, job_id, 20)
    make_checkpoint(session_factory, job_id, 10)
    for step in (5, 10, 20, 25, 30):
        make_metric(session_factory, job_id, step)

    with session_factory() as session:
        outcome = sweep_lost_jobs(session, heartbeat_timeout_s=TIMEOUT_S, max_attempts=MAX_ATTEMPTS)
        session.commit()

    assert outcome == [(job_id, "requeued")]
    job = load(session_factory, job_id)
    assert (job.status, job.resume_checkpoint, job.worker_id, job.heartbeat_at) == ("queued", newest, None, None)
    assert job.attempt == 1 and job.finished_at is None and job.error is None
    assert metric_steps(session_factory, job_id) == [5, 10, 20]
    [event] = events(session_factory, job_id)
    assert event.level == "warn" and "step 20" in event.message and "worker-1" in event.message

    # The lost worker, should it come back, is told to stop; the next claim is a new attempt.
    with session_factory() as session:
        assert not heartbeat(session, job_id, "worker-1")
        assert claim_job(session, job_id, "worker-2")
        session.commit()
    with session_factory() as session:
        assert not succeed_job(session, job_id, "worker-1", fine_tuned_model="ft:x", trained_tokens=1, result_files=[])
    job = load(session_factory, job_id)
    assert (job.status, job.worker_id, job.attempt, job.resume_checkpoint) == ("running", "worker-2", 2, newest)


def test_sweep_fails_a_lost_job_without_a_checkpoint(session_factory):
    job_id = running_job(session_factory, "worker-1", heartbeat_age_s=TIMEOUT_S + 60)
    make_metric(session_factory, job_id, 5)
    with session_factory() as session:
        outcome = sweep_lost_jobs(session, heartbeat_timeout_s=TIMEOUT_S, max_attempts=MAX_ATTEMPTS)
        session.commit()

    assert outcome == [(job_id, "failed")]
    job = load(session_factory, job_id)
    assert job.status == "failed" and job.finished_at is not None
    assert job.error["code"] == "worker_lost" and job.error["param"] is None
    assert "no checkpoint" in job.error["message"]
    assert metric_steps(session_factory, job_id) == [5], "metrics of a failed job stay"
    [event] = events(session_factory, job_id)
    assert event.level == "error" and event.message == job.error["message"]


def test_sweep_fails_a_lost_job_whose_attempts_are_used_up(session_factory):
    job_id = running_job(session_factory, "worker-1", heartbeat_age_s=TIMEOUT_S + 60, attempt=MAX_ATTEMPTS)
    make_checkpoint(session_factory, job_id, 10)
    with session_factory() as session:
        outcome = sweep_lost_jobs(session, heartbeat_timeout_s=TIMEOUT_S, max_attempts=MAX_ATTEMPTS)
        session.commit()

    assert outcome == [(job_id, "failed")]
    job = load(session_factory, job_id)
    assert job.status == "failed" and job.error["code"] == "worker_lost"
    assert f"{MAX_ATTEMPTS} attempts" in job.error["message"]
    assert job.resume_checkpoint is None


def test_sweep_leaves_a_job_with_a_fresh_heartbeat_alone(session_factory):
    job_id = running_job(session_factory, "worker-1", heartbeat_age_s=TIMEOUT_S / 2)
    make_checkpoint(session_factory, job_id, 10)
    with session_factory() as session:
        assert sweep_lost_jobs(session, heartbeat_timeout_s=TIMEOUT_S, max_attempts=MAX_ATTEMPTS) == []
        session.commit()
    job = load(session_factory, job_id)
    assert (job.status, job.worker_id, job.resume_checkpoint) == ("running", "worker-1", None)
    assert events(session_factory, job_id) == []


def test_sweep_ignores_jobs_that_are_not_running(session_factory):
    old = time.time() - TIMEOUT_S * 10
    queued = make_job(session_factory, JobStatus.QUEUED, heartbeat_at=old)
    cancelled = make_job(session_factory, JobStatus.CANCELLED, heartbeat_at=old, worker_id="worker-1")
    with session_factory() as session:
        assert sweep_lost_jobs(session, heartbeat_timeout_s=TIMEOUT_S, max_attempts=MAX_ATTEMPTS) == []
    assert load(session_factory, queued).status == "queued"
    assert load(session_factory, cancelled).status == "cancelled"


def unsent_job_ids(session) -> set[str]:  # noqa: ANN001
    from sqlalchemy import select

    from core.tables import Job

    return set(session.scalars(select(Job.id).where(Job.status == JobStatus.QUEUED.value, Job.enqueued_at.is_(None))))


def test_expired_queued_jobs(session_factory):
    expires_s = 3600.0
    never_sent = make_job(session_factory, JobStatus.QUEUED)
    sent_long_ago = make_job(session_factory, JobStatus.QUEUED, enqueued_at=time.time() - expires_s - 60)
    sent_now = make_job(session_factory, JobStatus.QUEUED)
    with session_factory() as session:
        mark_enqueued(session, sent_now)
        session.commit()
    make_job(session_factory, JobStatus.RUNNING, enqueued_at=time.time() - expires_s * 2)
    make_job(session_factory, JobStatus.CANCELLED, enqueued_at=time.time() - expires_s * 2)

    with session_factory() as session:
        # A job never sent is not expired: it waits its project's turn (core/dispatch.py sends it).
        assert set(expired_queued_jobs(session, expires_s=expires_s)) == {sent_long_ago}
        assert never_sent in unsent_job_ids(session)
    assert abs(load(session_factory, sent_now).enqueued_at - time.time()) < 60


# --- events ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["warning", "WARN", "debug", ""])
def test_add_event_refuses_levels_outside_the_wire_format(session_factory, level):
    job_id = make_job(session_factory)
    with session_factory() as session, pytest.raises(ValueError, match="info, warn or error"):
        add_event(session, job_id, level, "x")


def test_add_event_writes_the_wire_levels(session_factory):
    job_id = make_job(session_factory)
    with session_factory() as session:
        for level in ("info", "warn", "error"):
            add_event(session, job_id, level, f"a {level} event")
        add_event(session, job_id, "info", "step 10", type="metrics", data={"step": 10, "train_loss": 1.5})
        session.commit()
    rows = events(session_factory, job_id)
    assert [(e.level, e.type) for e in rows] == [("info", "message"), ("warn", "message"), ("error", "message"), ("info", "metrics")]
    assert rows[-1].data == {"step": 10, "train_loss": 1.5}
    assert all(e.id.startswith("ftevent-") and e.created_at for e in rows)
