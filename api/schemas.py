"""OpenAI's objects on the wire (docs/api-contract.md) and the create-job body.

Every field the contract lists is present on every response: nullable ones are sent as null, never left out.
The `from_row` constructors are the one place that turns a database row into its wire shape.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from contract.hyperparameters import Hyperparameters, method_object, wire_hyperparameters
from contract.metrics import finite_floats
from contract.options import METHODS
from core.tables import (
    Checkpoint,
    CheckpointPermission,
    Export,
    File,
    Job,
    JobEvent,
    Upload,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    now,
)

T = TypeVar("T")

MAX_SEED = 2147483647
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512


# --- lists ------------------------------------------------------------------------------------------------------


class Page(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool


class CursorPage(Page[T], Generic[T]):
    """Files and checkpoints also name the first and last item of the page."""

    first_id: str | None
    last_id: str | None

    @classmethod
    def of(cls, data: list[Any], has_more: bool) -> CursorPage[Any]:
        return cls(data=data, has_more=has_more, first_id=data[0].id if data else None, last_id=data[-1].id if data else None)


# --- files --------------------------------------------------------------------------------------------------------


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"]
    expires_at: int | None
    status_details: str | None
    sha256: str = Field(description="Our extension: SHA-256 of the content, hex.")

    @classmethod
    def from_row(cls, row: File) -> FileObject:
        return cls(
            id=row.id,
            bytes=row.bytes,
            created_at=row.created_at,
            filename=row.filename,
            purpose=row.purpose,
            status=row.status,
            expires_at=row.expires_at,
            status_details=row.status_details,
            sha256=row.sha256,
        )


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


# --- fine-tuning jobs -----------------------------------------------------------------------------------------

# OpenAI's list of job statuses, kept whole for its SDK; this service never reports "validating_files" (uploads are
# validated before the upload returns, so a job starts "queued": core.jobs.JobStatus).
JobStatusName = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled", "paused"]


class JobError(BaseModel):
    code: str
    message: str
    param: str | None


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    model: str
    organization_id: str
    status: JobStatusName
    training_file: str
    validation_file: str | None
    hyperparameters: dict[str, Any] = Field(description="n_epochs, batch_size, learning_rate_multiplier and every engine option, resolved.")
    method: dict[str, Any] | None
    result_files: list[str]
    seed: int
    error: JobError | None
    fine_tuned_model: str | None
    finished_at: int | None
    trained_tokens: int | None
    estimated_finish: int | None
    total_steps: int | None = Field(description="Extension: the optimizer steps the job trains in all; null until a worker has loaded the model.")
    memory_estimate: dict[str, Any] | None = Field(
        description="Extension: the estimated peak GPU memory in bytes, by part (`total`, `base_weights`, ...), made when the job was created; "
                    "null when the base model's config.json allows no estimate.")
    integrations: list[Any] | None
    metadata: dict[str, str] | None
    user_provided_suffix: str | None = Field(description="The suffix the job was created with (OpenAI sends it too).")

    @classmethod
    def from_row(cls, row: Job) -> FineTuningJob:
        hyperparameters = wire_hyperparameters(row.hyperparameters, row.training_config)
        return cls(
            id=row.id,
            created_at=row.created_at,
            model=row.model,
            organization_id=row.project,
            status=row.status,
            training_file=row.training_file,
            validation_file=row.validation_file,
            hyperparameters=hyperparameters,
            method=method_object(row.training_config["method"], hyperparameters),
            result_files=list(row.result_files or []),
            seed=row.training_config["seed"],
            error=JobError(**row.error) if row.error else None,
            fine_tuned_model=row.fine_tuned_model,
            finished_at=row.finished_at,
            trained_tokens=row.trained_tokens,
            estimated_finish=row.estimated_finish if row.status == "running" else None,  # an estimate only while it runs
            total_steps=row.total_steps,
            memory_estimate=row.memory_estimate,
            integrations=row.integrations,
            metadata=row.metadata_,
            user_provided_suffix=row.suffix,
        )


class FineTuningJobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] | None

    @classmethod
    def from_row(cls, row: JobEvent) -> FineTuningJobEvent:
        return cls(id=row.id, created_at=row.created_at, level=row.level, message=row.message, type=row.type, data=row.data)


class FineTuningJobCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, float]

    @classmethod
    def from_row(cls, row: Checkpoint) -> FineTuningJobCheckpoint:
        return cls(
            id=row.id,
            created_at=row.created_at,
            fine_tuned_model_checkpoint=row.fine_tuned_model_checkpoint,
            fine_tuning_job_id=row.job_id,
            step_number=row.step,
            metrics=checkpoint_wire_metrics(row.metrics or {}),
        )


def checkpoint_wire_metrics(stored: dict[str, Any]) -> dict[str, float]:
    """Floats only, as the SDK's type says: a missing (null) or non-finite metric is left out. The engine's evaluation
    always runs over the whole validation file, so a step that evaluated also carries OpenAI's optional
    `full_valid_loss` / `full_valid_mean_token_accuracy` (OpenAI's `valid_*` come from a sample; ours are full)."""
    metrics = finite_floats(stored)
    for name in ("valid_loss", "valid_mean_token_accuracy"):
        if name in metrics:
            metrics[f"full_{name}"] = metrics[name]
    return metrics


class ModelQuantization(BaseModel):
    """Our extension: how a base model directory is stored already (its config.json's `quantization_config`)."""

    method: str = Field(description="The config's quant_method: gptq or awq (jobs train on these weights as stored), or another "
                        "method transformers knows, such as bitsandbytes.")
    bits: int | None = Field(description="Bits per stored weight, where the config says.")
    group_size: int | None = Field(description="Weights per scale group along a layer's input (-1: one group per column), where "
                                   "the config says.")


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    quantization: ModelQuantization | None = Field(None, description="Our extension, for base models: how the directory's "
                                                   "weights are stored. null: a plain 16/32-bit base, which jobs quantize on "
                                                   "load as their `quantization` option says; always null for fine-tuned models.")


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool


class ExportError(BaseModel):
    code: str
    message: str


class FineTuningJobExport(BaseModel):
    """Our extension: a merged export of a succeeded job's model (docs/api.md)."""

    id: str
    object: Literal["fine_tuning.job.export"] = "fine_tuning.job.export"
    job_id: str
    status: Literal["queued", "running", "succeeded", "failed"]
    file_id: str | None = Field(description="The merged model as .tar.gz (purpose fine-tune-results), once succeeded.")
    error: ExportError | None
    created_at: int
    finished_at: int | None

    @classmethod
    def from_row(cls, row: Export) -> FineTuningJobExport:
        return cls(id=row.id, job_id=row.job_id, status=row.status, file_id=row.file_id,
                   error=ExportError(**row.error) if row.error else None, created_at=row.created_at, finished_at=row.finished_at)


# --- the create-job body ------------------------------------------------------------------------------------------


class _ClosedBody(BaseModel):
    # An unknown top-level key is a 400 naming it (a QLoRA knob put at the top level instead of in
    # hyperparameters would otherwise be silently ignored).
    model_config = ConfigDict(extra="forbid")


# Received as the object it is: contract.hyperparameters.resolve validates it, so that every error names its key the
# same way. The OpenAPI schema shows its typed shape, every option with its description and default.
HyperparametersObject = Annotated[dict[str, Any], WithJsonSchema(Hyperparameters.model_json_schema())]


class SupervisedMethod(_ClosedBody):
    hyperparameters: HyperparametersObject | None = None


class DpoMethod(_ClosedBody):
    hyperparameters: HyperparametersObject | None = None


class Method(_ClosedBody):
    # A string, not a Literal, so that an unsupported method gets the clear 400 of api.hyperparameters; the schema
    # lists the supported ones (the dashboard offers them).
    type: str = Field(description="The training method.", json_schema_extra={"enum": list(METHODS)})
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    # Accepted here so that a 'reinforcement' request gets the clear "not supported" answer.
    reinforcement: dict[str, Any] | None = None


def first_unstorable(value: Any, path: str = "", *, nul_ok: bool = False) -> tuple[str, str] | None:
    """(dotted path, reason) of the first value in a JSON body that cannot be stored or sent on: a string or key with
    a NUL character (PostgreSQL's text and JSON refuse it; allowed with `nul_ok`), with a lone surrogate (JSON's
    "\\ud800" escape is not Unicode: no UTF-8 encoder takes it) or a non-finite number (JSON has none). None if all
    is well."""
    if isinstance(value, str):
        return (path, reason) if (reason := _text_fault(value, nul_ok)) else None
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, "must be a finite number")
    if isinstance(value, dict):
        for key, item in value.items():
            if reason := _text_fault(str(key), nul_ok):
                return path, f"has a key that {reason}"
            found = first_unstorable(item, f"{path}.{key}" if path else str(key), nul_ok=nul_ok)
            if found:
                return found
    if isinstance(value, (list, tuple)):
        for item in value:
            if found := first_unstorable(item, path, nul_ok=nul_ok):
                return found
    return None


