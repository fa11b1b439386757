"""The sweeper (Celery beat runs it every QLORA_SWEEP_INTERVAL_S): recovers jobs that no worker is running.

- A running job whose heartbeat stopped (its worker died or lost the database) is requeued to resume from its
  newest checkpoint when it has one and attempts left, and failed with `worker_lost` otherwise
  (`core.jobs.sweep_lost_jobs` makes both moves).
- A queued job whose task message expired before a worker took it, or is no longer in the broker's queue (Redis restarted without persistence; checked on Redis
  only, for jobs sent more than QLORA_LOST_MESSAGE_AFTER_S ago) is sent again; queued jobs never sent (waiting
  their project's turn, or refused by a broker that was down) are dispatched (core/dispatch.py).
- A queued merged export whose task expired unconsumed is sent again; one never sent (waiting its project's turn,
  or refused by a broker that was down) is dispatched with the jobs; a running one whose heartbeat stopped is
  failed with `worker_lost` (a new POST .../export merges again).
- Files past their `expires_at` (uploads with `expires_after`) are deleted: the row first, then the object.
  Readers stopped seeing them at `expires_at` already (`core.tables.file_is_live`).
- Uploads of the Uploads API pending past their hour become `expired`; the parts of every upload that is no longer
  pending (expired, cancelled, completed) are deleted (`core.uploads.sweep_uploads`).
- The local backend's `*.partial` files that a killed writer left (untouched for 15 minutes) are deleted.
- A webhook delivery due whose attempt waits for the sweeper (a retry hours away) or whose message was lost is sent
  (core/webhooks.py `due_for_send`).
- A job's end whose follow-up was not done (its qlora.job_ended message lost, or the broker refused the next job's
  dispatch) is sent again (core/job_events.py). Jobs this pass fails are announced by its commit, like any other end.

The database changes commit before any message is sent, so a worker that gets the message finds the row
already queued. A message sent twice is harmless: only one claim of a queued job succeeds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from core.db import session_scope
from core.dispatch import dispatch_quietly, projects_with_room
from core.exports import expired_queued_exports, fail_lost_exports, mark_export_enqueued
from core.job_events import due_for_resend, mark_resent
from core.jobs import expired_queued_jobs, mark_enqueued, queued_jobs_sent_before, sweep_lost_jobs
from core.queue import job_gpus, queued_training_jobs, send_export_task, send_job_ended_task, send_training_task, send_webhook_task
from core.settings import Settings
from core.storage import ObjectStorage, delete_quietly, remove_stale_partials
from core.tables import File, Job, SweeperAction, now
from core.uploads import sweep_uploads
from core.webhooks import due_for_send, mark_sent

log = logging.getLogger(__name__)


def expire_files(session_factory: sessionmaker[Session], storage: ObjectStorage, at: float | None = None) -> list[str]:
    """Delete the files whose `expires_at` has passed at Unix time `at` (now by default); returns their ids. The rows go first (committed), then
    the objects: a crash in between leaves an orphaned object, never a row pointing at nothing."""
    with session_scope(session_factory) as session:
        expired = session.execute(select(File.id, File.storage_key).where(File.expires_at <= (now() if at is None else at))).all()
        if expired:
            session.execute(delete(File).where(File.id.in_([file_id for file_id, _ in expired])))
    delete_quietly(storage, *(key for _, key in expired))
    return [file_id for file_id, _ in expired]


def lost_messages(settings: Settings, celery_app: Any, waiting: list[str]) -> list[str]:
    """The jobs of `waiting` (queued, sent a while ago) whose message no longer waits in the broker's queue. A message
    a worker has taken but not yet started (just taken, or held by the embedded broker's busy worker for its next job)
    is counted too: the copy sent again finds the job claimed and does nothing."""
    if not waiting:
        return []
    try:
        in_queue = queued_training_jobs(celery_app, settings)
    except Exception:
        log.warning("could not read the training queue", exc_info=True)
        return []
    if in_queue is None:
        return []
    lost = [job_id for job_id in waiting if job_id not in in_queue]
    for job_id in lost:
        log.warning("the message of queued job %s no longer waits in the broker's queue (lost, or taken by a worker that has "
                    "not started it): sending it again", job_id)
    return lost


def send_each(session_factory: sessionmaker[Session], ids: list[str], send: Callable[[str], None],
              mark: Callable[[Session, str], None], what: str) -> list[str]:
    """Send `what` for each id, marking each after its send (if the mark fails the next sweep sends again, which is
    harmless; marked before, a failed send would go unnoticed); returns the ids sent. A refused send is logged and
    left for the next sweep."""
    sent = []
    for item in ids:
        try:
            send(item)
        except Exception:
            log.exception("could not send %s for %s", what, item)
            continue
        with session_scope(session_factory) as session:
            mark(session, item)
        sent.append(item)
        log.info("sent %s for %s", what, item)
    return sent


def resend_expired_exports(settings: Settings, session_factory: sessionmaker[Session], celery_app: Any,
                           at: float | None = None) -> list[str]:
    """Send the task of every queued export whose message expired by Unix time `at`; returns their ids. (Exports never
    sent wait their project's turn: the sweep's dispatch sends them.)"""
    with session_scope(session_factory) as session:
        unsent = expired_queued_exports(session, expires_s=settings.task_expires_s, at=at)
    return send_each(session_factory, unsent, lambda export_id: send_export_task(celery_app, settings, export_id),
                     mark_export_enqueued, "the export task")


def resend_job_ended(settings: Settings, session_factory: sessionmaker[Session], celery_app: Any,
                     at: float | None = None) -> list[str]:
    """Send qlora.job_ended again for the job ends still unhandled a while (by Unix time `at`) after their last send;
    returns the outbox ids."""
    with session_scope(session_factory) as session:
        due = due_for_resend(session, settings, at)
    return send_each(session_factory, due, lambda outbox_id: send_job_ended_task(celery_app, settings, outbox_id),
                     mark_resent, "qlora.job_ended again (the job's end was not handled yet)")


def send_due_webhooks(settings: Settings, session_factory: sessionmaker[Session], celery_app: Any,
                      at: float | None = None) -> list[str]:
    """Send the task of every webhook delivery due by Unix time `at` that no message carries (core/webhooks.py);
    returns the delivery ids."""
    with session_scope(session_factory) as session:
        due = due_for_send(session, settings, at)
    return send_each(session_factory, due, lambda delivery_id: send_webhook_task(celery_app, settings, delivery_id),
                     mark_sent, "the webhook delivery task")


def sweep(settings: Settings, session_factory: sessionmaker[Session], celery_app: Any,
          storage: ObjectStorage | None = None, clock: Callable[[], float] = time.time) -> dict[str, list[str]]:
    """One pass. Returns {"requeued": [...], "failed": [...], "sent": [...]} (job ids), "failed_exports" and
    "sent_exports" (export ids), "sent_webhooks" (webhook delivery ids), plus "expired_files" (file ids), "cleaned_uploads" (upload ids) and "stale_partials"
    (paths) when `storage` is given. Every age (heartbeats, messages, expiries) is measured at one reading of `clock` (Unix time): a test passes a
    clock that is ahead instead of sleeping until a timeout has passed."""
    at = clock()
    with session_scope(session_factory) as session:
        lost = sweep_lost_jobs(session, heartbeat_timeout_s=settings.heartbeat_timeout_s, max_attempts=settings.max_attempts, at=at)
        # Read after the requeues (same transaction): a requeued job is also "queued with an old message".
        expired = expired_queued_jobs(session, expires_s=settings.task_expires_s, at=at)
        waiting = queued_jobs_sent_before(session, at - settings.lost_message_after_s)
    unsent = expired + lost_messages(settings, celery_app, waiting)
    requeued = [job_id for job_id, outcome in lost if outcome == "requeued"]
    failed = [job_id for job_id, outcome in lost if outcome == "failed"]
    for job_id in requeued:
        log.warning("job %s lost its worker: requeued to resume from its last checkpoint", job_id)
    for job_id in failed:
        log.warning("job %s lost its worker: failed (worker_lost)", job_id)

    sent: list[str] = []
    to_send = list(dict.fromkeys(requeued + unsent))  # ordered, without duplicates
    with session_scope(session_factory) as session:  # each goes to the queue of its GPU count
        gpus = {job_id: job_gpus(config) for job_id, config in session.execute(select(Job.id, Job.training_config).where(Job.id.in_(to_send)))}
    for job_id in to_send:
        try:
            send_training_task(celery_app, settings, job_id, n_gpus=gpus.get(job_id, 1))
        except Exception:
            # The broker is down: the job stays queued and the next sweep tries again.
            log.exception("could not send the training task of job %s", job_id)
            continue
        # Marked after the send: if this commit fails the next sweep sends again (harmless); marked before, a
        # failed send would go unnoticed until the expiry.
        with session_scope(session_factory) as session:
            mark_enqueued(session, job_id)
        sent.append(job_id)
        log.info("sent the training task of job %s", job_id)
    with session_scope(session_factory) as session:
        projects = projects_with_room(session, settings)  # only those whose turn has come
    # Catching up: the jobs the broker refused when they were created or at a claim (a job's end dispatches through
    # core/job_events.py, resent above when its message was lost).
    for project in projects:
        dispatched = dispatch_quietly(session_factory, celery_app, settings, project)
        sent += dispatched
        for job_id in dispatched:
            log.info("sent the training task of job %s", job_id)
    resent_ended = resend_job_ended(settings, session_factory, celery_app, at)
    sent_webhooks = send_due_webhooks(settings, session_factory, celery_app, at)
    with session_scope(session_factory) as session:
        failed_exports = fail_lost_exports(session, heartbeat_timeout_s=settings.heartbeat_timeout_s, at=at)
    result = {"requeued": requeued, "failed": failed, "sent": sent, "failed_exports": failed_exports,
              "sent_exports": resend_expired_exports(settings, session_factory, celery_app, at), "sent_webhooks": sent_webhooks}
    if storage is not None:
        result["expired_files"] = expire_files(session_factory, storage, at)
        result["cleaned_uploads"] = sweep_uploads(session_factory, storage, at)
        try:
            result["stale_partials"] = remove_stale_partials(storage)
        except OSError:
            log.warning("could not remove stale partial objects", exc_info=True)
            result["stale_partials"] = []
    count_actions(session_factory, {"sweeps": 1, "requeued": len(requeued), "failed": len(failed), "resent": len(set(sent) - set(requeued)),
                                    "failed_exports": len(failed_exports), "resent_exports": len(result["sent_exports"]),
                                    "expired_files": len(result.get("expired_files", [])), "resent_job_ended": len(resent_ended),
                                    "resent_webhooks": len(sent_webhooks)})
    return result


def count_actions(session_factory: sessionmaker[Session], counts: dict[str, int]) -> None:
    """Add this pass's actions to the counters the API's /metrics reads. Counting never fails a sweep: its moves are
    committed already."""
    at = time.time()
    try:
        with session_scope(session_factory) as session:
            for action, n in counts.items():
                moved = session.execute(update(SweeperAction).where(SweeperAction.action == action)
                                        .values(count=SweeperAction.count + n, updated_at=at)).rowcount
                if not moved:  # an action newer than the migration that made the rows
                    session.execute(insert(SweeperAction).values(action=action, count=n, updated_at=at))
    except Exception:
        log.warning("could not count the sweep's actions", exc_info=True)
