"""Fair dispatch: the database is the queue; the broker holds only the next job or two of each project.

A new job or merged export is a queued row with no task message yet (`enqueued_at` NULL). `dispatch` sends the tasks
of a project's oldest unsent exports, then jobs, while the project has fewer than
`QLORA_QUEUED_MESSAGES_PER_PROJECT` messages waiting in the broker and fewer than
`QLORA_MAX_RUNNING_JOBS_PER_PROJECT` jobs and exports running or about to (core/quotas.py counts them). So one
project's 200 queued jobs (or exports) put one message in the broker, and another project's first job waits behind
that one only.

It runs when a job or export is created, when a worker claims one (the next one of that project moves up), when an
export ends, when a job ends or is cancelled (core/job_events.py, the one consumer of a job's end), and on every
sweep (catching up after a broker outage). Holding the project's row lock makes concurrent dispatches of one project
send no more than the limits allow."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import Select, func, select, union_all
from sqlalchemy.orm import Session, sessionmaker

from core.db import owned_by, session_scope
from core.exports import ACTIVE, ExportStatus, mark_export_enqueued
from core.jobs import JobStatus, mark_enqueued
from core.queue import send_export_task, send_training_task
from core.quotas import training_queue_room
from core.settings import Settings
from core.tables import Export, Job

log = logging.getLogger(__name__)


class DispatchError(RuntimeError):
    """The broker refused a send: the job stays queued and unsent, for the next dispatch."""


def next_unsent_jobs(project: str, limit: int) -> Select[tuple[str]]:
    """The ids of `project`'s oldest queued jobs whose task was never sent, read in order from the unsent-jobs index
    (project, seq), not by walking the primary key through another project's backlog (core.db.owned_by)."""
    return (select(Job.id).where(*owned_by(Job.project, project), Job.status == JobStatus.QUEUED.value, Job.enqueued_at.is_(None))
            .order_by(Job.project, Job.seq).limit(limit))


def dispatch(session: Session, celery_app: Any, settings: Settings, project: str) -> list[str]:
    """Send the tasks of `project`'s oldest unsent merged exports, then of its oldest unsent queued jobs, as many as
    its share allows, and commit; returns their ids. Raises DispatchError (after committing what was sent) if the
    broker does not answer."""
    room = training_queue_room(session, settings, project)  # under the project's row lock
    sent: list[str] = []
    if room > 0:
        exports = session.scalars(select(Export.id).join(Job, Job.id == Export.job_id).where(
            Job.project == project, Export.status == ExportStatus.QUEUED.value, Export.enqueued_at.is_(None))
            .order_by(Export.seq).limit(room)).all()
        jobs = session.scalars(next_unsent_jobs(project, room - len(exports))).all()
        unsent = [(export_id, send_export_task, mark_export_enqueued) for export_id in exports]
        unsent += [(job_id, send_training_task, mark_enqueued) for job_id in jobs]
        for item, send, mark in unsent:
            try:
                send(celery_app, settings, item)
            except Exception as exc:
                session.commit()
                raise DispatchError(f"the broker refused the task of {item} ({type(exc).__name__})") from exc
            mark(session, item)
            sent.append(item)
    session.commit()
    return sent


def dispatch_quietly(session_factory: sessionmaker[Session], celery_app: Any, settings: Settings, project: str) -> list[str]:
    """`dispatch` in a session of its own, for the workers and the sweeper: a broker or database error is logged and
    left to the next sweep."""
    try:
        with session_scope(session_factory) as session:
            return dispatch(session, celery_app, settings, project)
    except Exception:
        log.warning("could not dispatch the queued jobs of project %s; the next sweep tries again", project, exc_info=True)
        return []


def projects_with_room(session: Session, settings: Settings) -> list[str]:
    """The projects with queued jobs or merged exports never sent whose share has room for one now (`dispatch` would
    send something), in one query: the sweeper dispatches only these, instead of taking the row lock of every project
    with a backlog on every pass (docs/operations.md "Scale"). The counts are `training_queue_room`'s."""
    return list(session.scalars(projects_with_room_query(settings)))


def projects_with_room_query(settings: Settings) -> Select[tuple[str]]:
    queued, running = JobStatus.QUEUED.value, JobStatus.RUNNING.value
    rows = union_all(
        select(Job.project, Job.status, Job.enqueued_at).where(Job.status.in_([queued, running])),
        select(Job.project, Export.status, Export.enqueued_at).join(Job, Job.id == Export.job_id).where(Export.status.in_(ACTIVE)),
    ).subquery()
    unsent = func.count().filter(rows.c.status == queued, rows.c.enqueued_at.is_(None))
    waiting = func.count().filter(rows.c.status == queued, rows.c.enqueued_at.is_not(None))
    busy = func.count().filter((rows.c.status == running) | rows.c.enqueued_at.is_not(None))
    return (select(rows.c.project).group_by(rows.c.project)
            .having(unsent > 0, waiting < settings.queued_messages_per_project, busy < settings.max_running_jobs_per_project))
