"""DELETE /v1/models/{model} and the merged-export routes (POST/GET /v1/fine_tuning/jobs/{id}/export(s)), on a job
taken to succeeded as the runner leaves it: result files, checkpoints and a merged export, each with its object."""

from __future__ import annotations

import openai
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.main import create_app
from core import ids
from core.jobs import claim_job, succeed_job
from core.model_names import checkpoint_model_name, fine_tuned_model_name
from core.tables import Checkpoint, Export, Job, now
from core.tables import File as FileRow
from tests.api.conftest import make_settings
from tests.api.helpers import KEY_A, KEY_B, MODEL, assert_error, chat_jsonl, create_job_ok, db, queued_tasks, upload_ok
from tests.conftest import free_port
from worker.sweeper import sweep


def _stored_file(client, tmp_path, project: str, filename: str, content: bytes) -> FileRow:
    file_id = ids.file_id()
    path = tmp_path / file_id
    path.write_bytes(content)
    obj = client.app.state.storage.put_file(f"files/{file_id}", path)
    return FileRow(id=file_id, project=project, filename=filename, purpose="fine-tune-results", bytes=obj.size, sha256=obj.sha256,
                   status="processed", storage_key=obj.key, created_at=now())


def finished_job(client, tmp_path, headers=KEY_A) -> dict:
    """A succeeded job with a metrics CSV and an adapter result file, two checkpoints and a succeeded export, all in
    storage. Returns the names, ids and object keys."""
    job = create_job_ok(client, upload_ok(client, headers=headers)["id"], headers=headers, suffix="del")
    job_id, project = job["id"], job["organization_id"]
    name = fine_tuned_model_name(MODEL, project, "del", job_id)
    csv = _stored_file(client, tmp_path, project, f"{job_id}-metrics.csv", b"step,train_loss\n1,0.5\n")
    adapter = _stored_file(client, tmp_path, project, f"{job_id}-adapter.tar.gz", b"adapter bytes")
    merged = _stored_file(client, tmp_path, project, f"{job_id}-merged.tar.gz", b"merged bytes")
    storage = client.app.state.storage
    ckpt_keys = []
    for step in (2, 4):
        path = tmp_path / f"ckpt-{step}"
        path.write_bytes(b"checkpoint")
        ckpt_keys.append(storage.put_file(f"checkpoints/{job_id}/step-{step:06d}.tar.gz", path).key)
    with db(client) as session:
        assert claim_job(session, job_id, "worker-1")
        assert succeed_job(session, job_id, "worker-1", fine_tuned_model=name, trained_tokens=10, result_files=[csv.id, adapter.id])
        session.add_all([csv, adapter, merged])
        for step, key in zip((2, 4), ckpt_keys, strict=True):
            session.add(Checkpoint(id=ids.checkpoint_id(), job_id=job_id, step=step, metrics={"step": step}, storage_key=key,
                                   fine_tuned_model_checkpoint=checkpoint_model_name(name, step), created_at=now()))
        session.add(Export(id=ids.export_id(), job_id=job_id, status="succeeded", file_id=merged.id, created_at=now(), finished_at=now()))
    return {"job_id": job_id, "model": name, "csv": csv, "adapter": adapter, "merged": merged, "ckpt_keys": ckpt_keys}


@pytest.fixture
def sdk(client):
    return openai.OpenAI(api_key="key-a", base_url="http://testserver/v1", http_client=client, max_retries=0,
                         _strict_response_validation=True)


