"""POST /v1/fine_tuning/jobs/{id}/pause and /resume (OpenAI's).

Pausing a queued job takes it out of the queue at once; a running job is marked and its worker writes a checkpoint
after its current step, frees itself and leaves the job `paused` (the answer says `running` until then). Resuming
queues the job again: it waits its project's turn (core/dispatch.py) and continues from that checkpoint. A paused
job holds no worker and is not counted against the running-job limits; its files and checkpoints stay stored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from celery import Celery
from fastapi import APIRouter
from sqlalchemy.orm import Session

from api.deps import CeleryDep, CurrentProject, SessionDep, SettingsDep
from api.errors import bad_request
from api.openapi import error_responses
from api.routes.jobs import get_job_row
from api.schemas import FineTuningJob
from core.dispatch import DispatchError, dispatch
from core.jobs import request_pause, resume_job
from core.settings import Settings

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/fine_tuning/jobs", tags=["fine-tuning"])


@router.post("/{job_id}/pause", response_model=FineTuningJob, summary="Pause a fine-tuning job", responses=error_responses(404))
def pause(job_id: str, project: CurrentProject, session: SessionDep, celery_app: CeleryDep, settings: SettingsDep) -> FineTuningJob:
    return _move(session, celery_app, settings, project, job_id, request_pause, "cannot be paused")


@router.post("/{job_id}/resume", response_model=FineTuningJob, summary="Resume a paused fine-tuning job", responses=error_responses(404))
def resume(job_id: str, project: CurrentProject, session: SessionDep, celery_app: CeleryDep, settings: SettingsDep) -> FineTuningJob:
    return _move(session, celery_app, settings, project, job_id, resume_job, "is not paused and cannot be resumed")


def _move(session: Session, celery_app: Celery, settings: Settings, project: str, job_id: str,
          move: Callable[[Session, str], bool], refusal: str) -> FineTuningJob:
    """Make the move (core/jobs.py) or answer 400 naming the job's status; then dispatch the project's queue: a
    paused job's turn passes to the next one, a resumed job waits its turn."""
    job = get_job_row(session, project, job_id)
    if not move(session, job.id):
        raise bad_request(f"Job {job_id} is {job.status} and {refusal}.", param="job_id", code="invalid_job_status")
    session.commit()
    try:  # a failure is left to the sweeper, which dispatches every project with unsent queued jobs
        dispatch(session, celery_app, settings, project)
    except DispatchError:
        logger.warning("could not dispatch project %s", project, exc_info=True)
    session.refresh(job)
    return FineTuningJob.from_row(job)
