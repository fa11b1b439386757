"""/v1/fine_tuning/jobs: create (then enqueue), list, retrieve, cancel, events, checkpoints; and our extensions,
the job's metrics and a checkpoint's archive. Merged exports have their own router (api/routes/exports.py).

A new job is committed first and its task sent after (a fast worker never looks for a row that is not
there yet). If the broker does not answer, it stays queued with no `enqueued_at` and the sweeper sends it later.
"""

from __future__ import annotations

import logging
import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.deps import CeleryDep, CurrentProject, SessionDep, SettingsDep, StorageDep
from api.errors import bad_request, not_found
from api.hyperparameters import job_options
from api.model_dirs import base_config, find_base_model
from api.openapi import error_responses
from api.pagination import cursor_seq, fetch_page, fetch_page_after
from api.schemas import (
    MAX_SEED,
    CursorPage,
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobEvent,
    JobCreate,
    Page,
    first_unstorable,
)
from contract.hyperparameters import DEFAULT_METHOD
from contract.memory import MemoryEstimate, estimate_memory
from contract.metrics import StepMetrics
from contract.options import TrainingConfig
from core import job_service
from core.job_service import NewJob
from core.jobs import JobStatus, cancel_job
from core.storage import ObjectNotFound
from core.tables import Checkpoint, Job, JobEvent, JobMetric
from worker.training.tunables import LOSS_CHUNK_TOKENS

logger = logging.getLogger("api")

MAX_STEP = 2**31 - 1  # jobs' step numbers are 32-bit integer columns

router = APIRouter(prefix="/fine_tuning/jobs", tags=["fine-tuning"])


def get_job_row(session: Session, project: str, job_id: str) -> Job:
    job = session.scalar(select(Job).where(Job.id == job_id, Job.project == project))
    if job is None:
        raise not_found(f"No such fine-tuning job: {job_id}", param="job_id", code="job_not_found")
    return job


def _memory_estimate(model_config: dict[str, Any] | None, cfg: TrainingConfig) -> MemoryEstimate | None:
    """The estimated peak GPU memory. A config.json the estimate cannot read (not a Llama-family decoder, or
    broken) only means no estimate: it must not stop the job."""
    if model_config is None:
        return None
    try:
        return estimate_memory(model_config, cfg, loss_chunk_tokens=LOSS_CHUNK_TOKENS)
    except (ValueError, ArithmeticError, TypeError) as exc:
        logger.info("no memory estimate for a job on %s: %s", model_config.get("model_type"), exc)
        return None


@router.post("", response_model=FineTuningJob, summary="Create a fine-tuning job", responses=error_responses(429))
def create_job(
    body: JobCreate, project: CurrentProject, session: SessionDep, settings: SettingsDep, celery_app: CeleryDep
) -> FineTuningJob:
    """The wire's checks here (a storable body, a base model that exists, OpenAI's hyperparameters resolved);
    the files, the project's quotas, the step limit, the row and the enqueue in core/job_service.py."""
    if unstorable := first_unstorable(body.model_dump(exclude_none=True)):
        param, reason = unstorable
        raise bad_request(f"Invalid '{param}': {reason}.", param=param or None, code="invalid_value")
    model_dir = find_base_model(settings, body.model)
    if model_dir is None:
        raise bad_request(
            f"The model {body.model!r} does not exist: base models are the directories of the service's models directory (GET /v1/models).",
            param="model",
            code="model_not_found",
        )
    model_config = base_config(model_dir)
    seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED + 1)
    method = body.method.type if body.method else DEFAULT_METHOD
    request = NewJob(model=body.model, method=method, training_file=body.training_file, validation_file=body.validation_file, suffix=body.suffix,
                     metadata=body.metadata, integrations=body.integrations,
                     estimate=lambda cfg: _memory_estimate(model_config, cfg),
                     resolve=lambda: job_options(body, seed, model_config),
                     options_param="hyperparameters" if body.hyperparameters is not None
                     else f"method.{method}.hyperparameters")
    return FineTuningJob.from_row(job_service.create_job(session, celery_app, settings, project, request))


@router.get("", response_model=Page[FineTuningJob], summary="List fine-tuning jobs")
def list_jobs(
    request: Request,
    project: CurrentProject,
    session: SessionDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    status: Annotated[JobStatus | None, Query(description="Extension: only the jobs with this status.")] = None,
) -> Page[FineTuningJob]:
    """Newest first. `metadata[KEY]=VALUE` query parameters keep only the jobs whose metadata has those pairs."""
    where: list[Any] = []  # the project is the page's owner (fetch_page)
    if status is not None:
        where.append(Job.status == status.value)
    for name, value in request.query_params.multi_items():
        if name.startswith("metadata[") and name.endswith("]"):
            key = name.removeprefix("metadata[").removesuffix("]")
            if '"' in key or "\\" in key:  # would break the JSON path the database is asked for
                raise bad_request(f"Metadata filter keys cannot contain '\"' or '\\' (got {key[:64]!r}).", param=name, code="invalid_value")
            where.append(Job.metadata_[key].as_string() == value)
    after_seq = cursor_seq(session, Job.id, Job.seq, after, Job.project == project) if after else None
    rows, has_more = fetch_page(session, select(Job).where(*where), Job.seq, after_seq=after_seq, limit=limit, newest_first=True,
                                owner=(Job.project, project))
    return Page[FineTuningJob](data=[FineTuningJob.from_row(r) for r in rows], has_more=has_more)


