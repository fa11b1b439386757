"""/v1/models: base models from the models directory, fine-tuned models of the caller's succeeded jobs."""

from __future__ import annotations

import json

from core.jobs import claim_job, succeed_job
from core.model_names import fine_tuned_model_name
from tests.api.helpers import KEY_A, KEY_B, MODEL, TINY_LLAMA_CONFIG, assert_error, create_job_ok, db, upload_ok


def succeeded_job(client, headers=KEY_A) -> str:
    """A job taken through the state machine as a worker would, to succeeded; returns its fine-tuned model."""
    job = create_job_ok(client, upload_ok(client, headers=headers)["id"], headers=headers, suffix="s1")
    name = fine_tuned_model_name(job["model"], job["organization_id"], "s1", job["id"])
    with db(client) as session:
        assert claim_job(session, job["id"], "worker-1")
        assert succeed_job(session, job["id"], "worker-1", fine_tuned_model=name, trained_tokens=1234, result_files=[])
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=headers).json()["fine_tuned_model"] == name
    return name


def test_list_and_retrieve_models(client, models_dir):
    (models_dir / "another-base").mkdir()
    (models_dir / "another-base" / "config.json").write_text(json.dumps(TINY_LLAMA_CONFIG))
    (models_dir / "no-config").mkdir()  # not a model
    create_job_ok(client, upload_ok(client)["id"])  # queued: no model yet
    mine = succeeded_job(client, KEY_A)
    theirs = succeeded_job(client, KEY_B)

    listed = client.get("/v1/models", headers=KEY_A).json()
    assert listed["object"] == "list"
    by_id = {m["id"]: m for m in listed["data"]}
    assert list(by_id) == ["another-base", MODEL, mine]
    assert by_id[MODEL] == {"id": MODEL, "object": "model", "created": int((models_dir / MODEL).stat().st_mtime), "owned_by": "system",
                            "quantization": None, "parent": None}
    assert by_id[mine]["owned_by"] == "proj-a" and by_id[mine]["object"] == "model" and by_id[mine]["parent"] == MODEL
    assert mine.startswith("ft:tiny-llama:proj-a:s1:")

    assert client.get(f"/v1/models/{MODEL}", headers=KEY_A).json() == by_id[MODEL]
    assert client.get(f"/v1/models/{mine}", headers=KEY_A).json() == by_id[mine]
    assert client.get(f"/v1/models/{theirs}", headers=KEY_B).json()["owned_by"] == "proj-b"
    assert_error(client.get(f"/v1/models/{theirs}", headers=KEY_A), 404, code="model_not_found", param="model")
    assert_error(client.get("/v1/models/no-config", headers=KEY_A), 404, code="model_not_found", param="model")
    assert_error(client.get("/v1/models/nothing/here", headers=KEY_A), 404, code="model_not_found", param="model")
    assert_error(client.get("/v1/models/..%2Fmodels%2Ftiny-llama", headers=KEY_A), 404, code="model_not_found", param="model")