def _text_fault(text: str, nul_ok: bool) -> str | None:
    if "\x00" in text and not nul_ok:
        return "contains a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone surrogate (\\ud800-\\udfff), which is not valid Unicode"
    return None


class JobCreate(_ClosedBody):
    model: str = Field(min_length=1, max_length=255, description="A base model: a directory under the service's models directory.")
    training_file: str = Field(min_length=1, max_length=255)
    validation_file: str | None = Field(None, max_length=255)
    hyperparameters: HyperparametersObject | None = Field(None, description="Deprecated form of method.supervised.hyperparameters.")
    method: Method | None = None
    suffix: str | None = Field(None, min_length=1, max_length=64)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    metadata: dict[str, str] | None = None
    integrations: list[Any] | None = None

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value: str | None) -> str | None:
        if value is not None and ":" in value:
            raise ValueError("must not contain ':' (it separates the parts of a fine-tuned model name)")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        if len(value) > MAX_METADATA_PAIRS:
            raise ValueError(f"at most {MAX_METADATA_PAIRS} key-value pairs, got {len(value)}")
        for key, item in value.items():
            if len(key) > MAX_METADATA_KEY:
                raise ValueError(f"key {key[:20]!r}... is longer than {MAX_METADATA_KEY} characters")
            if len(item) > MAX_METADATA_VALUE:
                raise ValueError(f"the value of {key!r} is longer than {MAX_METADATA_VALUE} characters")
        return value