def test_deleting_a_fine_tuned_model_removes_its_weights_and_keeps_the_job(client, sdk, tmp_path):
    done = finished_job(client, tmp_path)
    theirs = finished_job(client, tmp_path, headers=KEY_B)
    job_id, name = done["job_id"], done["model"]
    storage = client.app.state.storage
    assert name in {m.id for m in sdk.models.list()}
    assert len(client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", headers=KEY_A).json()["data"]) == 2

    deleted = sdk.models.delete(name)
    assert (deleted.id, deleted.object, deleted.deleted) == (name, "model", True)

    assert name not in {m.id for m in sdk.models.list()}
    assert_error(client.get(f"/v1/models/{name}", headers=KEY_A), 404, code="model_not_found", param="model")
    assert_error(client.get(f"/v1/models/{name}:ckpt-step-4", headers=KEY_A), 404, code="model_not_found", param="model")
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=KEY_A).json()
    assert job["status"] == "succeeded" and job["fine_tuned_model"] == name
    assert job["result_files"] == [done["csv"].id]  # the metrics CSV holds no weights: it stays
    assert client.get(f"/v1/files/{done['csv'].id}/content", headers=KEY_A).content == b"step,train_loss\n1,0.5\n"
    for gone in (done["adapter"], done["merged"]):
        assert_error(client.get(f"/v1/files/{gone.id}", headers=KEY_A), 404, code="file_not_found", param="file_id")
        assert not storage.exists(gone.storage_key)
    listed = {f["id"] for f in client.get("/v1/files", headers=KEY_A).json()["data"]}
    assert done["csv"].id in listed and not {done["adapter"].id, done["merged"].id} & listed
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", headers=KEY_A).json()["data"] == []
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}/exports", headers=KEY_A).json()["data"] == []
    assert not any(storage.exists(key) for key in done["ckpt_keys"])
    assert storage.exists(done["csv"].storage_key)
    assert_error(client.post(f"/v1/fine_tuning/jobs/{job_id}/export", headers=KEY_A), 409, code="model_deleted", param="job_id")

    # deleted once: a second delete finds nothing; the other project's model is untouched
    with pytest.raises(openai.NotFoundError) as again:
        sdk.models.delete(name)
    assert (again.value.code, again.value.param) == ("model_not_found", "model")
    assert storage.exists(theirs["adapter"].storage_key) and all(storage.exists(k) for k in theirs["ckpt_keys"])
    assert client.get(f"/v1/models/{theirs['model']}", headers=KEY_B).status_code == 200


def test_what_cannot_be_deleted(client, tmp_path):
    theirs = finished_job(client, tmp_path, headers=KEY_B)
    assert_error(client.delete(f"/v1/models/{theirs['model']}", headers=KEY_A), 404, code="model_not_found", param="model")
    assert_error(client.delete("/v1/models/ft:nothing:proj-a::abc", headers=KEY_A), 404, code="model_not_found", param="model")
    assert_error(client.delete(f"/v1/models/{MODEL}", headers=KEY_A), 403, code="cannot_delete_base_model", param="model")
    assert client.get(f"/v1/models/{MODEL}", headers=KEY_A).status_code == 200
    queued = create_job_ok(client, upload_ok(client)["id"], suffix="q")
    not_yet = fine_tuned_model_name(MODEL, "proj-a", "q", queued["id"])
    assert_error(client.delete(f"/v1/models/{not_yet}", headers=KEY_A), 404, code="model_not_found", param="model")
    assert client.get(f"/v1/models/{theirs['model']}", headers=KEY_B).status_code == 200


def test_a_failed_object_delete_still_deletes_the_model(client, tmp_path, monkeypatch):
    done = finished_job(client, tmp_path)
    storage = client.app.state.storage

    def broken(key):  # noqa: ANN001, ANN202
        raise OSError("storage down")

    monkeypatch.setattr(storage, "delete", broken)
    assert client.delete(f"/v1/models/{done['model']}", headers=KEY_A).json() == {"id": done["model"], "object": "model", "deleted": True}
    with db(client) as session:
        assert session.scalar(select(Job.model_deleted_at).where(Job.id == done["job_id"])) is not None
        assert session.scalar(select(FileRow).where(FileRow.id == done["adapter"].id)) is None
    assert storage.exists(done["adapter"].storage_key)  # an orphaned object, never a row without its object


def _export_url(job_id: str) -> str:
    return f"/v1/fine_tuning/jobs/{job_id}/export"


