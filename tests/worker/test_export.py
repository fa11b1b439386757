"""run_export in-process: a job trained by the real runner on a tiny Llama, merged into its 16-bit base; the merged
model loads with transformers alone and answers as base + adapter does. And the failure paths."""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from api.main import create_app
from core import ids
from core.db import session_scope
from core.model_deletion import delete_model_rows, lock_live_model_job
from core.tables import Export, File, Job, now
from tests.worker.helpers import MODEL, PROJECT, create_job, events, get_job, local_objects, stored_config, wait_until
from tests.worker.test_runner import RecordingCelery
from worker import export as export_worker
from worker import runner
from worker.sweeper import sweep


def add_export(session_factory, job_id: str) -> str:  # noqa: ANN001
    export_id = ids.export_id()
    with session_scope(session_factory) as session:
        session.add(Export(id=export_id, job_id=job_id, status="queued", created_at=now()))
    return export_id


def get_export(session_factory, export_id: str) -> Export:  # noqa: ANN001
    with session_scope(session_factory) as session:
        return session.execute(select(Export).where(Export.id == export_id)).scalar_one()


def unpack(data: bytes, target: Path) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        names = tar.getnames()
        tar.extractall(target, filter="data")
    return names


def greedy(model, tokenizer) -> list[int]:  # noqa: ANN001
    import torch

    ids_ = tokenizer.apply_chat_template([{"role": "user", "content": "q 3"}], add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids_, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids_["input_ids"].shape[1]:].tolist()