# --- uploads (POST /v1/uploads) ----------------------------------------------------------------------------------


class UploadExpiresAfter(_ClosedBody):
    anchor: Literal["created_at"]
    seconds: int = Field(ge=3600, le=2592000)


class UploadCreate(_ClosedBody):
    filename: str = Field(min_length=1, max_length=512)
    purpose: str = Field(description="Only 'fine-tune' is accepted.", json_schema_extra={"enum": ["fine-tune"]})
    bytes: int = Field(ge=1, description="The size of the whole file; the parts must add up to it.")
    mime_type: str = Field(min_length=1, max_length=256)
    expires_after: UploadExpiresAfter | None = Field(None, description="When the file made at completion expires.")


class UploadComplete(_ClosedBody):
    part_ids: list[str] = Field(min_length=1, max_length=10000, description="The parts, in the order they make the file.")
    md5: str | None = Field(None, max_length=64, description="MD5 of the whole file, hex; checked when given.")


class UploadObject(BaseModel):
    id: str
    object: Literal["upload"] = "upload"
    bytes: int
    created_at: int
    expires_at: int
    filename: str
    purpose: str
    status: Literal["pending", "completed", "cancelled", "expired"]
    file: FileObject | None

    @classmethod
    def from_row(cls, row: Upload, file: File | None = None) -> UploadObject:
        status = "expired" if row.status == "pending" and row.expires_at <= now() else row.status
        return cls(id=row.id, bytes=row.bytes, created_at=row.created_at, expires_at=row.expires_at, filename=row.filename,
                   purpose=row.purpose, status=status, file=FileObject.from_row(file) if file is not None else None)


class UploadPartObject(BaseModel):
    """Read from the part's row as it is (`model_validate(row)`)."""

    model_config = ConfigDict(from_attributes=True)
    id: str
    object: Literal["upload.part"] = "upload.part"
    created_at: int
    upload_id: str


# --- checkpoint permissions ----------------------------------------------------------------------------------------


class PermissionCreate(_ClosedBody):
    project_ids: list[str] = Field(min_length=1, max_length=100, description="The projects to grant the checkpoint model to.")


