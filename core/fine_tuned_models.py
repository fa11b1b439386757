"""The fine-tuned models a project may use: to chat with (api/routes/chat.py) and to continue training from (a job
whose `model` is one of them, core/job_service.py and the worker's claim).

    find_usable_adapter(session, project, name) -> UsableAdapter | None

A project may use its own fine-tuned models (succeeded jobs), the checkpoint models of its own jobs, and the
checkpoint models other projects granted it (checkpoint permissions), in every case only while the job's model is
not deleted. Every use reads the rows again, so a revoke or a deletion ends it at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from core.jobs import JobStatus
from core.model_names import adapter_filename
from core.tables import Checkpoint, CheckpointPermission, File, Job

# The options that fix an adapter's shape and the base it was trained against: a job that continues from a
# fine-tuned model trains a copy of its adapter, so it takes these from the source job (a request that names a
# different value is refused, docs/training.md "Continuing from a fine-tuned model").
ADAPTER_OPTIONS = ("lora_r", "lora_alpha", "target_modules", "use_rslora", "use_dora",
                   "quantization", "quant_type", "double_quant", "hqq_bits", "hqq_group_size")


@dataclass(frozen=True)
class UsableAdapter:
    """A fine-tuned or checkpoint model a project may use: its name, the base it was trained on, its adapter archive
    (the object-storage key) and the job that trained it."""

    name: str
    base_model: str
    storage_key: str
    job_id: str
    project: str  # the owning project (another one's for a granted checkpoint)
    training_config: dict[str, Any]
    step: int | None  # a checkpoint model's step; None for a job's final model

    def adapter_options(self) -> dict[str, Any]:
        """The source job's values of ADAPTER_OPTIONS (those its stored config has)."""
        return {name: self.training_config[name] for name in ADAPTER_OPTIONS if name in self.training_config}


def find_usable_adapter(session: Session, project: str, name: str) -> UsableAdapter | None:
    """The fine-tuned model `name` of `project` (its job succeeded and the model is not deleted), or the checkpoint
    model `name` of one of its jobs or granted to it, whose job's model is not deleted; None for anything else."""
    if not name.startswith("ft:"):
        return None
    job = session.scalar(select(Job).where(Job.project == project, Job.fine_tuned_model == name,
                                           Job.status == JobStatus.SUCCEEDED.value, Job.model_deleted_at.is_(None)))
    if job is not None:
        key = session.scalar(select(File.storage_key).where(File.id.in_(list(job.result_files or [])),
                                                             File.filename == adapter_filename(job.id)))
        if key is not None:
            return UsableAdapter(name, job.trained_base, key, job.id, job.project, dict(job.training_config), None)
    granted = select(CheckpointPermission.id).where(CheckpointPermission.checkpoint_id == Checkpoint.id,
                                                    CheckpointPermission.project == project).exists()
    row = session.execute(select(Checkpoint, Job).join(Job, Checkpoint.job_id == Job.id).where(
        Checkpoint.fine_tuned_model_checkpoint == name, or_(Job.project == project, granted), Job.model_deleted_at.is_(None))).first()
    if row is None:
        return None
    checkpoint, job = row
    return UsableAdapter(name, job.trained_base, checkpoint.storage_key, job.id, job.project, dict(job.training_config), checkpoint.step)
