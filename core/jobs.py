"""The job state machine: the one place that changes a job's status.

    queued ──> running ──> succeeded
      │  ^        │
      │  └────────┤ (worker lost, a checkpoint to resume from, attempts left)
      ├───────────┴──> failed | cancelled
      └──> paused <──┘ (pause: queued at once, running at its next step boundary, after a checkpoint)
           resume -> queued; cancel -> cancelled

Every change is one conditional UPDATE (`... WHERE id = :id AND status IN (:allowed)`), so two processes
can never both move a job: a worker claims a queued job only if it is still queued, a cancel wins over a
finishing worker only if it commits first, and a sweeper requeues a running job only if its heartbeat is
still stale when the update runs. The caller commits.

A move to a terminal status also writes a `job_outbox` row in the same transaction: "a job ended", which
core/job_events.py consumes (the project's next job, webhooks). Nothing else reacts to a job's end.
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, delete, select, update
from sqlalchemy.orm import Session

from core import ids
from core.leases import lapsed, renew, taken
from core.tables import Checkpoint, Job, JobEndCount, JobEvent, JobMetric, JobOutbox, now


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PAUSED = "paused"  # OpenAI's; not in the SDK's Literal yet (it returns the string as it is)


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})

# session.info key: the outbox rows this session's transaction wrote, for core/job_events.py to announce on commit.
ENDED_IN_SESSION = "qlora_jobs_ended"

# Allowed moves: from -> to. RUNNING -> QUEUED is the requeue of a job whose worker died. A paused job holds no
# worker; it goes back to QUEUED when resumed (from the checkpoint its pause wrote, if it ran).
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.PAUSED}),
    JobStatus.RUNNING: frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.QUEUED, JobStatus.PAUSED}),
    JobStatus.PAUSED: frozenset({JobStatus.QUEUED, JobStatus.CANCELLED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


def sources_of(target: JobStatus) -> list[str]:
    return [s.value for s, targets in TRANSITIONS.items() if target in targets]


def transition(session: Session, job_id: str, to: JobStatus, *, only_from: set[JobStatus] | None = None,
               owner: str | None = None, when: ColumnElement[bool] | None = None, **fields: Any) -> bool:
    """Move job `job_id` to `to` if its current status allows it (and, when given, only from `only_from`,
    only if worker `owner` still holds it and only if `when` holds for the row). Returns whether it moved.
    Sets `finished_at` on terminal states and writes their outbox row (`record_job_ended`)."""
    allowed = set(sources_of(to))
    if only_from is not None:
        allowed &= {s.value for s in only_from}
    values = {"status": to.value, **fields}
    if to in TERMINAL:
        values.setdefault("finished_at", now())
    stmt = update(Job).where(Job.id == job_id, Job.status.in_(allowed))
    if owner is not None:
        stmt = stmt.where(Job.worker_id == owner)
    if when is not None:
        stmt = stmt.where(when)
    result = session.execute(stmt.values(**values).execution_options(synchronize_session=False))
    moved = result.rowcount == 1
    if moved and to in TERMINAL:
        record_job_ended(session, job_id, to)
    return moved


def record_job_ended(session: Session, job_id: str, status: JobStatus) -> str:
    """The outbox row of a job's end, in the caller's transaction: it exists if and only if the move commits, and so
    does the end's count in job_end_counts (/metrics). Its id is remembered on the session so that the commit can
    announce it (core/job_events.py)."""
    row_id = ids.job_ended_id()
    session.add(JobOutbox(id=row_id, job_id=job_id, status=status.value, created_at=time.time()))
    session.execute(update(JobEndCount).where(JobEndCount.status == status.value).values(count=JobEndCount.count + 1))
    session.info.setdefault(ENDED_IN_SESSION, []).append(row_id)
    return row_id


def add_event(session: Session, job_id: str, level: str, message: str, *, type: str = "message",
              data: dict[str, Any] | None = None) -> JobEvent:
    if level not in ("info", "warn", "error"):
        raise ValueError(f"event level must be info, warn or error, not {level!r}")
    event = JobEvent(id=ids.event_id(), job_id=job_id, level=level, message=message, type=type, data=data, created_at=now())
    session.add(event)
    return event


# --- the moves, by who makes them ---------------------------------------------------------------------------

def mark_enqueued(session: Session, job_id: str) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=time.time()))


def claim_job(session: Session, job_id: str, worker_id: str) -> bool:
    """A worker takes a queued job. Only one claim can succeed, so a job never runs twice at once."""
    return transition(session, job_id, JobStatus.RUNNING, **taken(worker_id), started_at=now(), attempt=Job.attempt + 1)


def heartbeat(session: Session, job_id: str, worker_id: str, **values: Any) -> bool:
    """Record that the worker is alive, setting `values` on the job row in the same UPDATE. False when the job is no
    longer this worker's running job (cancelled, or taken as lost and requeued): the worker must stop and write
    nothing more (core/leases.py)."""
    return renew(session, Job, job_id, worker_id, **values)


def record_resolved_options(session: Session, job_id: str, worker_id: str, resolved: dict[str, Any]) -> bool:
    """Write what a worker decided for the job's 'auto' options (compute_dtype) into its stored config, while the
    worker still runs it. Returns whether it did."""
    job = session.execute(
        select(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING.value, Job.worker_id == worker_id).with_for_update()
    ).scalar_one_or_none()
    if job is None:
        return False
    job.training_config = {**job.training_config, **resolved}
    return True


def forget_steps_after(session: Session, job_id: str, step: int) -> None:
    """Delete the metrics (rows and metrics events) of the steps after `step`: a run resumed from the checkpoint at
    `step` trains them again, and each step must be listed once."""
    session.execute(delete(JobMetric).where(JobMetric.job_id == job_id, JobMetric.step > step))
    session.execute(delete(JobEvent).where(JobEvent.job_id == job_id, JobEvent.type == "metrics",
                                           JobEvent.data["step"].as_integer() > step))


def succeed_job(session: Session, job_id: str, worker_id: str, *, fine_tuned_model: str, trained_tokens: int,
                result_files: list[str]) -> bool:
    return transition(session, job_id, JobStatus.SUCCEEDED, only_from={JobStatus.RUNNING}, owner=worker_id,
                      fine_tuned_model=fine_tuned_model, trained_tokens=trained_tokens, result_files=result_files)


def fail_job(session: Session, job_id: str, *, code: str, message: str, param: str | None = None,
             worker_id: str | None = None) -> bool:
    moved = transition(session, job_id, JobStatus.FAILED, owner=worker_id,
                       error={"code": code, "message": message, "param": param})
    if moved:
        add_event(session, job_id, "error", message)
    return moved


def cancel_job(session: Session, job_id: str) -> bool:
    """Cancel a queued or running job. A running job's worker sees it at its next heartbeat (seconds) and
    stops without writing anything more."""
    moved = transition(session, job_id, JobStatus.CANCELLED)
    if moved:
        add_event(session, job_id, "info", "Job cancelled")
    return moved


def request_pause(session: Session, job_id: str) -> bool:
    """Pause a job: a queued one at once (out of the queue: its message, if sent, finds it not queued); a running
    one is marked, and its worker checkpoints at the next step boundary and then moves it (`pause_running_job`).
    False for any other status."""
    if transition(session, job_id, JobStatus.PAUSED, only_from={JobStatus.QUEUED}, enqueued_at=None):
        add_event(session, job_id, "info", "Job paused")
        return True
    marked = session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING.value)
                             .values(pause_requested_at=now()).execution_options(synchronize_session=False)).rowcount == 1
    if marked:
        add_event(session, job_id, "info", "Pause requested: the job pauses after its next step, with a checkpoint")
    return marked


def pause_running_job(session: Session, job_id: str, worker_id: str, checkpoint_id: str) -> bool:
    """The worker's half of a pause: its run stopped on a checkpoint (`checkpoint_id`); the job frees the worker."""
    moved = transition(session, job_id, JobStatus.PAUSED, only_from={JobStatus.RUNNING}, owner=worker_id, worker_id=None,
                       heartbeat_at=None, pause_requested_at=None, resume_checkpoint=checkpoint_id)
    if moved:
        add_event(session, job_id, "info", "Job paused")
    return moved