class CheckpointPermissionObject(BaseModel):
    id: str
    object: Literal["checkpoint.permission"] = "checkpoint.permission"
    created_at: int
    project_id: str

    @classmethod
    def from_row(cls, row: CheckpointPermission) -> CheckpointPermissionObject:
        return cls(id=row.id, created_at=row.created_at, project_id=row.project)


class CheckpointPermissionDeleted(BaseModel):
    id: str
    object: Literal["checkpoint.permission"] = "checkpoint.permission"
    deleted: bool


# --- webhook endpoints (the SDK's client.webhooks; `enabled`, `disabled_reason` and the deliveries log are ours) -----

WebhookEventType = Literal["fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled"]


class WebhookEndpointCreate(_ClosedBody):
    url: str = Field(max_length=2048, description="The http(s) URL that receives the deliveries (docs/operations.md: the URL policy).")
    event_types: list[WebhookEventType] = Field(min_length=1, max_length=3, description="The event types delivered to it.")
    name: str = Field("", max_length=256, description="A human-readable name.")


class WebhookEndpointUpdate(_ClosedBody):
    url: str | None = Field(None, max_length=2048)
    event_types: list[WebhookEventType] | None = Field(None, min_length=1, max_length=3)
    name: str | None = Field(None, max_length=256)
    enabled: bool | None = Field(None, description="An extension: false disables the endpoint, true enables it again (and forgets its failures).")


class WebhookRotateSecret(_ClosedBody):
    keep_old_secret_active_for_24_hours: bool = False


class WebhookEndpointObject(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    created_at: int
    updated_at: int
    name: str
    url: str
    event_types: list[str]
    signing_secret_hint: str
    enabled: bool = Field(description="An extension: false once disabled, by the project or after failing deliveries.")
    disabled_reason: str | None = Field(description="An extension: why the endpoint is disabled (null while enabled).")

    @classmethod
    def from_row(cls, row: WebhookEndpoint) -> WebhookEndpointObject:
        from core.webhooks import secret_hint

        return cls(id=row.id, created_at=row.created_at, updated_at=row.updated_at, name=row.name, url=row.url,
                   event_types=list(row.event_types), signing_secret_hint=secret_hint(row.secret), enabled=row.enabled,
                   disabled_reason=row.disabled_reason)


class WebhookEndpointWithSecret(WebhookEndpointObject):
    signing_secret: str = Field(description="The whsec_... signing secret: returned only at creation and rotation.")

    @classmethod
    def from_row(cls, row: WebhookEndpoint) -> WebhookEndpointWithSecret:
        return cls(**WebhookEndpointObject.from_row(row).model_dump(), signing_secret=row.secret)


class WebhookEndpointDeleted(BaseModel):
    id: str
    object: Literal["webhook_endpoint.deleted"] = "webhook_endpoint.deleted"
    deleted: bool


class WebhookAttemptObject(BaseModel):
    attempted_at: float
    duration_ms: int
    status_code: int | None
    error: str | None

    @classmethod
    def from_row(cls, row: WebhookAttempt) -> WebhookAttemptObject:
        return cls(attempted_at=row.attempted_at, duration_ms=row.duration_ms, status_code=row.status_code, error=row.error)


class WebhookDeliveryObject(BaseModel):
    id: str = Field(description="The delivery's webhook-id header, the same on each of its attempts.")
    object: Literal["webhook_endpoint.delivery"] = "webhook_endpoint.delivery"
    created_at: int
    event_id: str
    event_type: str
    job_id: str
    status: Literal["pending", "delivered", "failed"]
    next_attempt_at: float | None
    attempts: list[WebhookAttemptObject]

    @classmethod
    def from_row(cls, row: WebhookDelivery, attempts: list[WebhookAttempt]) -> WebhookDeliveryObject:
        import json

        return cls(id=row.id, created_at=row.created_at, event_id=row.event_id, event_type=row.event_type,
                   job_id=json.loads(row.body)["data"]["id"], status=row.status,  # type: ignore[arg-type]
                   next_attempt_at=row.next_attempt_at if row.status == "pending" else None,
                   attempts=[WebhookAttemptObject.from_row(attempt) for attempt in attempts])