def test_merged_export_loads_with_transformers_and_answers_as_base_plus_adapter(make_settings, session_factory, storage, models_dir,
                                                                                tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = make_settings()
    job_id = create_job(session_factory, storage, hyper=stored_config(max_steps=6, learning_rate=3e-2))
    assert runner.run_job(job_id, settings, session_factory, storage) == runner.SUCCEEDED
    export_id = add_export(session_factory, job_id)

    assert export_worker.run_export(export_id, settings, session_factory, storage) == export_worker.SUCCEEDED
    export = get_export(session_factory, export_id)
    assert export.status == "succeeded" and export.error is None and export.finished_at is not None
    with session_scope(session_factory) as session:
        merged_file = session.execute(select(File).where(File.id == export.file_id)).scalar_one()
        adapter_file = session.execute(select(File).where(File.filename == f"{job_id}-adapter.tar.gz")).scalar_one()
    assert (merged_file.project, merged_file.purpose, merged_file.status, merged_file.filename) == (
        PROJECT, "fine-tune-results", "processed", f"{job_id}-merged.tar.gz")
    evs = events(session_factory, job_id)
    assert (evs[-1].level, evs[-1].message) == ("info", f"Merged model ready: {merged_file.id}")
    # a redelivered task finds the export claimed: nothing runs twice
    assert export_worker.run_export(export_id, settings, session_factory, storage) == export_worker.NOT_CLAIMED
    assert get_export(session_factory, export_id).file_id == merged_file.id

    # the file downloads through the API like any result file
    api_settings = make_settings(api_keys="key-t=proj-test")
    with TestClient(create_app(api_settings)) as client:
        response = client.get(f"/v1/files/{merged_file.id}/content", headers={"Authorization": "Bearer key-t"})
        assert response.status_code == 200
        data = response.content
    assert len(data) == merged_file.bytes
    merged_dir = tmp_path / "merged"
    names = unpack(data, merged_dir)
    assert "model.safetensors" in names and "adapter_config.json" not in names and all("/" not in n for n in names)
    config = json.loads((merged_dir / "config.json").read_text())
    assert (config.get("dtype") or config.get("torch_dtype")) == "bfloat16"  # the base's dtype
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(models_dir / MODEL).chat_template

    adapter_dir = tmp_path / "adapter"
    unpack(b"".join(storage.iter_bytes(adapter_file.storage_key)), adapter_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(models_dir / MODEL, dtype=torch.float32).eval()
    base_answer = greedy(base, tokenizer)
    reference = PeftModel.from_pretrained(base, adapter_dir).eval()
    assert any(float(p.abs().sum()) > 0 for n, p in reference.named_parameters() if "lora_B" in n)  # trained
    assert greedy(merged, tokenizer) == greedy(reference, tokenizer) != base_answer


@pytest.fixture
def succeeded_job(session_factory, storage, tmp_path):
    """A succeeded job row with an adapter result file in storage (contents the fake merge ignores)."""
    adapter_id = ids.file_id()
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text("{}")
    from worker.database_sink import pack_directory

    obj = storage.put_file(f"files/{adapter_id}", pack_directory(tmp_path / "a", tmp_path / "a.tar.gz"))
    job_id = create_job(session_factory, storage, status="succeeded", fine_tuned_model="ft:x")
    with session_scope(session_factory) as session:
        session.execute(update(Job).where(Job.id == job_id).values(result_files=[adapter_id]))
        session.add(File(id=adapter_id, project=PROJECT, filename=f"{job_id}-adapter.tar.gz", purpose="fine-tune-results",
                         bytes=obj.size, sha256=obj.sha256, status="processed", storage_key=obj.key, created_at=now()))
    return job_id, obj.key


def fake_merge(base_model_dir: Path, adapter_dir: Path, output_dir: Path) -> Path:
    output_dir.mkdir()
    (output_dir / "model.safetensors").write_bytes(b"merged")
    return output_dir


def merged_files(session_factory) -> list[str]:  # noqa: ANN001
    with session_scope(session_factory) as session:
        return list(session.execute(select(File.id).where(File.filename.like("%-merged.tar.gz"))).scalars())


def test_a_missing_adapter_fails_the_export(make_settings, session_factory, storage, succeeded_job):
    job_id, adapter_key = succeeded_job
    storage.delete(adapter_key)
    export_id = add_export(session_factory, job_id)
    assert export_worker.run_export(export_id, make_settings(), session_factory, storage) == export_worker.FAILED
    export = get_export(session_factory, export_id)
    assert export.status == "failed" and export.error["code"] == "adapter_not_found" and export.file_id is None
    assert export.finished_at is not None
    last = events(session_factory, job_id)[-1]
    assert last.level == "error" and export_id in last.message
    assert merged_files(session_factory) == []


def test_a_missing_base_model_or_an_outage_fails_the_export_with_its_code(make_settings, session_factory, storage, succeeded_job,
                                                                          monkeypatch):
    job_id, _ = succeeded_job
    with session_scope(session_factory) as session:
        session.execute(update(Job).where(Job.id == job_id).values(model="../elsewhere"))
    export_id = add_export(session_factory, job_id)
    assert export_worker.run_export(export_id, make_settings(), session_factory, storage) == export_worker.FAILED
    assert get_export(session_factory, export_id).error["code"] == "base_model_not_found"

    with session_scope(session_factory) as session:
        session.execute(update(Job).where(Job.id == job_id).values(model=MODEL))

    def unreachable(key, path):  # noqa: ANN001, ANN202
        raise ConnectionError("no route to the object store")

    monkeypatch.setattr(storage, "download", unreachable)
    export_id = add_export(session_factory, job_id)
    assert export_worker.run_export(export_id, make_settings(outage_retry_s=0.5), session_factory, storage) == export_worker.FAILED
    assert get_export(session_factory, export_id).error["code"] == "storage_unavailable"


def test_a_failed_commit_deletes_the_uploaded_merge(make_settings, session_factory, storage, succeeded_job, monkeypatch, tmp_path):
    job_id, _ = succeeded_job
    export_id = add_export(session_factory, job_id)
    monkeypatch.setattr(export_worker, "merge_adapter", fake_merge)
    before = local_objects(tmp_path / "objects")

    def broken_commit(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("the database said no")

    monkeypatch.setattr(export_worker, "_commit", broken_commit)
    assert export_worker.run_export(export_id, make_settings(), session_factory, storage) == export_worker.FAILED
    assert local_objects(tmp_path / "objects") == before  # the uploaded merge is gone again
    export = get_export(session_factory, export_id)
    assert export.status == "failed" and export.error["code"] == "export_error" and "the database said no" in export.error["message"]
    assert merged_files(session_factory) == []


def test_a_model_deleted_during_the_merge_discards_it(make_settings, session_factory, storage, succeeded_job, monkeypatch, tmp_path):
    job_id, _ = succeeded_job
    export_id = add_export(session_factory, job_id)
    other_export = add_export(session_factory, job_id)

    def merge_then_delete(base_model_dir: Path, adapter_dir: Path, output_dir: Path) -> Path:
        with session_scope(session_factory) as session:
            delete_model_rows(session, lock_live_model_job(session, job_id))
        return fake_merge(base_model_dir, adapter_dir, output_dir)

    monkeypatch.setattr(export_worker, "merge_adapter", merge_then_delete)
    before = local_objects(tmp_path / "objects")
    assert export_worker.run_export(export_id, make_settings(), session_factory, storage) == export_worker.DISCARDED
    assert local_objects(tmp_path / "objects") == before  # the merge was uploaded, then deleted again
    assert merged_files(session_factory) == []
    assert get_job(session_factory, job_id).model_deleted_at is not None
    with session_scope(session_factory) as session:
        assert session.execute(select(Export).where(Export.job_id == job_id)).first() is None
    # an export queued before the deletion is gone with it: its task does nothing
    assert export_worker.run_export(other_export, make_settings(), session_factory, storage) == export_worker.NOT_CLAIMED


def test_the_base_dtype_is_read_from_its_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float16"}))
    assert export_worker.base_dtype_name(tmp_path) == "float16"
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))
    assert export_worker.base_dtype_name(tmp_path) == "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps({}))
    assert export_worker.base_dtype_name(tmp_path) == "float32"


def test_a_running_export_writes_a_heartbeat_and_the_sweeper_fails_one_whose_heartbeat_stopped(make_settings, session_factory,
                                                                                                storage, succeeded_job, monkeypatch):
    job_id, _ = succeeded_job
    export_id = add_export(session_factory, job_id)
    settings = make_settings(heartbeat_interval_s=0.1)
    seen: list[float] = []

    def slow_merge(base_model_dir: Path, adapter_dir: Path, output_dir: Path) -> Path:
        first = get_export(session_factory, export_id).heartbeat_at
        wait_until(lambda: get_export(session_factory, export_id).heartbeat_at != first, 10, message="a heartbeat")
        seen.append(first)
        return fake_merge(base_model_dir, adapter_dir, output_dir)

    monkeypatch.setattr(export_worker, "merge_adapter", slow_merge)
    assert export_worker.run_export(export_id, settings, session_factory, storage) == export_worker.SUCCEEDED
    assert seen and seen[0] is not None  # the claim set it; the thread wrote it again meanwhile

    # a worker that died mid-merge: the sweeper fails its export (and leaves a live one alone)
    lost, alive = add_export(session_factory, job_id), add_export(session_factory, job_id)
    with session_scope(session_factory) as session:
        session.execute(update(Export).where(Export.id == lost).values(status="running", worker_id="dead", heartbeat_at=time.time() - 3600))
        session.execute(update(Export).where(Export.id == alive).values(status="running", worker_id="w", heartbeat_at=time.time()))
    result = sweep(settings, session_factory, RecordingCelery())
    assert result["failed_exports"] == [lost]
    failed = get_export(session_factory, lost)
    assert (failed.status, failed.error["code"], failed.finished_at is not None) == ("failed", "worker_lost", True)
    assert get_export(session_factory, alive).status == "running"
    last = events(session_factory, job_id)[-1]
    assert last.level == "error" and lost in last.message


def test_a_merge_past_the_stored_bytes_at_commit_is_failed_and_deleted(make_settings, session_factory, storage, succeeded_job,
                                                                       monkeypatch, tmp_path):
    """The worker checks the quota again with the merged file's real size, under the project's lock: a merge that no
    longer fits (the request's reservation was an estimate; other files came since) fails with quota_exceeded and
    leaves nothing stored. The export's own reservation does not count against it."""
    job_id, _ = succeeded_job
    with session_scope(session_factory) as session:
        stored = session.scalar(select(func.sum(File.bytes)))
    monkeypatch.setattr(export_worker, "merge_adapter", fake_merge)
    export_id = add_export(session_factory, job_id)
    with session_scope(session_factory) as session:  # reserved at the request: counted for other exports, not itself
        session.execute(update(Export).where(Export.id == export_id).values(reserved_bytes=10**6))
    before = local_objects(tmp_path / "objects")
    settings = make_settings(max_stored_bytes_per_project=stored + 10)  # the packed merge is larger than 10 bytes
    assert export_worker.run_export(export_id, settings, session_factory, storage) == export_worker.FAILED
    export = get_export(session_factory, export_id)
    assert export.status == "failed" and export.error["code"] == "quota_exceeded" and export.file_id is None
    assert "QLORA_MAX_STORED_BYTES_PER_PROJECT" in export.error["message"]
    assert merged_files(session_factory) == [] and local_objects(tmp_path / "objects") == before

    fits = add_export(session_factory, job_id)
    with session_scope(session_factory) as session:
        session.execute(update(Export).where(Export.id == fits).values(reserved_bytes=10**6))
    moved_up: list[str] = []  # an export holds a place of its project on the training queue: claim and end pass it on
    assert export_worker.run_export(fits, make_settings(max_stored_bytes_per_project=stored + 10**6), session_factory,
                                    storage, dispatch_next=moved_up.append) == export_worker.SUCCEEDED
    assert moved_up == [PROJECT, PROJECT]
