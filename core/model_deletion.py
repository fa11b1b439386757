"""Deleting a fine-tuned model (DELETE /v1/models/{model}): the job's row lock that orders a deletion against an
export's commit, and the removal of every row that holds the model's weights."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from core.model_names import adapter_filename
from core.tables import Checkpoint, Export, File, Job, now


def lock_live_model_job(session: Session, job_id: str) -> Job | None:
    """The job, row-locked, if its model is not deleted. The model's deletion and an export's commit both take
    this lock first, so one lands wholly before the other."""
    return session.execute(
        select(Job).where(Job.id == job_id, Job.model_deleted_at.is_(None)).with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()


@dataclass
class DeletedModel:
    """What deleting a fine-tuned model removed: row changes are committed by the caller, then `object_keys` deleted."""

    file_ids: list[str] = field(default_factory=list)
    checkpoint_ids: list[str] = field(default_factory=list)
    export_ids: list[str] = field(default_factory=list)
    object_keys: list[str] = field(default_factory=list)
    # The model and checkpoint-model names an inference backend may hold, each with its adapter archive's key (the
    # backend deletes its unpacked copy by key, attached or not).
    served_models: dict[str, str | None] = field(default_factory=dict)


def delete_model_rows(session: Session, job: Job) -> DeletedModel:
    """Mark `job`'s model deleted and remove the rows of everything that holds its weights: the adapter result
    file, the checkpoints, the exports and their merged files. The metrics CSV stays (it holds no weights) and so
    does the job. The caller holds the job's row lock (`lock_live_model_job`) and commits before deleting the
    objects, so a failed object delete leaves an orphaned object, never a row pointing at nothing."""
    gone = DeletedModel()
    exports = list(session.execute(select(Export).where(Export.job_id == job.id)).scalars())
    gone.export_ids = [e.id for e in exports]
    weight_files = [f for f in session.execute(select(File).where(File.id.in_(list(job.result_files or [])))).scalars()
                    if f.filename == adapter_filename(job.id)]
    weight_files += list(session.execute(
        select(File).where(File.id.in_([e.file_id for e in exports if e.file_id]))).scalars())
    gone.file_ids = [f.id for f in weight_files]
    checkpoints = list(session.execute(select(Checkpoint).where(Checkpoint.job_id == job.id)).scalars())
    gone.checkpoint_ids = [c.id for c in checkpoints]
    gone.object_keys = [f.storage_key for f in weight_files] + [c.storage_key for c in checkpoints]
    adapter_key = next((f.storage_key for f in weight_files if f.filename == adapter_filename(job.id)), None)
    gone.served_models = {job.fine_tuned_model or "": adapter_key} | {c.fine_tuned_model_checkpoint: c.storage_key for c in checkpoints}

    session.execute(delete(Export).where(Export.job_id == job.id))
    session.execute(delete(Checkpoint).where(Checkpoint.job_id == job.id))
    if gone.file_ids:
        session.execute(delete(File).where(File.id.in_(gone.file_ids)))
    job.result_files = [file_id for file_id in (job.result_files or []) if file_id not in gone.file_ids]
    job.model_deleted_at = now()
    return gone
