"""/v1/fine_tuning/jobs/{job_id}/export(s): merged exports of a succeeded job's model (our extension).

An export is committed first (reserving its merged size against the project's stored bytes, core/quotas.py) and its
task sent after, at its project's turn on the training queue (core/dispatch.py); the worker is worker/export.py.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import select

from api.deps import CeleryDep, CurrentProject, SessionDep, SettingsDep
from api.errors import APIError, bad_request, not_found
from api.model_dirs import find_base_model, stored_quantization, weights_bytes
from api.openapi import error_responses
from api.pagination import fetch_page_after
from api.routes.jobs import get_job_row
from api.schemas import FineTuningJobExport, Page
from core import ids
from core.dispatch import DispatchError, dispatch
from core.exports import ACTIVE, ExportStatus
from core.jobs import JobStatus, add_event
from core.model_deletion import lock_live_model_job
from core.quotas import check_stored_bytes, lock_project
from core.tables import Export, now

logger = logging.getLogger("api")

router = APIRouter(prefix="/fine_tuning/jobs", tags=["fine-tuning"])



def _export_conflict(message: str, code: str) -> APIError:
    return APIError(409, message, param="job_id", code=code)


@router.post("/{job_id}/export", response_model=FineTuningJobExport, summary="Export the merged model (extension)",
              responses=error_responses(404, 409, 429))
def create_export(
    job_id: str, project: CurrentProject, session: SessionDep, settings: SettingsDep, celery_app: CeleryDep
) -> FineTuningJobExport:
    """Queue a merge of the job's adapter into its 16-bit base model; the result is a `fine-tune-results` file.
    While an export of the job is queued or running, that one is returned instead of starting another. The merged
    model's estimated size is reserved against the project's stored bytes until the export ends, and the export
    takes its turn on the training queue like the project's jobs. Bases stored pre-quantized (GPTQ/AWQ) are refused."""
    job = get_job_row(session, project, job_id)
    if job.status != JobStatus.SUCCEEDED.value:
        raise _export_conflict(f"Job {job_id} is {job.status}; only a succeeded job's model can be exported.", "job_not_succeeded")
    # The job's row lock serializes two POSTs (one export, not two) and a concurrent DELETE of the model.
    if lock_live_model_job(session, job.id) is None:
        raise _export_conflict(f"The model of job {job_id} was deleted.", "model_deleted")
    active = session.scalar(select(Export).where(Export.job_id == job.id, Export.status.in_(ACTIVE)).order_by(Export.seq.desc()).limit(1))
    if active is not None:
        return FineTuningJobExport.from_row(active)
    base = find_base_model(settings, job.trained_base)
    if base is not None and (quantized := stored_quantization(base)) is not None:
        # Its weight files are 4-bit: there is no 16-bit weight to merge the adapter into, and their size says nothing
        # of a merged copy's.
        raise bad_request(f"Job {job_id} trained on {job.trained_base}, a base stored pre-quantized ({quantized['method']}); merged "
                          "exports need a 16-bit base and are not supported for it. Serve the job's adapter with that base "
                          "instead (its fine-tuned model, or the adapter result file).", param="job_id", code="unsupported_model")
    size = weights_bytes(base) if base is not None else 0
    lock_project(session, project)  # after the job's lock, as the worker's commit takes them: one order, no deadlock
    check_stored_bytes(session, settings, project, size, "a merged model of about ")
    export = Export(id=ids.export_id(), job_id=job.id, status=ExportStatus.QUEUED.value, created_at=now(), reserved_bytes=size)
    session.add(export)
    add_event(session, job.id, "info", f"Merged export queued: {export.id}")
    session.commit()
    try:  # sent now if the project's share of the training queue has room (core/dispatch.py), else at its turn
        dispatch(session, celery_app, settings, project)
    except DispatchError as exc:  # committed: the sweeper sends it later
        logger.warning("could not send the export task of %s", export.id, exc_info=exc)
        add_event(session, job.id, "warn", f"Export {export.id} could not be sent to the training queue "
                  f"({type(exc.__cause__).__name__}); it stays queued and will be sent again automatically.")
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
    rows, has_more = fetch_page_after(session, Export, where, after=after, limit=limit, newest_first=True)
    return Page[FineTuningJobExport](data=[FineTuningJobExport.from_row(r) for r in rows], has_more=has_more)


@router.get("/{job_id}/exports/{export_id}", response_model=FineTuningJobExport, summary="Retrieve a merged export (extension)",
             responses=error_responses(404))
def retrieve_export(job_id: str, export_id: str, project: CurrentProject, session: SessionDep) -> FineTuningJobExport:
    job = get_job_row(session, project, job_id)
    export = session.scalar(select(Export).where(Export.id == export_id, Export.job_id == job.id))
    if export is None:
        raise not_found(f"No such export: {export_id}", param="export_id", code="export_not_found")
    return FineTuningJobExport.from_row(export)
