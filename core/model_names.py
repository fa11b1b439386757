"""The names of a fine-tuned model and of the files that hold its weights: the model the API serves
(`ft:BASE:ORG:SUFFIX:ID`), its checkpoints' models, the adapter result file and the merged export file."""

from __future__ import annotations


def fine_tuned_model_name(model: str, project: str, suffix: str | None, job_id: str) -> str:
    """OpenAI's shape `ft:BASE:ORG:SUFFIX:ID` (ID is the job id without its prefix)."""
    return f"ft:{model}:{project}:{suffix or ''}:{job_id.removeprefix('ftjob-')}"


def checkpoint_model_name(fine_tuned_model: str, step: int) -> str:
    return f"{fine_tuned_model}:ckpt-step-{step}"


def adapter_filename(job_id: str) -> str:
    return f"{job_id}-adapter.tar.gz"


def merged_filename(job_id: str) -> str:
    return f"{job_id}-merged.tar.gz"
