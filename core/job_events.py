""""A job ended": the one path from a job's terminal status to what follows it.

    core.jobs.transition (runner, API cancel, sweeper)   one transaction: the status and a job_outbox row
        └─ commit ──> after_commit hook (`send_on_commit`) sends qlora.job_ended(outbox id) to the control queue
                        └─> worker/tasks.py `job_ended` ──> `handle_job_ended` here:
                              1. repeatable actions: the fair dispatch of the project's next job (core/dispatch.py)
                              2. one transaction: the row marked handled, with the once-only actions beside the mark:
                                 the webhook deliveries of the end (core/webhooks.py), whose tasks are sent after it
    the sweeper: a row still unhandled `job_ended_resend_after_s` after its last send is sent again (`due_for_resend`)

A message may be lost (broker restart, a send refused, a worker killed mid-task) or delivered twice: the sweeper's
resend covers the first, the handled mark the second. So the actions before the mark must be safe to repeat
(dispatch is: it holds the project's lock and sends only what the limits allow), and what must happen once is
written in the marking transaction. To add an end-of-job action, add it to `handle_job_ended`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import event, select, update
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from core import webhooks
from core.db import session_scope
from core.dispatch import DispatchError, dispatch
from core.jobs import ENDED_IN_SESSION
from core.queue import send_job_ended_task
from core.settings import Settings
from core.tables import Job, JobOutbox

log = logging.getLogger(__name__)


def send_on_commit(session_factory: sessionmaker[Session], celery_app: Any, settings: Settings) -> None:
    """Make every commit of `session_factory`'s sessions send qlora.job_ended for the outbox rows it wrote. Each process
    that ends jobs (the API, the workers, the sweeper) calls this once on its session factory. A send the broker
    refuses is only logged: the row stays unhandled and the sweeper sends it again."""

    def after_commit(session: Session) -> None:
        for outbox_id in session.info.pop(ENDED_IN_SESSION, []):
            try:
                send_job_ended_task(celery_app, settings, outbox_id)
            except Exception as exc:
                log.warning("could not send job_ended %s (%s); the sweeper sends it again", outbox_id, type(exc).__name__)

    def after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
        if transaction.parent is None:  # a rolled-back transaction's rows never existed: nothing to announce
            session.info.pop(ENDED_IN_SESSION, None)

    event.listen(session_factory, "after_commit", after_commit)
    event.listen(session_factory, "after_transaction_end", after_transaction_end)


def handle_job_ended(session_factory: sessionmaker[Session], celery_app: Any, settings: Settings, outbox_id: str) -> bool:
    """Do what follows the end recorded by outbox row `outbox_id`, once. Returns whether this call handled it (False:
    no such row, handled already, or the broker refused the dispatch: then the row stays for the sweeper's resend)."""
    with session_scope(session_factory) as session:
        row = session.execute(select(JobOutbox.handled_at, Job.id, Job.project).join(Job, Job.id == JobOutbox.job_id)
                              .where(JobOutbox.id == outbox_id)).one_or_none()
        if row is None or row.handled_at is not None:
            return False
        try:
            for job_id in dispatch(session, celery_app, settings, row.project):
                log.info("job %s ended: sent the training task of %s, the next job of project %s", row.id, job_id, row.project)
        except DispatchError:
            log.warning("job %s ended, but the broker refused the next job of project %s; the sweeper resends %s",
                        row.id, row.project, outbox_id, exc_info=True)
            return False
    with session_scope(session_factory) as session:
        handled = session.execute(update(JobOutbox).where(JobOutbox.id == outbox_id, JobOutbox.handled_at.is_(None))
                                  .values(handled_at=time.time()).execution_options(synchronize_session=False)).rowcount == 1
        # Once-only: the webhook deliveries of this end are written beside the mark (core/webhooks.py).
        deliveries = webhooks.write_deliveries(session, settings, outbox_id) if handled else []
    first = settings.webhook_retry_schedule_s[0]
    if deliveries and first <= settings.webhook_countdown_max_s:  # a later first attempt: the sweeper sends it when due
        webhooks.send_deliveries(celery_app, settings, deliveries, countdown=first)
    return handled


def due_for_resend(session: Session, settings: Settings, at: float | None = None) -> list[str]:
    """The rows still unhandled `job_ended_resend_after_s` after they were written or last sent, by Unix time `at`
    (now by default; their message was lost, or its handling failed): the sweeper sends qlora.job_ended again."""
    cutoff = (time.time() if at is None else at) - settings.job_ended_resend_after_s
    return list(session.scalars(select(JobOutbox.id).where(
        JobOutbox.handled_at.is_(None), JobOutbox.created_at <= cutoff,
        JobOutbox.sent_at.is_(None) | (JobOutbox.sent_at <= cutoff)).order_by(JobOutbox.seq)))


def mark_resent(session: Session, outbox_id: str) -> None:
    session.execute(update(JobOutbox).where(JobOutbox.id == outbox_id).values(sent_at=time.time()))