@router.get("/{job_id}", response_model=FineTuningJob, summary="Retrieve a fine-tuning job", responses=error_responses(404))
def retrieve_job(job_id: str, project: CurrentProject, session: SessionDep) -> FineTuningJob:
    return FineTuningJob.from_row(get_job_row(session, project, job_id))


@router.post("/{job_id}/cancel", response_model=FineTuningJob, summary="Cancel a fine-tuning job", responses=error_responses(404))
def cancel(job_id: str, project: CurrentProject, session: SessionDep) -> FineTuningJob:
    """A queued job never starts; a running one stops at its worker's next heartbeat. Its turn passes to the
    project's next job through "a job ended" (core/job_events.py), announced by this commit."""
    job = get_job_row(session, project, job_id)
    moved = cancel_job(session, job.id)
    session.commit()
    session.refresh(job)
    if not moved:
        raise bad_request(f"Job {job_id} is already {job.status} and cannot be cancelled.", param="job_id", code="invalid_job_status")
    return FineTuningJob.from_row(job)


@router.get("/{job_id}/events", response_model=Page[FineTuningJobEvent], summary="List a job's events", responses=error_responses(404))
def list_events(
    job_id: str,
    project: CurrentProject,
    session: SessionDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> Page[FineTuningJobEvent]:
    """Newest first."""
    job = get_job_row(session, project, job_id)
    rows, has_more = fetch_page_after(session, JobEvent, [], after=after, limit=limit, newest_first=True, owner=(JobEvent.job_id, job.id))
    return Page[FineTuningJobEvent](data=[FineTuningJobEvent.from_row(r) for r in rows], has_more=has_more)


@router.get("/{job_id}/checkpoints", response_model=CursorPage[FineTuningJobCheckpoint], summary="List a job's checkpoints",
             responses=error_responses(404))
def list_checkpoints(
    job_id: str,
    project: CurrentProject,
    session: SessionDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 10,
) -> CursorPage[FineTuningJobCheckpoint]:
    """Newest first."""
    job = get_job_row(session, project, job_id)
    rows, has_more = fetch_page_after(session, Checkpoint, [], after=after, limit=limit, newest_first=True,
                                      owner=(Checkpoint.job_id, job.id))
    data = [FineTuningJobCheckpoint.from_row(r) for r in rows]
    return CursorPage[FineTuningJobCheckpoint](
        data=data, has_more=has_more, first_id=data[0].id if data else None, last_id=data[-1].id if data else None
    )


@router.get("/{job_id}/metrics", response_model=Page[StepMetrics], response_model_exclude_unset=True,
            summary="List a job's training metrics (extension)", responses=error_responses(404))
def list_metrics(
    job_id: str,
    project: CurrentProject,
    session: SessionDep,
    # Bounded by the step column's range: a larger integer would reach the database and fail there (a 500).
    after: Annotated[int | None, Query(ge=0, le=MAX_STEP, description="A step number: only later steps are listed.")] = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
) -> Page[StepMetrics]:
    """One row per logged step, ascending: the fields of `StepMetrics` that the step reported."""
    job = get_job_row(session, project, job_id)
    query = select(JobMetric).where(JobMetric.job_id == job.id)
    if after is not None:
        query = query.where(JobMetric.step > after)
    rows = list(session.scalars(query.order_by(JobMetric.step).limit(limit + 1)))
    data = [StepMetrics(**{**row.values, "step": row.step}) for row in rows[:limit]]
    return Page[StepMetrics](object="list", data=data, has_more=len(rows) > limit)  # `object` set: it is not left out


@router.get(
    "/{job_id}/checkpoints/{checkpoint_id}/content",
    summary="Download a checkpoint (extension)",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/gzip": {}}}, **error_responses(404)},
)
def checkpoint_content(
    job_id: str, checkpoint_id: str, project: CurrentProject, session: SessionDep, storage: StorageDep
) -> StreamingResponse:
    """The checkpoint's .tar.gz: the peft adapter and the trainer state."""
    job = get_job_row(session, project, job_id)
    checkpoint = session.scalar(select(Checkpoint).where(Checkpoint.id == checkpoint_id, Checkpoint.job_id == job.id))
    missing = not_found(f"No such checkpoint: {checkpoint_id}", param="checkpoint_id", code="checkpoint_not_found")
    if checkpoint is None:
        raise missing
    try:
        chunks = storage.iter_bytes(checkpoint.storage_key)
    except ObjectNotFound:
        raise missing from None
    session.close()  # the connection goes back to the pool now, not after the last byte of a long download
    return StreamingResponse(
        chunks, media_type="application/gzip", headers={"content-disposition": f'attachment; filename="{checkpoint.id}.tar.gz"'}
    )