def test_export_routes(client, tmp_path, redis_url, queue_name):
    done = finished_job(client, tmp_path)
    job_id = done["job_id"]
    queued_job = create_job_ok(client, upload_ok(client)["id"])
    assert_error(client.post(_export_url(queued_job["id"]), headers=KEY_A), 409, code="job_not_succeeded", param="job_id")
    # Cancelled, it frees the project's one place on the training queue, which the export takes (core/dispatch.py).
    assert client.post(f"/v1/fine_tuning/jobs/{queued_job['id']}/cancel", headers=KEY_A).status_code == 200
    assert_error(client.post(_export_url(job_id), headers=KEY_B), 404, code="job_not_found", param="job_id")
    assert_error(client.post(_export_url("ftjob-nope"), headers=KEY_A), 404, code="job_not_found", param="job_id")

    first = client.post(_export_url(job_id), headers=KEY_A)
    assert first.status_code == 200, first.text
    export = first.json()
    assert set(export) == {"id", "object", "job_id", "status", "file_id", "error", "created_at", "finished_at"}
    assert (export["object"], export["job_id"], export["status"], export["file_id"], export["error"], export["finished_at"]) == (
        "fine_tuning.job.export", job_id, "queued", None, None, None)
    assert export["id"].startswith("export-")
    assert ("qlora.export", [export["id"]]) in queued_tasks(redis_url, queue_name)
    # while it is queued (or running), a second POST returns it: no second merge, no second message
    assert client.post(_export_url(job_id), headers=KEY_A).json()["id"] == export["id"]
    assert [t for t in queued_tasks(redis_url, queue_name) if t[0] == "qlora.export"] == [("qlora.export", [export["id"]])]

    listed = client.get(f"/v1/fine_tuning/jobs/{job_id}/exports", headers=KEY_A).json()
    assert listed["object"] == "list" and listed["has_more"] is False
    assert [e["id"] for e in listed["data"]] == [export["id"], _earlier_export(client, job_id)]  # newest first
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}/exports/{export['id']}", headers=KEY_A).json() == export
    assert_error(client.get(f"/v1/fine_tuning/jobs/{job_id}/exports/export-nope", headers=KEY_A), 404, code="export_not_found",
                 param="export_id")
    assert_error(client.get(f"/v1/fine_tuning/jobs/{job_id}/exports", headers=KEY_B), 404, code="job_not_found", param="job_id")
    assert_error(client.get(f"/v1/fine_tuning/jobs/{job_id}/exports/{export['id']}", headers=KEY_B), 404, code="job_not_found",
                 param="job_id")

    # once it is finished, a POST starts a new one
    with db(client) as session:
        session.get(Export, _seq_of(session, export["id"])).status = "failed"
    again = client.post(_export_url(job_id), headers=KEY_A).json()
    assert again["id"] != export["id"] and again["status"] == "queued"


def _earlier_export(client, job_id: str) -> str:
    with db(client) as session:
        return session.scalar(select(Export.id).where(Export.job_id == job_id, Export.status == "succeeded"))


def _seq_of(session, export_id: str) -> int:  # noqa: ANN001
    return session.scalar(select(Export.seq).where(Export.id == export_id))


def test_an_export_the_broker_did_not_take_is_sent_by_the_sweeper(tmp_path, sqlite_url, queue_name, models_dir):
    settings = make_settings(tmp_path, sqlite_url, f"redis://127.0.0.1:{free_port()}/0", queue_name, models_dir)
    with TestClient(create_app(settings)) as client:
        done = finished_job(client, tmp_path)
        export = client.post(_export_url(done["job_id"]), headers=KEY_A).json()
        assert export["status"] == "queued"
        with db(client) as session:
            assert session.scalar(select(Export.enqueued_at).where(Export.id == export["id"])) is None
        events = client.get(f"/v1/fine_tuning/jobs/{done['job_id']}/events", headers=KEY_A).json()["data"]
        assert events[0]["level"] == "warn" and export["id"] in events[0]["message"]
        assert (events[1]["level"], events[1]["message"]) == ("info", f"Merged export queued: {export['id']}")

        class Recording:
            def __init__(self):
                self.sent: list = []

            def send_task(self, name, args=None, queue=None, expires=None, **_):  # noqa: ANN001, ANN202
                self.sent.append((name, list(args or []), queue))

        celery = Recording()  # the broker is back: the sweep's dispatch sends the export at its project's turn
        assert sweep(settings, client.app.state.session_factory, celery)["sent"] == [export["id"]]
        assert celery.sent == [("qlora.export", [export["id"]], queue_name)]
        assert sweep(settings, client.app.state.session_factory, celery)["sent"] == []  # sent: not again


def test_an_export_is_refused_when_the_project_is_over_its_stored_bytes(tmp_path, database_url, redis_url, queue_name, models_dir):
    # Room for the training upload; the result files the worker adds (not refused: they are made, not uploaded)
    # then fill the project past its limit.
    settings = make_settings(tmp_path, database_url, redis_url, queue_name, models_dir, max_stored_bytes_per_project=len(chat_jsonl()) + 10)
    with TestClient(create_app(settings)) as client:
        done = finished_job(client, tmp_path)
        error = assert_error(client.post(_export_url(done["job_id"]), headers=KEY_A), 429, code="quota_exceeded", type="quota_error")
        assert "QLORA_MAX_STORED_BYTES_PER_PROJECT" in error["message"]



def test_an_export_is_refused_when_the_merged_model_would_pass_the_stored_bytes(tmp_path, database_url, redis_url, queue_name,
                                                                                 models_dir):
    """Under the limit, but not by the size of a merged model (the base's weight files): 429, as an upload of that size
    would get; with room for it, the export is queued."""
    from sqlalchemy import func

    (models_dir / MODEL / "model.safetensors").write_bytes(b"\0" * 4096)
    with TestClient(create_app(make_settings(tmp_path, database_url, redis_url, queue_name, models_dir))) as client:
        done = finished_job(client, tmp_path)
        with db(client) as session:
            stored = session.scalar(select(func.sum(FileRow.bytes)))
    for room, status in ((4095, 429), (4096, 200)):
        settings = make_settings(tmp_path, database_url, redis_url, queue_name, models_dir, max_stored_bytes_per_project=stored + room)
        with TestClient(create_app(settings)) as client:
            answer = client.post(_export_url(done["job_id"]), headers=KEY_A)
        assert answer.status_code == status, answer.json()
        if status == 429:
            assert "a merged model of about 4096 more" in answer.json()["error"]["message"]


