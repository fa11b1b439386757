"""/v1/fine_tuning/jobs: create (then enqueue), list, retrieve, cancel, events, checkpoints; and our extensions,
the job's metrics, a checkpoint's archive and merged exports.

A new job (or export) is committed first and its task sent after (a fast worker never looks for a row that is not
there yet). If the broker does not answer, it stays queued with no `enqueued_at` and the sweeper sends it later.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Annotated, Any

from celery import Celery
from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.deps import CeleryDep, CurrentProject, SessionDep, SettingsDep, StorageDep
from api.errors import APIError, bad_request, not_found, quota_exceeded
from api.hyperparameters import job_options
from api.model_dirs import base_config, find_base_model, weights_bytes
from api.openapi import error_responses
from api.pagination import cursor_seq, fetch_page
from api.quotas import check_stored_bytes
from api.schemas import (
    MAX_SEED,
    CursorPage,
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobEvent,
    FineTuningJobExport,
    JobCreate,
    Page,
    first_unstorable,
)
from contract.data_format import MIN_EXAMPLES
from contract.memory import GIB, MemoryEstimate, estimate_memory
from contract.metrics import StepMetrics
from contract.options import TrainingConfig
from core import ids
from core.dispatch import DispatchError, dispatch
from core.exports import ACTIVE, ExportStatus, mark_export_enqueued
from core.jobs import TERMINAL, JobStatus, add_event, cancel_job
from core.model_deletion import lock_live_model_job
from core.models import Checkpoint, Export, Job, JobEvent, JobMetric, Project, file_is_live, now
from core.models import File as FileRow
from core.queue import send_export_task
from core.settings import Settings
from core.storage import ObjectNotFound
from worker.training.tunables import LOSS_CHUNK_TOKENS

logger = logging.getLogger("api")

MAX_STEP = 2**31 - 1  # jobs' step numbers are 32-bit integer columns

router = APIRouter(prefix="/fine_tuning/jobs", tags=["fine-tuning"])


def get_job_row(session: Session, project: str, job_id: str) -> Job:
    job = session.scalar(select(Job).where(Job.id == job_id, Job.project == project))
    if job is None:
        raise not_found(f"No such fine-tuning job: {job_id}", param="job_id", code="job_not_found")
    return job


def _usable_file(session: Session, project: str, file_id: str, param: str) -> FileRow:
    """A file of the caller's project, uploaded for fine-tuning, that passed validation."""
    row = session.scalar(select(FileRow).where(FileRow.id == file_id, FileRow.project == project, file_is_live()))
    if row is None:
        raise bad_request(f"No such file: {file_id}", param=param, code="file_not_found")
    if row.purpose != "fine-tune":
        raise bad_request(
            f"File {file_id} has purpose {row.purpose!r}; a job needs a file uploaded with purpose 'fine-tune'.",
            param=param,
            code="invalid_file_purpose",
        )
    if row.status == "error":
        raise bad_request(f"File {file_id} failed validation: {row.status_details}", param=param, code="invalid_file_status")
    if row.status != "processed":
        raise bad_request(f"File {file_id} is not processed yet (status {row.status!r}).", param=param, code="invalid_file_status")
    return row


def _memory_estimate(model_dir: Path, cfg: TrainingConfig) -> MemoryEstimate | None:
    """The estimated peak GPU memory. A config.json the estimate cannot read (not a Llama-family decoder, or
    broken) only means no estimate: it must not stop the job."""
    model_config = base_config(model_dir)
    if model_config is None:
        return None
    try:
        return estimate_memory(model_config, cfg, loss_chunk_tokens=LOSS_CHUNK_TOKENS)
    except (ValueError, ArithmeticError, TypeError) as exc:
        logger.info("no memory estimate for a job on %s: %s", model_dir.name, exc)
        return None


def _add_memory_estimate_event(session: Session, job_id: str, estimate: MemoryEstimate) -> None:
    """The estimate as a person reads it in the job's events (the job object carries the numbers)."""
    checkpointing = "on" if estimate.gradient_checkpointing else "off"
    add_event(
        session,
        job_id,
        "info",
        f"Estimated peak GPU memory: {estimate.total / GIB:.2f} GiB (gradient checkpointing {checkpointing})",
        data=estimate.to_dict(),
    )


def _enqueue(session: Session, celery_app: Celery, settings: Settings, project: str, job_id: str) -> None:
    """Send the project's next jobs, this one if its turn has come (core/dispatch.py: the others wait unsent)."""
    try:
        for sent in dispatch(session, celery_app, settings, project):
            logger.info("job %s sent to the training queue %s", sent, settings.task_queue)
    except DispatchError as exc:  # the job is committed: the sweeper sends it later
        logger.warning("could not send the training task of %s", job_id, exc_info=exc)
        # Only the exception's type in the event: its text may hold the broker URL and its password.
        add_event(
            session,
            job_id,
            "warn",
            f"The job could not be sent to the training queue ({type(exc.__cause__).__name__}); it stays queued "
            "and will be sent again automatically.",
        )
        session.commit()


