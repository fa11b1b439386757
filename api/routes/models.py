"""/v1/models: the base models the service can train (directories under `settings.models_dir`), the caller's
fine-tuned models (those of its succeeded jobs whose model was not deleted) and the checkpoint models other projects
granted it (checkpoint permissions, while the grant exists and the owner's model is not deleted; `owned_by` is the
owning project, as OpenAI's is the owning organization); DELETE removes a fine-tuned model of the caller's own.
A base model says how its directory is stored (`quantization`, our extension: GPTQ/AWQ as read from config.json)."""

from __future__ import annotations

from pathlib import Path

import anyio
from fastapi import APIRouter, Request
from sqlalchemy import Select, select

from api.deps import CurrentProject, SessionDep, SettingsDep, StorageDep
from api.errors import APIError, not_found
from api.model_dirs import find_base_model, list_base_models, stored_quantization
from api.openapi import error_responses
from api.schemas import Model, ModelDeleted, ModelQuantization, Page
from core.jobs import JobStatus
from core.model_deletion import delete_model_rows, lock_live_model_job
from core.storage import delete_quietly
from core.tables import Checkpoint, CheckpointPermission, Job

router = APIRouter(prefix="/models", tags=["models"])


def _base_model(path: Path) -> Model:
    quantization = stored_quantization(path)
    return Model(id=path.name, created=int(path.stat().st_mtime), owned_by="system",
                 quantization=ModelQuantization(**quantization) if quantization is not None else None)


def _fine_tuned_model(job: Job) -> Model:
    assert job.fine_tuned_model is not None
    return Model(id=job.fine_tuned_model, created=job.finished_at or job.created_at, owned_by=job.project, parent=job.model)


def _fine_tuned_jobs(project: str) -> Select[tuple[Job]]:
    """The project's jobs whose fine-tuned model exists: succeeded, and not deleted."""
    return select(Job).where(Job.project == project, Job.status == JobStatus.SUCCEEDED.value, Job.fine_tuned_model.is_not(None),
                             Job.model_deleted_at.is_(None))


def _granted_checkpoints(project: str) -> Select[tuple[Checkpoint, Job]]:
    """The checkpoint models granted to `project` (by their owners, api/routes/checkpoint_permissions.py) whose
    job's model is not deleted, in the order they were granted: the same rule as chat's (api/routes/chat.py)."""
    return (select(Checkpoint, Job).join(Job, Checkpoint.job_id == Job.id)
            .join(CheckpointPermission, CheckpointPermission.checkpoint_id == Checkpoint.id)
            .where(CheckpointPermission.project == project, Job.model_deleted_at.is_(None))
            .order_by(CheckpointPermission.seq))


def _granted_model(checkpoint: Checkpoint, job: Job) -> Model:
    return Model(id=checkpoint.fine_tuned_model_checkpoint, created=checkpoint.created_at, owned_by=job.project, parent=job.model)


def _model_not_found(model_id: str) -> APIError:
    return not_found(f"The model '{model_id}' does not exist.", param="model", code="model_not_found")


@router.get("", response_model=Page[Model], summary="List models")
def list_models(project: CurrentProject, session: SessionDep, settings: SettingsDep) -> Page[Model]:
    base = [_base_model(path) for path in list_base_models(settings)]
    fine_tuned = [_fine_tuned_model(job) for job in session.scalars(_fine_tuned_jobs(project).order_by(Job.seq))]
    granted = [_granted_model(checkpoint, job) for checkpoint, job in session.execute(_granted_checkpoints(project))]
    return Page[Model](data=base + fine_tuned + granted, has_more=False)


@router.get("/{model_id:path}", response_model=Model, summary="Retrieve a model", responses=error_responses(404))
def retrieve_model(model_id: str, project: CurrentProject, session: SessionDep, settings: SettingsDep) -> Model:
    path = find_base_model(settings, model_id)
    if path is not None:
        return _base_model(path)
    job = session.scalar(_fine_tuned_jobs(project).where(Job.fine_tuned_model == model_id))
    if job is not None:
        return _fine_tuned_model(job)
    granted = session.execute(_granted_checkpoints(project).where(Checkpoint.fine_tuned_model_checkpoint == model_id)).first()
    if granted is None:
        raise _model_not_found(model_id)
    return _granted_model(*granted)


@router.delete("/{model_id:path}", response_model=ModelDeleted, summary="Delete a fine-tuned model",
                responses=error_responses(403, 404))
def delete_model(model_id: str, project: CurrentProject, session: SessionDep, settings: SettingsDep,
                 storage: StorageDep, request: Request) -> ModelDeleted:
    """The job stays (with its `fine_tuned_model` and metrics CSV); the adapter result file, the checkpoints and the
    merged exports go: their rows first (committed), then their objects."""
    if find_base_model(settings, model_id) is not None:
        raise APIError(403, f"The model '{model_id}' is a base model of this service; only fine-tuned models can be deleted.",
                       param="model", code="cannot_delete_base_model")
    found = session.scalar(_fine_tuned_jobs(project).where(Job.fine_tuned_model == model_id))
    job = lock_live_model_job(session, found.id) if found is not None else None
    if job is None:
        raise _model_not_found(model_id)
    gone = delete_model_rows(session, job)
    session.commit()
    delete_quietly(storage, *gone.object_keys)
    for name, key in gone.served_models.items():  # the backend drops its copies (the API already refuses the names)
        anyio.from_thread.run(request.app.state.inference.unload, name, key)
    return ModelDeleted(id=model_id, deleted=True)