def test_an_export_storm_under_a_quota_that_fits_one_merge_runs_one(tmp_path, database_url, redis_url, queue_name, models_dir):
    """Each accepted export reserves its merged model's size until it is stored (core/quotas.py): N exports of N
    jobs against a limit with room for one merge are one export queued and N-1 answers 429."""
    from sqlalchemy import func

    (models_dir / MODEL / "model.safetensors").write_bytes(b"\0" * 4096)
    with TestClient(create_app(make_settings(tmp_path, database_url, redis_url, queue_name, models_dir))) as client:
        jobs = [finished_job(client, tmp_path)["job_id"] for _ in range(3)]
        with db(client) as session:
            stored = session.scalar(select(func.sum(FileRow.bytes)))
    settings = make_settings(tmp_path, database_url, redis_url, queue_name, models_dir, max_stored_bytes_per_project=stored + 4096 + 100)
    with TestClient(create_app(settings)) as client:
        answers = [client.post(_export_url(job_id), headers=KEY_A) for job_id in jobs]
        assert [a.status_code for a in answers] == [200, 429, 429], [a.json() for a in answers]
        error = answers[1].json()["error"]
        assert error["code"] == "quota_exceeded" and "4096 bytes reserved by uploads and merged exports not yet stored" in error["message"]
        with db(client) as session:
            queued = session.scalars(select(Export.id).where(Export.status == "queued")).all()
        assert queued == [answers[0].json()["id"]]
        assert [t for t in queued_tasks(redis_url, queue_name) if t[0] == "qlora.export"] == [("qlora.export", queued)]
        # Once that export is over (failed here), its reservation is released: the next one is accepted.
        with db(client) as session:
            session.get(Export, _seq_of(session, queued[0])).status = "failed"
        assert client.post(_export_url(jobs[1]), headers=KEY_A).status_code == 200


def test_an_export_of_a_job_on_a_prequantized_base_is_refused(client, tmp_path, models_dir):
    """A GPTQ/AWQ base stores 4-bit weights: nothing 16-bit to merge into, so no merged export (a 400 saying so)."""
    import json

    done = finished_job(client, tmp_path)
    config_path = models_dir / MODEL / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128}}))
    error = assert_error(client.post(_export_url(done["job_id"]), headers=KEY_A), 400, code="unsupported_model", param="job_id")
    assert "pre-quantized (gptq)" in error["message"] and "not supported" in error["message"]
    with db(client) as session:
        assert session.scalars(select(Export.id).where(Export.status == "queued")).all() == []


def test_an_export_waits_its_projects_turn_on_the_training_queue(tmp_path, database_url, redis_url, queue_name, models_dir):
    """An export takes one of its project's places on the training queue, as a job does (core/dispatch.py): with one
    place, taken by a job sent and waiting, the export waits unsent; the job's end sends it."""
    from tests.job_ended import deliver_job_ended

    settings = make_settings(tmp_path, database_url, redis_url, queue_name, models_dir, max_running_jobs_per_project=1)
    with TestClient(create_app(settings)) as client:
        done = finished_job(client, tmp_path)
        waiting_job = create_job_ok(client, upload_ok(client)["id"])
        export = client.post(_export_url(done["job_id"]), headers=KEY_A).json()
        assert export["status"] == "queued"
        assert [t for t in queued_tasks(redis_url, queue_name) if t[0] == "qlora.export"] == []
        with db(client) as session:
            assert session.scalar(select(Export.enqueued_at).where(Export.id == export["id"])) is None
        assert client.post(f"/v1/fine_tuning/jobs/{waiting_job['id']}/cancel", headers=KEY_A).status_code == 200
        deliver_job_ended(redis_url, settings, client.app.state.session_factory, client.app.state.celery)
        assert [t for t in queued_tasks(redis_url, queue_name) if t[0] == "qlora.export"] == [("qlora.export", [export["id"]])]
        # Sent, the export holds that place: the project's next job waits for it.
        next_job = create_job_ok(client, upload_ok(client)["id"])
        with db(client) as session:
            assert session.scalar(select(Job.enqueued_at).where(Job.id == next_job["id"])) is None