def _check_step_limit(body: JobCreate, cfg: TrainingConfig, n_examples: int, limit: int) -> None:
    """A job asks for max_steps optimizer steps, or n_epochs passes of ceil(n_examples / batch_size) steps."""
    key = "max_steps" if cfg.max_steps is not None else "n_epochs"
    steps = cfg.total_steps(n_examples)
    if steps > limit:
        where = "hyperparameters" if body.hyperparameters is not None else "method.supervised.hyperparameters"
        raise bad_request(f"The job would train {steps} steps, more than this service's limit of {limit} (QLORA_MAX_STEPS_PER_JOB).",
                          param=f"{where}.{key}", code="invalid_value")


@router.post("", response_model=FineTuningJob, summary="Create a fine-tuning job", responses=error_responses(429))
def create_job(
    body: JobCreate, project: CurrentProject, session: SessionDep, settings: SettingsDep, celery_app: CeleryDep
) -> FineTuningJob:
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
    training = _usable_file(session, project, body.training_file, "training_file")
    if training.n_examples is not None and training.n_examples < MIN_EXAMPLES:
        raise bad_request(
            f"Training file has {training.n_examples} example(s), but must have at least {MIN_EXAMPLES} examples",
            param="training_file",
            code="invalid_n_examples",
        )
    if body.validation_file is not None:
        _usable_file(session, project, body.validation_file, "validation_file")
    if body.integrations:
        raise bad_request("Integrations are not supported by this service.", param="integrations", code="unsupported_parameter")
    # The project's row lock (PostgreSQL) orders concurrent creations of one project: without it two requests
    # could both count N-1 active jobs and both add one, passing the limit.
    session.execute(select(Project.name).where(Project.name == project).with_for_update())
    active = dict(session.execute(select(Job.status, func.count()).where(
        # The active statuses named (not "not terminal"): the (project, status) index then skips the project's history.
        Job.project == project, Job.status.in_([status.value for status in JobStatus if status not in TERMINAL])).group_by(Job.status)).all())
    if sum(active.values()) >= settings.max_active_jobs_per_project:
        raise quota_exceeded(f"This project has {sum(active.values())} queued or running jobs, the most it may have at once",
                             "QLORA_MAX_ACTIVE_JOBS_PER_PROJECT")
    queued = active.get(JobStatus.QUEUED.value, 0)
    if queued >= settings.max_queued_jobs_per_project:
        raise quota_exceeded(f"This project has {queued} queued jobs, the most it may have waiting at once",
                             "QLORA_MAX_QUEUED_JOBS_PER_PROJECT")
    seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED + 1)
    given, cfg = job_options(body, seed, base_config(model_dir))
    _check_step_limit(body, cfg, training.n_examples or 0, settings.max_steps_per_job)
    estimate = _memory_estimate(model_dir, cfg)

    # Files were validated at upload, so the job starts queued.
    job = Job(
        id=ids.job_id(),
        project=project,
        model=body.model,
        training_file=body.training_file,
        validation_file=body.validation_file,
        hyperparameters=given,
        training_config=cfg.resolved(),
        suffix=body.suffix,
        metadata_=body.metadata,
        integrations=body.integrations,
        status=JobStatus.QUEUED.value,
        result_files=[],
        memory_estimate=estimate.to_dict() if estimate is not None else None,
        created_at=now(),
        attempt=0,
    )
    session.add(job)
    session.flush()  # the events reference the job's row
    add_event(session, job.id, "info", f"Created fine-tuning job: {job.id}")
    if estimate is not None:
        _add_memory_estimate_event(session, job.id, estimate)
    session.commit()
    _enqueue(session, celery_app, settings, project, job.id)
    return FineTuningJob.from_row(job)


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
    where: list[Any] = [Job.project == project]
    if status is not None:
        where.append(Job.status == status.value)
    for name, value in request.query_params.multi_items():
        if name.startswith("metadata[") and name.endswith("]"):
            key = name.removeprefix("metadata[").removesuffix("]")
            if '"' in key or "\\" in key:  # would break the JSON path the database is asked for
                raise bad_request(f"Metadata filter keys cannot contain '\"' or '\\' (got {key[:64]!r}).", param=name, code="invalid_value")
            where.append(Job.metadata_[key].as_string() == value)
    after_seq = cursor_seq(session, Job.id, Job.seq, after, Job.project == project) if after else None
    rows, has_more = fetch_page(session, select(Job).where(*where), Job.seq, after_seq=after_seq, limit=limit, newest_first=True)
    return Page[FineTuningJob](data=[FineTuningJob.from_row(r) for r in rows], has_more=has_more)


@router.get("/{job_id}", response_model=FineTuningJob, summary="Retrieve a fine-tuning job", responses=error_responses(404))
def retrieve_job(job_id: str, project: CurrentProject, session: SessionDep) -> FineTuningJob:
    return FineTuningJob.from_row(get_job_row(session, project, job_id))