def resume_job(session: Session, job_id: str) -> bool:
    """A paused job is queued again (unsent: dispatch sends it in its project's turn)."""
    moved = transition(session, job_id, JobStatus.QUEUED, only_from={JobStatus.PAUSED}, enqueued_at=None, pause_requested_at=None)
    if moved:
        add_event(session, job_id, "info", "Job resumed")
    return moved


def sweep_lost_jobs(session: Session, *, heartbeat_timeout_s: float, max_attempts: int,
                    at: float | None = None) -> list[tuple[str, str]]:
    """Find running jobs whose heartbeat stopped (by Unix time `at`, the clock's by default) and recover each
    (`recover_lost_run`): the caller sends the task of those requeued again. Returns [(job_id, outcome)]."""
    # `still_stale` is checked again inside each UPDATE: a late heartbeat wins.
    still_stale = lapsed(Job, heartbeat_timeout_s=heartbeat_timeout_s, at=at)
    stale = session.execute(select(Job.id, Job.worker_id).where(still_stale)).all()
    outcome: list[tuple[str, str]] = []
    for job_id, worker_id in stale:
        # The requeued job keeps its old enqueued_at: the sweeper sends it at once and marks it sent again.
        recovered = recover_lost_run(session, job_id, max_attempts=max_attempts, guard={"when": still_stale},
                                     cause=f"worker {worker_id} stopped responding", error_code="worker_lost")
        if recovered:
            outcome.append((job_id, recovered))
    return outcome


