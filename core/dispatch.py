"""Fair dispatch: the database is the queue; the broker holds only the next job or two of each project.

A new job is a queued row with no task message yet (`enqueued_at` NULL). `dispatch` sends the training tasks of a
project's oldest unsent jobs while the project has fewer than `QLORA_QUEUED_MESSAGES_PER_PROJECT` messages waiting
in the broker and fewer than `QLORA_MAX_RUNNING_JOBS_PER_PROJECT` jobs running or about to. So one project's 200
queued jobs put one message in the broker, and another project's first job waits behind that one only.

It runs when a job is created, when a worker claims a job (the next one of that project moves up), when a job
ends or is cancelled, and on every sweep (catching up after a broker outage). Holding the project's row lock makes
concurrent dispatches of one project send no more than the limits allow.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session, sessionmaker

from core.db import session_scope
from core.jobs import JobStatus, mark_enqueued
from core.models import Job, Project
from core.queue import send_training_task
from core.settings import Settings

log = logging.getLogger(__name__)


class DispatchError(RuntimeError):
    """The broker refused a send: the job stays queued and unsent, for the next dispatch."""


def dispatch(session: Session, celery_app: Any, settings: Settings, project: str) -> list[str]:
    """Send the tasks of `project`'s oldest unsent queued jobs that its share allows, and commit; returns their ids.
    Raises DispatchError (after committing what was sent) if the broker does not answer."""
    session.execute(select(Project.name).where(Project.name == project).with_for_update())
    counts = dict(session.execute(
        select(Job.status, func.count()).where(Job.project == project, Job.status.in_([JobStatus.RUNNING.value, JobStatus.QUEUED.value]),
                                               (Job.status == JobStatus.RUNNING.value) | Job.enqueued_at.is_not(None))
        .group_by(Job.status)).all())
    waiting, running = counts.get(JobStatus.QUEUED.value, 0), counts.get(JobStatus.RUNNING.value, 0)
    room = min(settings.queued_messages_per_project - waiting, settings.max_running_jobs_per_project - running - waiting)
    sent: list[str] = []
    if room > 0:
        unsent = session.scalars(select(Job.id).where(Job.project == project, Job.status == JobStatus.QUEUED.value,
                                                      Job.enqueued_at.is_(None)).order_by(Job.seq).limit(room)).all()
        for job_id in unsent:
            try:
                send_training_task(celery_app, settings, job_id)
            except Exception as exc:
                session.commit()
                raise DispatchError(f"the broker refused the task of {job_id} ({type(exc).__name__})") from exc
            mark_enqueued(session, job_id)
            sent.append(job_id)
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
    """The projects with unsent queued jobs whose share has room for one now (`dispatch` would send something), in one
    query: the sweeper dispatches only these, instead of taking the row lock of every project with a backlog on every
    pass (docs/operations.md "Scale")."""
    return list(session.scalars(projects_with_room_query(settings)))


def projects_with_room_query(settings: Settings) -> Select[tuple[str]]:
    queued, running = JobStatus.QUEUED.value, JobStatus.RUNNING.value
    unsent = func.count().filter(Job.status == queued, Job.enqueued_at.is_(None))
    waiting = func.count().filter(Job.status == queued, Job.enqueued_at.is_not(None))
    busy = func.count().filter((Job.status == running) | ((Job.status == queued) & Job.enqueued_at.is_not(None)))
    return (select(Job.project).where(Job.status.in_([queued, running])).group_by(Job.project)
            .having(unsent > 0, waiting < settings.queued_messages_per_project, busy < settings.max_running_jobs_per_project))
