"""/v1/fine_tuning/checkpoints/{checkpoint}/permissions: share a checkpoint model with other projects (OpenAI's
checkpoint permissions).

Only the project that trained the checkpoint manages its permissions (OpenAI asks for an admin key; here the owner's
key is that). A granted project may chat with the checkpoint model (api/routes/chat.py) for as long as the
permission exists and the job's model is not deleted; both are read on every request, so a revoke or a deletion
ends the access at once. The checkpoint is named by its model name (`ft:...:ckpt-step-N`), which the SDK puts into
the path with its colons unescaped.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.deps import CurrentProject, SessionDep, SettingsDep
from api.errors import bad_request, not_found
from api.openapi import error_responses
from api.pagination import fetch_page_after
from api.schemas import CheckpointPermissionDeleted, CheckpointPermissionObject, CursorPage, Page, PermissionCreate, first_unstorable
from core import ids
from core.tables import Checkpoint, CheckpointPermission, Job, now

router = APIRouter(prefix="/fine_tuning/checkpoints/{fine_tuned_model_checkpoint}/permissions", tags=["fine-tuning"])


def owned_checkpoint(session: Session, project: str, name: str) -> Checkpoint:
    """The checkpoint model `name` of one of `project`'s jobs whose model is not deleted; else 404."""
    checkpoint = session.scalar(select(Checkpoint).join(Job, Checkpoint.job_id == Job.id).where(
        Checkpoint.fine_tuned_model_checkpoint == name, Job.project == project, Job.model_deleted_at.is_(None)))
    if checkpoint is None:
        raise not_found(f"No such checkpoint model: {name}", param="fine_tuned_model_checkpoint", code="model_not_found")
    return checkpoint


@router.post("", response_model=Page[CheckpointPermissionObject], summary="Share a checkpoint model with projects",
             responses=error_responses(404))
def create_permissions(fine_tuned_model_checkpoint: str, body: PermissionCreate, project: CurrentProject, session: SessionDep,
                       settings: SettingsDep) -> Page[CheckpointPermissionObject]:
    checkpoint = owned_checkpoint(session, project, fine_tuned_model_checkpoint)
    known = set(settings.api_key_map().values())
    for index, granted in enumerate(body.project_ids):
        if first_unstorable(granted) or granted not in known:
            raise bad_request(f"No such project: {granted!r}.", param=f"project_ids[{index}]", code="invalid_value")
        if granted == project:
            raise bad_request("A project cannot be granted its own checkpoint.", param=f"project_ids[{index}]", code="invalid_value")
    try:
        rows = _grant(session, checkpoint.id, body.project_ids)
    except IntegrityError:  # the same grant committed meanwhile by a concurrent request: it is there now
        session.rollback()
        rows = _grant(session, checkpoint.id, body.project_ids)
    return Page[CheckpointPermissionObject](data=[CheckpointPermissionObject.from_row(row) for row in rows], has_more=False)


def _grant(session: Session, checkpoint_id: str, projects: list[str]) -> list[CheckpointPermission]:
    """The permissions of `projects` on the checkpoint, made where missing (a grant given twice is the same one)."""
    existing = {row.project: row for row in session.scalars(select(CheckpointPermission).where(
        CheckpointPermission.checkpoint_id == checkpoint_id, CheckpointPermission.project.in_(projects)))}
    rows = [existing.get(project) or CheckpointPermission(id=ids.checkpoint_permission_id(), checkpoint_id=checkpoint_id,
                                                          project=project, created_at=now()) for project in dict.fromkeys(projects)]
    session.add_all(rows)
    session.commit()
    return rows


@router.get("", response_model=CursorPage[CheckpointPermissionObject], summary="List a checkpoint model's permissions",
            responses=error_responses(404))
def list_permissions(
    fine_tuned_model_checkpoint: str,
    project: CurrentProject,
    session: SessionDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
    order: Literal["ascending", "descending"] = "descending",
    project_id: str | None = None,
) -> CursorPage[CheckpointPermissionObject]:
    checkpoint = owned_checkpoint(session, project, fine_tuned_model_checkpoint)
    where = [CheckpointPermission.checkpoint_id == checkpoint.id]
    if project_id is not None:
        where.append(CheckpointPermission.project == project_id)
    rows, has_more = fetch_page_after(session, CheckpointPermission, where, after=after, limit=limit, newest_first=order == "descending")
    return CursorPage[CheckpointPermissionObject].of([CheckpointPermissionObject.from_row(row) for row in rows], has_more)


@router.delete("/{permission_id}", response_model=CheckpointPermissionDeleted, summary="Revoke a checkpoint model's permission",
               responses=error_responses(404))
def delete_permission(fine_tuned_model_checkpoint: str, permission_id: str, project: CurrentProject,
                      session: SessionDep) -> CheckpointPermissionDeleted:
    checkpoint = owned_checkpoint(session, project, fine_tuned_model_checkpoint)
    row = session.scalar(select(CheckpointPermission).where(CheckpointPermission.id == permission_id,
                                                            CheckpointPermission.checkpoint_id == checkpoint.id))
    if row is None:
        raise not_found(f"No such permission: {permission_id}", param="permission_id", code="permission_not_found")
    session.delete(row)
    session.commit()
    return CheckpointPermissionDeleted(id=permission_id, deleted=True)
