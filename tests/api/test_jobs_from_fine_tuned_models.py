"""Jobs whose `model` is a fine-tuned model: the caller's own `ft:` and checkpoint models, and checkpoint models
granted to its project (only while granted, and while the owner's model is not deleted). The job echoes the name it
was given, names its base and parent (our extension), takes the source's adapter options, and refuses a request
that asks for another shape. A job created while granted and revoked before a worker claims it fails at the claim."""

from __future__ import annotations

import openai

from api.routes.chat import find_served_model
from core import ids
from core.jobs import claim_job, succeed_job
from core.model_names import adapter_filename, fine_tuned_model_name
from core.tables import File, Job, now
from tests.api.helpers import KEY_A, KEY_B, MODEL, assert_error, create_job, create_job_ok, db, upload_ok
from tests.api.test_model_lifecycle import finished_job
from worker import runner


def sdk(client, key: str = "key-a") -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url="http://testserver/v1", http_client=client, max_retries=0,
                         _strict_response_validation=True)


def test_a_job_continues_from_the_projects_own_fine_tuned_and_checkpoint_models(client, tmp_path):
    done = finished_job(client, tmp_path)
    training = upload_ok(client)["id"]
    job = sdk(client).fine_tuning.jobs.create(model=done["model"], training_file=training, suffix="more")
    assert job.model == done["model"]  # as given, as OpenAI echoes it
    extra = job.model_extra or {}
    assert (extra["base_model"], extra["parent_model"]) == (MODEL, done["model"])
    events = [e.message for e in sdk(client).fine_tuning.jobs.list_events(job.id)]
    assert any(m.startswith(f"Continues from {done['model']}") for m in events)
    with db(client) as session:
        row = session.query(Job).filter(Job.id == job.id).one()
        source = session.query(Job).filter(Job.id == done["job_id"]).one()
        assert row.base_model == MODEL and row.trained_base == MODEL
        for name in ("lora_r", "lora_alpha", "target_modules", "quantization", "quant_type", "use_dora"):
            assert row.training_config[name] == source.training_config[name], name

    checkpoint = f"{done['model']}:ckpt-step-2"
    from_checkpoint = create_job_ok(client, training, model=checkpoint)
    assert (from_checkpoint["model"], from_checkpoint["parent_model"], from_checkpoint["base_model"]) == (checkpoint, checkpoint, MODEL)
    plain = create_job_ok(client, training)
    assert (plain["model"], plain["base_model"], plain["parent_model"]) == (MODEL, MODEL, None)

    # Succeeded, the continued job's model is named after the base, lists its parent, and is served on the base.
    name = fine_tuned_model_name(MODEL, "proj-a", "more", job.id)
    adapter = File(id=ids.file_id(), project="proj-a", filename=adapter_filename(job.id), purpose="fine-tune-results", bytes=1,
                   sha256="0" * 64, status="processed", storage_key="files/its-adapter", created_at=now())
    with db(client) as session:
        assert claim_job(session, job.id, "w") and succeed_job(session, job.id, "w", fine_tuned_model=name, trained_tokens=1,
                                                               result_files=[adapter.id])
        session.add(adapter)
    with db(client) as session:
        served = find_served_model(session, client.app.state.settings, "proj-a", name)
    assert (served.base, served.adapter_key) == (MODEL, "files/its-adapter")
    model = sdk(client).models.retrieve(name)
    assert (model.model_extra or {})["parent"] == done["model"]


def test_a_request_for_another_adapter_shape_is_a_400_naming_the_key(client, tmp_path):
    done = finished_job(client, tmp_path)
    training = upload_ok(client)["id"]
    response = create_job(client, training, model=done["model"], method={"type": "supervised", "supervised": {"hyperparameters": {"lora_r": 8}}})
    error = assert_error(response, 400, code="incompatible_with_model", param="method.supervised.hyperparameters.lora_r")
    assert done["model"] in error["message"]
    assert_error(create_job(client, training, model=done["model"], hyperparameters={"quantization": "8bit"}), 400,
                 code="incompatible_with_model", param="hyperparameters.quantization")
    # The source's own values, and options that do not shape the adapter, are fine.
    same = create_job_ok(client, training, model=done["model"], hyperparameters={"lora_r": 16, "lora_dropout": 0.0, "n_epochs": 1})
    assert same["hyperparameters"]["lora_r"] == 16 and same["hyperparameters"]["lora_dropout"] == 0.0


def test_unknown_models_are_400s_on_model(client):
    training = upload_ok(client)["id"]
    for name in ("ft:tiny-llama:proj-a::nothing", "ft:tiny-llama:proj-a::nothing:ckpt-step-2", "ft:", "gpt-4o-mini"):
        assert_error(create_job(client, training, model=name), 400, code="model_not_found", param="model")


def test_another_projects_models_and_deleted_models_are_refused(client, tmp_path):
    theirs = finished_job(client, tmp_path, headers=KEY_B)
    training = upload_ok(client)["id"]
    for name in (theirs["model"], f"{theirs['model']}:ckpt-step-2"):
        assert_error(create_job(client, training, model=name), 400, code="model_not_found", param="model")
    mine = finished_job(client, tmp_path)
    sdk(client).models.delete(mine["model"])
    for name in (mine["model"], f"{mine['model']}:ckpt-step-4"):
        assert_error(create_job(client, training, model=name), 400, code="model_not_found", param="model")


def test_a_granted_checkpoint_is_usable_by_the_granted_project_only_while_granted(client, tmp_path, settings):
    done = finished_job(client, tmp_path)
    checkpoint = f"{done['model']}:ckpt-step-4"
    theirs = upload_ok(client, headers=KEY_B)["id"]
    assert_error(create_job(client, theirs, model=checkpoint, headers=KEY_B), 400, code="model_not_found", param="model")

    granted = sdk(client).fine_tuning.checkpoints.permissions.create(checkpoint, project_ids=["proj-b"])
    job = create_job_ok(client, theirs, model=checkpoint, headers=KEY_B)
    assert (job["organization_id"], job["parent_model"], job["base_model"]) == ("proj-b", checkpoint, MODEL)
    assert_error(create_job(client, theirs, model=done["model"], headers=KEY_B), 400, code="model_not_found", param="model")

    # Revoked before a worker claims the job: the claim checks again and the job fails on `model`.
    sdk(client).fine_tuning.checkpoints.permissions.delete(granted.data[0].id, fine_tuned_model_checkpoint=checkpoint)
    assert_error(create_job(client, theirs, model=checkpoint, headers=KEY_B), 400, code="model_not_found", param="model")
    app = client.app.state
    assert runner.run_job(job["id"], settings, app.session_factory, app.storage) == runner.FAILED
    failed = client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=KEY_B).json()
    assert failed["status"] == "failed"
    assert (failed["error"]["code"], failed["error"]["param"]) == ("model_not_found", "model")
    assert "no longer granted" in failed["error"]["message"]
    assert client.get("/v1/fine_tuning/jobs", headers=KEY_A).status_code == 200
