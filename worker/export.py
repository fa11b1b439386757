"""Runs one merged export on this worker: claim, download the adapter, merge it into the 16-bit base, store.

    run_export(export_id, settings, session_factory, storage) -> outcome

The export row is the truth. A worker that cannot claim it (not queued: run elsewhere, or its model deleted)
does nothing; while it runs one, a thread writes its heartbeat (the sweeper fails an export whose heartbeat stops). The merged model is uploaded, then one transaction (holding the job's row lock, so a concurrent
DELETE of the model lands wholly before or after) adds its File row and moves the export to succeeded; if that
transaction finds the model deleted or the export gone, or anything fails, the uploaded object is deleted.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core import ids, logs
from core.db import session_scope
from core.exports import claim_export, finish_export
from core.jobs import JobStatus, add_event
from core.model_deletion import lock_live_model_job
from core.model_names import adapter_filename, merged_filename
from core.quotas import QuotaExceeded, check_stored_bytes, lock_project
from core.settings import Settings
from core.storage import ObjectNotFound, ObjectStorage, StoredObject, delete_quietly
from core.tables import Export, File, Job, now
from worker.database_sink import pack_directory
from worker.retry import Outage, retry_transient
from worker.runner import default_worker_id, remove_dead_workdirs, unpack_archive
from worker.runner.claim import Heartbeat

log = logging.getLogger(__name__)

NOT_CLAIMED = "not_claimed"
SUCCEEDED = "succeeded"
FAILED = "failed"
DISCARDED = "discarded"  # merged, but the model was deleted (or the export removed) meanwhile: nothing stored

SAVE_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


class ExportFailure(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class ExportSpec:
    id: str
    job_id: str
    project: str
    model: str
    adapter_key: str


def base_dtype_name(base_model_dir: Path) -> str:
    """The dtype the base's config.json names (`dtype`, or the older `torch_dtype`); float32 when it names none."""
    try:
        config = json.loads((base_model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")
    return SAVE_DTYPES.get(name, "float32")


def merge_adapter(base_model_dir: Path, adapter_dir: Path, output_dir: Path) -> Path:
    """Load the base unquantized, attach the peft adapter, merge it into the weights and save a plain transformers
    model (safetensors) with the base's tokenizer, in the base's dtype. On a GPU the merge runs in that dtype; on
    the CPU in float32 (CPUs without native bf16 are slow at it, and the sum is exact before the final rounding)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    save_dtype = getattr(torch, base_dtype_name(base_model_dir))
    on_gpu = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=save_dtype if on_gpu else torch.float32,
                                                 device_map={"": torch.cuda.current_device()} if on_gpu else None)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged = merged.to(device="cpu", dtype=save_dtype)
    merged.save_pretrained(output_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_model_dir).save_pretrained(output_dir)  # the chat template included
    del model, merged
    if on_gpu:
        torch.cuda.empty_cache()
    return output_dir


def run_export(export_id: str, settings: Settings, session_factory: sessionmaker[Session], storage: ObjectStorage,
               worker_id: str | None = None, dispatch_next: Callable[[str], object] | None = None) -> str:
    """Run export `export_id` to its end. Returns one of NOT_CLAIMED, SUCCEEDED, FAILED, DISCARDED.
    `dispatch_next(project)` is called once it is claimed and again when it ends: an export holds one of its project's
    places on the training queue (core/dispatch.py), and each moves the project's next job or export up."""
    job_id, project = _job_of(session_factory, export_id)
    with logs.bound(export_id=export_id, job_id=job_id):  # every line logged meanwhile carries both ids
        outcome = _run_export(export_id, settings, session_factory, storage, worker_id or default_worker_id(),
                              lambda: dispatch_next(project) if dispatch_next and project else None)
    if dispatch_next is not None and project is not None and outcome != NOT_CLAIMED:
        dispatch_next(project)
    return outcome


def _job_of(session_factory: sessionmaker[Session], export_id: str) -> tuple[str | None, str | None]:
    """(the export's job id, its project), or Nones."""
    try:
        with session_scope(session_factory) as session:
            row = session.execute(select(Export.job_id, Job.project).join(Job, Job.id == Export.job_id)
                                  .where(Export.id == export_id)).one_or_none()
            return (row.job_id, row.project) if row is not None else (None, None)
    except Exception:  # the database is down: the claim below meets it too and says so
        return None, None


def _run_export(export_id: str, settings: Settings, session_factory: sessionmaker[Session], storage: ObjectStorage,
                worker_id: str, claimed: Callable[[], object]) -> str:
    with session_scope(session_factory) as session:
        if not claim_export(session, export_id, worker_id):
            log.info("export %s not claimed by %s: it is not queued", export_id, worker_id)
            return NOT_CLAIMED
    claimed()
    # A lost lease is only logged: the final commit finds the export is no longer ours and discards the merge.
    beat = Heartbeat(Export, export_id, worker_id, session_factory, settings.heartbeat_interval_s)
    beat.start()
    remove_dead_workdirs()
    # Named like the runner's (qlora-KIND-TOKEN-PID-...), so that remove_dead_workdirs finds one a killed worker left.
    workdir = Path(tempfile.mkdtemp(prefix=f"qlora-export-{export_id.removeprefix('export-')}-{os.getpid()}-"))
    uploaded: StoredObject | None = None
    try:
        spec = _load_spec(session_factory, export_id)
        uploaded = _merge_and_upload(spec, settings, storage, workdir)
        stored = uploaded
        committed = retry_transient(lambda: _commit(spec, worker_id, session_factory, stored, settings), settings.outage_retry_s,
                            f"export {export_id}: commit")
        if not committed:
            delete_quietly(storage, uploaded.key)
            log.info("export %s merged, but its model was deleted or the export is no longer ours: discarded", export_id)
            return DISCARDED
        return SUCCEEDED
    except Exception as exc:
        if uploaded is not None:
            delete_quietly(storage, uploaded.key)
        code, message = _error_of(exc)
        if isinstance(exc, (ExportFailure, QuotaExceeded)):
            log.warning("export %s failed: %s", export_id, message)
        else:
            log.exception("export %s failed", export_id)
        _fail(session_factory, export_id, worker_id, code, message)
        return FAILED
    finally:
        beat.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _load_spec(session_factory: sessionmaker[Session], export_id: str) -> ExportSpec:
    with session_scope(session_factory) as session:
        export = session.execute(select(Export).where(Export.id == export_id)).scalar_one()
        job = session.execute(select(Job).where(Job.id == export.job_id)).scalar_one()
        if job.status != JobStatus.SUCCEEDED.value or job.model_deleted_at is not None:
            raise ExportFailure("model_not_found", f"Job {job.id} has no model to export.")
        adapter = session.execute(select(File).where(File.id.in_(list(job.result_files or [])),
                                                     File.filename == adapter_filename(job.id))).scalar_one_or_none()
        if adapter is None:
            raise ExportFailure("adapter_not_found", f"The adapter result file of job {job.id} does not exist.")
        return ExportSpec(id=export.id, job_id=job.id, project=job.project, model=job.trained_base, adapter_key=adapter.storage_key)


def _merge_and_upload(spec: ExportSpec, settings: Settings, storage: ObjectStorage, workdir: Path) -> StoredObject:
    assert settings.models_dir is not None
    # Lexically inside models_dir, as the runner checks (a model directory may be a symlink to shared storage).
    models_dir = Path(os.path.normpath(settings.models_dir.absolute()))
    base_model_dir = Path(os.path.normpath(models_dir / spec.model))
    if models_dir not in base_model_dir.parents or not (base_model_dir / "config.json").is_file():
        raise ExportFailure("base_model_not_found", f"The base model {spec.model!r} is not on this worker.")
    window = settings.outage_retry_s
    archive = workdir / "adapter.tar.gz"
    try:
        retry_transient(lambda: storage.download(spec.adapter_key, archive), window, f"export {spec.id}: adapter download")
    except ObjectNotFound:
        raise ExportFailure("adapter_not_found", f"The adapter of job {spec.job_id} is missing from object storage.") from None
    adapter_dir = unpack_archive(archive, workdir / "adapter")
    archive.unlink()
    merged_dir = merge_adapter(base_model_dir, adapter_dir, workdir / "merged")
    packed = pack_directory(merged_dir, workdir / "merged.tar.gz")
    shutil.rmtree(merged_dir, ignore_errors=True)
    key = f"files/{ids.file_id()}"
    return retry_transient(lambda: storage.put_file(key, packed), window, f"export {spec.id}: upload")


def _commit(spec: ExportSpec, worker_id: str, session_factory: sessionmaker[Session], stored: StoredObject,
            settings: Settings) -> bool:
    """The merged file's row, the export's move to succeeded and the job's event, in one transaction; False when the
    model was deleted or the export is no longer ours. Raises QuotaExceeded when the merged file, at its real size,
    would pass the project's stored-bytes limit (checked again here, under the project's lock: the reservation made
    at the request was an estimate, and other files may have been stored since)."""
    file_id = stored.key.removeprefix("files/")
    with session_scope(session_factory) as session:
        if lock_live_model_job(session, spec.job_id) is None:
            session.rollback()
            return False
        lock_project(session, spec.project)
        check_stored_bytes(session, settings, spec.project, stored.size, "the merged model's ", except_export=spec.id)
        if not finish_export(session, spec.id, worker_id, file_id=file_id):
            session.rollback()
            return False
        session.add(File(id=file_id, project=spec.project, filename=merged_filename(spec.job_id), purpose="fine-tune-results",
                         bytes=stored.size, sha256=stored.sha256, status="processed", storage_key=stored.key, created_at=now()))
        add_event(session, spec.job_id, "info", f"Merged model ready: {file_id}")
        return True


def _fail(session_factory: sessionmaker[Session], export_id: str, worker_id: str, code: str, message: str) -> None:
    """The export failed with `error` and the job gets an error event, if the export is still ours."""
    try:
        with session_scope(session_factory) as session:
            job_id = session.execute(select(Export.job_id).where(Export.id == export_id)).scalar_one_or_none()
            if job_id is not None and finish_export(session, export_id, worker_id, error={"code": code, "message": message}):
                add_event(session, job_id, "error", f"Export {export_id} failed: {message}")
    except Exception:
        log.exception("could not record the failure of export %s", export_id)


def _error_of(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, ExportFailure):
        return exc.code, exc.message
    if isinstance(exc, QuotaExceeded):
        return "quota_exceeded", f"{exc.message} (limit set by {exc.setting}); the merged model was not stored."
    if isinstance(exc, Outage):
        return "storage_unavailable", "The database or object storage stayed unreachable; start the export again."
    return "export_error", f"The merge failed ({type(exc).__name__}: {str(exc)[:300]})."