def recover_lost_run(session: Session, job_id: str, *, max_attempts: int, guard: dict[str, Any], cause: str,
                     error_code: str, **requeue_fields: Any) -> str:
    """A running job whose run ended without its runner's word (its worker stopped responding, or a rank of its
    launch crashed): paused at its newest checkpoint if asked to pause, requeued to resume from there with attempts
    left, else failed with `error_code`. `guard` is `transition`'s condition that the run is still the lost one
    (`owner=` or `when=`); `cause` says what happened, in the events and the error. Returns "paused", "requeued",
    "failed", or "" if the guard no longer held (a late heartbeat, another worker's job)."""
    attempt, pause_requested_at = session.execute(select(Job.attempt, Job.pause_requested_at).where(Job.id == job_id)).one()
    last = session.execute(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step.desc()).limit(1)).scalar_one_or_none()
    if last is not None and pause_requested_at is not None:
        if transition(session, job_id, JobStatus.PAUSED, only_from={JobStatus.RUNNING}, **guard, worker_id=None,
                      heartbeat_at=None, pause_requested_at=None, resume_checkpoint=last.id):
            forget_steps_after(session, job_id, last.step)
            add_event(session, job_id, "info", f"Job paused ({cause}) at the checkpoint of step {last.step}")
            return "paused"
    elif last is not None and attempt < max_attempts:
        if transition(session, job_id, JobStatus.QUEUED, only_from={JobStatus.RUNNING}, **guard, worker_id=None,
                      heartbeat_at=None, resume_checkpoint=last.id, **requeue_fields):
            # Metrics past the checkpoint will be produced again by the resumed run.
            forget_steps_after(session, job_id, last.step)
            add_event(session, job_id, "warn", f"{cause[0].upper()}{cause[1:]}; resuming from the checkpoint at step {last.step}")
            return "requeued"
    else:
        why = "no checkpoint to resume from" if last is None else f"{attempt} attempts made"
        message = f"The job's run ended: {cause} ({why})."
        if transition(session, job_id, JobStatus.FAILED, only_from={JobStatus.RUNNING}, **guard,
                      error={"code": error_code, "param": None, "message": message}):
            add_event(session, job_id, "error", message)
            return "failed"
    return ""


def expired_queued_jobs(session: Session, *, expires_s: float, at: float | None = None) -> list[str]:
    """Queued jobs whose task was sent longer ago than its expiry (no worker took it) by Unix time `at`: send them
    again. Jobs never sent are not here: they wait their turn (core/dispatch.py)."""
    return queued_jobs_sent_before(session, (time.time() if at is None else at) - expires_s)


def queued_jobs_sent_before(session: Session, cutoff: float) -> list[str]:
    """Queued jobs whose task message was sent before `cutoff` (Unix time)."""
    return list(session.execute(
        select(Job.id).where(Job.status == JobStatus.QUEUED.value, Job.enqueued_at.is_not(None), Job.enqueued_at < cutoff)
    ).scalars())
