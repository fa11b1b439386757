"""Creating a fine-tuning job: the rules between a validated request and a queued row, for the API's thin route.

    create_job: the files (the project's, for fine-tuning, validated) -> the project's lock and job quotas
    (core/quotas.py) -> the options (resolved by the caller's `resolve`) -> the step limit -> the row and its first
    events, committed -> the project's next jobs sent (core/dispatch.py; this one if its turn has come)

The API owns the wire: it parses the body, finds the base model and resolves OpenAI's hyperparameters into a
`TrainingConfig` (api/hyperparameters.py); errors here are `JobRequestError` (the API's 400 envelope) or
`core.quotas.QuotaExceeded` (429).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from contract.data_format import MIN_EXAMPLES
from contract.memory import GIB, MemoryEstimate
from contract.options import TrainingConfig
from core import ids
from core.dispatch import DispatchError, dispatch
from core.jobs import JobStatus, add_event
from core.quotas import check_job_slots, lock_project
from core.settings import Settings
from core.tables import File, Job, file_is_live, now

log = logging.getLogger(__name__)


class JobRequestError(Exception):
    """A job request the service refuses (the API answers 400 with `param` and `code`)."""

    def __init__(self, message: str, *, param: str | None, code: str):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


@dataclass(frozen=True)
class NewJob:
    """A create-job request as the API parsed it."""

    model: str
    method: str  # method.type: "supervised" or "dpo", which decides the kind of file the job trains on
    training_file: str
    validation_file: str | None
    suffix: str | None
    metadata: dict[str, Any] | None
    integrations: list[Any] | None
    # The estimated peak GPU memory of the resolved options (None: the base's config cannot be estimated).
    estimate: Callable[[TrainingConfig], MemoryEstimate | None]
    # Resolves the options: (the hyperparameters object as given, its TrainingConfig); raises the API's own 400.
    resolve: Callable[[], tuple[dict[str, Any], TrainingConfig]]
    # Where the hyperparameters were given ("hyperparameters" or "method.supervised.hyperparameters"), for errors.
    options_param: str


def usable_file(session: Session, project: str, file_id: str, param: str) -> File:
    """A file of the caller's project, uploaded for fine-tuning, that passed validation."""
    row = session.scalar(select(File).where(File.id == file_id, File.project == project, file_is_live()))
    if row is None:
        raise JobRequestError(f"No such file: {file_id}", param=param, code="file_not_found")
    if row.purpose != "fine-tune":
        raise JobRequestError(f"File {file_id} has purpose {row.purpose!r}; a job needs a file uploaded with purpose 'fine-tune'.",
                              param=param, code="invalid_file_purpose")
    if row.status == "error":
        raise JobRequestError(f"File {file_id} failed validation: {row.status_details}", param=param, code="invalid_file_status")
    if row.status != "processed":
        raise JobRequestError(f"File {file_id} is not processed yet (status {row.status!r}).", param=param, code="invalid_file_status")
    return row


def check_step_limit(cfg: TrainingConfig, n_examples: int, limit: int, options_param: str) -> None:
    """A job asks for max_steps optimizer steps, or n_epochs passes of ceil(n_examples / batch_size) steps."""
    key = "max_steps" if cfg.max_steps is not None else "n_epochs"
    steps = cfg.total_steps(n_examples)
    if steps > limit:
        raise JobRequestError(f"The job would train {steps} steps, more than this service's limit of {limit} (QLORA_MAX_STEPS_PER_JOB).",
                              param=f"{options_param}.{key}", code="invalid_value")


def check_file_kind(row: File, method: str, param: str) -> None:
    """A dpo job trains on preference pairs, a supervised one on examples (the kind the upload found)."""
    kind = row.kind or "supervised"  # rows from before files.kind hold examples: pairs failed validation then
    wanted = "preference" if method == "dpo" else "supervised"
    if kind != wanted:
        found = "preference pairs" if kind == "preference" else "supervised examples"
        needs = "preference pairs ({input, preferred_output, non_preferred_output})" if wanted == "preference" else "supervised examples"
        raise JobRequestError(f"File {row.id} holds {found}, but a {method!r} job needs {needs}.", param=param, code="invalid_file_format")


def create_job(session: Session, celery_app: Any, settings: Settings, project: str, request: NewJob) -> Job:
    """Check `request` against the project's files and limits, store the job (queued: its files were validated at
    upload) with its first events, commit, and send the project's next jobs. Returns the row."""
    training = usable_file(session, project, request.training_file, "training_file")
    if training.n_examples is not None and training.n_examples < MIN_EXAMPLES:
        raise JobRequestError(f"Training file has {training.n_examples} example(s), but must have at least {MIN_EXAMPLES} examples",
                              param="training_file", code="invalid_n_examples")
    check_file_kind(training, request.method, "training_file")
    if request.validation_file is not None:
        check_file_kind(usable_file(session, project, request.validation_file, "validation_file"), request.method, "validation_file")
    if request.integrations:
        raise JobRequestError("Integrations are not supported by this service.", param="integrations", code="unsupported_parameter")
    lock_project(session, project)  # orders concurrent creations of one project from the count to the commit
    check_job_slots(session, settings, project)
    given, cfg = request.resolve()
    check_step_limit(cfg, training.n_examples or 0, settings.max_steps_per_job, request.options_param)

    job = Job(id=ids.job_id(), project=project, model=request.model, training_file=request.training_file,
              validation_file=request.validation_file, hyperparameters=given, training_config=cfg.resolved(),
              suffix=request.suffix, metadata_=request.metadata, integrations=request.integrations,
              status=JobStatus.QUEUED.value, result_files=[], created_at=now(), attempt=0,
              memory_estimate=estimate.to_dict() if (estimate := request.estimate(cfg)) is not None else None)
    session.add(job)
    session.flush()  # the events reference the job's row
    add_event(session, job.id, "info", f"Created fine-tuning job: {job.id}")
    if estimate is not None:  # as a person reads it in the job's events (the job object carries the numbers)
        checkpointing = "on" if estimate.gradient_checkpointing else "off"
        host = f", {estimate.host_activations / GIB:.2f} GiB of host memory for offloaded layers" if estimate.host_activations else ""
        add_event(session, job.id, "info",
                  f"Estimated peak GPU memory: {estimate.total / GIB:.2f} GiB (gradient checkpointing {checkpointing}{host})",
                  data=estimate.to_dict())
    session.commit()
    _enqueue(session, celery_app, settings, project, job.id)
    return job


def _enqueue(session: Session, celery_app: Any, settings: Settings, project: str, job_id: str) -> None:
    """Send the project's next jobs, this one if its turn has come (core/dispatch.py: the others wait unsent)."""
    try:
        for sent in dispatch(session, celery_app, settings, project):
            log.info("job %s sent to the training queue %s", sent, settings.task_queue)
    except DispatchError as exc:  # the job is committed: the sweeper sends it later
        log.warning("could not send the training task of %s", job_id, exc_info=exc)
        # Only the exception's type in the event: its text may hold the broker URL and its password.
        add_event(session, job_id, "warn", f"The job could not be sent to the training queue ({type(exc.__cause__).__name__}); "
                  "it stays queued and will be sent again automatically.")
        session.commit()
