"""/v1/models: the base models the service can train (directories under `settings.models_dir`) and the caller's
fine-tuned models (those of its succeeded jobs)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from sqlalchemy import Select, select

from api.base_models import find_base_model, list_base_models
from api.deps import CurrentProject, SessionDep, SettingsDep
from api.errors import not_found
from api.schemas import Model, Page
from core.jobs import JobStatus
from core.models import Job

router = APIRouter(prefix="/models", tags=["models"])


def _base_model(path: Path) -> Model:
    return Model(id=path.name, created=int(path.stat().st_mtime), owned_by="system")


def _fine_tuned_model(job: Job) -> Model:
    assert job.fine_tuned_model is not None
    return Model(id=job.fine_tuned_model, created=job.finished_at or job.created_at, owned_by=job.project)


def _fine_tuned_jobs(project: str) -> Select[tuple[Job]]:
    return select(Job).where(Job.project == project, Job.status == JobStatus.SUCCEEDED.value, Job.fine_tuned_model.is_not(None))


@router.get("", response_model=Page[Model], summary="List models")
def list_models(project: CurrentProject, session: SessionDep, settings: SettingsDep) -> Page[Model]:
    base = [_base_model(path) for path in list_base_models(settings)]
    fine_tuned = [_fine_tuned_model(job) for job in session.scalars(_fine_tuned_jobs(project).order_by(Job.seq))]
    return Page[Model](data=base + fine_tuned, has_more=False)


@router.get("/{model_id:path}", response_model=Model, summary="Retrieve a model")
def retrieve_model(model_id: str, project: CurrentProject, session: SessionDep, settings: SettingsDep) -> Model:
    path = find_base_model(settings, model_id)
    if path is not None:
        return _base_model(path)
    job = session.scalar(_fine_tuned_jobs(project).where(Job.fine_tuned_model == model_id))
    if job is None:
        raise not_found(f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
    return _fine_tuned_model(job)