@router.post("/{job_id}/cancel", response_model=FineTuningJob, summary="Cancel a fine-tuning job", responses=error_responses(404))
def cancel(job_id: str, project: CurrentProject, session: SessionDep, celery_app: CeleryDep, settings: SettingsDep) -> FineTuningJob:
    """A queued job never starts; a running one stops at its worker's next heartbeat."""
    job = get_job_row(session, project, job_id)
    moved = cancel_job(session, job.id)
    session.commit()
    session.refresh(job)
    if not moved:
        raise bad_request(f"Job {job_id} is already {job.status} and cannot be cancelled.", param="job_id", code="invalid_job_status")
    try:  # its turn passes to the project's next job (a failure is left to the sweeper)
        dispatch(session, celery_app, settings, project)
    except DispatchError:
        logger.warning("could not dispatch project %s after a cancel", project, exc_info=True)
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
    where = [JobEvent.job_id == job.id]
    after_seq = cursor_seq(session, JobEvent.id, JobEvent.seq, after, *where) if after else None
    rows, has_more = fetch_page(session, select(JobEvent).where(*where), JobEvent.seq, after_seq=after_seq, limit=limit, newest_first=True)
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
    where = [Checkpoint.job_id == job.id]
    after_seq = cursor_seq(session, Checkpoint.id, Checkpoint.seq, after, *where) if after else None
    rows, has_more = fetch_page(
        session, select(Checkpoint).where(*where), Checkpoint.seq, after_seq=after_seq, limit=limit, newest_first=True
    )
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


# --- merged exports (extension) -------------------------------------------------------------------------------


def _export_conflict(message: str, code: str) -> APIError:
    return APIError(409, message, param="job_id", code=code)


@router.post("/{job_id}/export", response_model=FineTuningJobExport, summary="Export the merged model (extension)",
              responses=error_responses(404, 409, 429))
def create_export(
    job_id: str, project: CurrentProject, session: SessionDep, settings: SettingsDep, celery_app: CeleryDep
) -> FineTuningJobExport:
    """Queue a merge of the job's adapter into its 16-bit base model; the result is a `fine-tune-results` file.
    While an export of the job is queued or running, that one is returned instead of starting another."""
    job = get_job_row(session, project, job_id)
    if job.status != JobStatus.SUCCEEDED.value:
        raise _export_conflict(f"Job {job_id} is {job.status}; only a succeeded job's model can be exported.", "job_not_succeeded")
    # The job's row lock serializes two POSTs (one export, not two) and a concurrent DELETE of the model.
    if lock_live_model_job(session, job.id) is None:
        raise _export_conflict(f"The model of job {job_id} was deleted.", "model_deleted")
    active = session.scalar(select(Export).where(Export.job_id == job.id, Export.status.in_(ACTIVE)).order_by(Export.seq.desc()).limit(1))
    if active is not None:
        return FineTuningJobExport.from_row(active)
    base = find_base_model(settings, job.model)
    check_stored_bytes(session, settings, project, weights_bytes(base) if base is not None else 0, "a merged model of about ")
    export = Export(id=ids.export_id(), job_id=job.id, status=ExportStatus.QUEUED.value, created_at=now())
    session.add(export)
    add_event(session, job.id, "info", f"Merged export queued: {export.id}")
    session.commit()
    try:
        send_export_task(celery_app, settings, export.id)
    except Exception as exc:  # committed: the sweeper sends it again
        logger.warning("could not send the export task of %s", export.id, exc_info=exc)
        add_event(session, job.id, "warn", f"Export {export.id} could not be sent to the training queue ({type(exc).__name__}); "
                  "it stays queued and will be sent again automatically.")
    else:
        mark_export_enqueued(session, export.id)
    session.commit()
    return FineTuningJobExport.from_row(export)


@router.get("/{job_id}/exports", response_model=Page[FineTuningJobExport], summary="List a job's merged exports (extension)",
             responses=error_responses(404))
def list_exports(
    job_id: str,
    project: CurrentProject,
    session: SessionDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> Page[FineTuningJobExport]:
    """Newest first."""
    job = get_job_row(session, project, job_id)
    where = [Export.job_id == job.id]
    after_seq = cursor_seq(session, Export.id, Export.seq, after, *where) if after else None
    rows, has_more = fetch_page(session, select(Export).where(*where), Export.seq, after_seq=after_seq, limit=limit, newest_first=True)
    return Page[FineTuningJobExport](data=[FineTuningJobExport.from_row(r) for r in rows], has_more=has_more)


@router.get("/{job_id}/exports/{export_id}", response_model=FineTuningJobExport, summary="Retrieve a merged export (extension)",
             responses=error_responses(404))
def retrieve_export(job_id: str, export_id: str, project: CurrentProject, session: SessionDep) -> FineTuningJobExport:
    job = get_job_row(session, project, job_id)
    export = session.scalar(select(Export).where(Export.id == export_id, Export.job_id == job.id))
    if export is None:
        raise not_found(f"No such export: {export_id}", param="export_id", code="export_not_found")
    return FineTuningJobExport.from_row(export)
