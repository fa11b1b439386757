"""Checkpoint permissions (POST/GET /v1/fine_tuning/checkpoints/{name}/permissions, DELETE .../{id}) through the
official SDK, and what they allow: project B chats with project A's checkpoint model only while it is granted and
the model is not deleted.

The inference backend here answers any model it was given an adapter for and records the adapter keys: what is under
test is the API's decision which model reaches the backend with which adapter (tests/api/test_chat.py runs the real
inference server)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from api.routes.chat import InferenceClient
from tests.api.conftest import make_settings
from tests.api.helpers import KEY_A, KEY_B, assert_error
from tests.api.test_model_lifecycle import finished_job


class Backend:
    """The inference protocol in miniature: 404 for a model without a loaded adapter, else a fixed answer."""

    def __init__(self) -> None:
        self.loaded: dict[str, str] = {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if request.url.path == "/v1/load_lora_adapter":
            self.loaded[body["lora_name"]] = body["lora_path"]
            return httpx.Response(200, json={})
        if request.url.path == "/v1/unload_lora_adapter":
            self.loaded.pop(body["lora_name"], None)
            return httpx.Response(200, json={})
        if body["model"] not in self.loaded:
            return httpx.Response(404, json={"error": {"message": "not served"}})
        return httpx.Response(200, json={
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hi"}}]})


@pytest.fixture
def backend() -> Backend:
    return Backend()


@pytest.fixture
def client(tmp_path, database_url, redis_url, queue_name, models_dir, backend):
    settings = make_settings(tmp_path, database_url, redis_url, queue_name, models_dir, inference_url="http://backend",
                             api_keys="key-a=proj-a,key-b=proj-b,key-c=proj-c")
    app = create_app(settings)
    app.state.inference = InferenceClient(settings, transport=httpx.MockTransport(backend))
    with TestClient(app) as test_client:
        yield test_client


def sdk(client, key: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url="http://testserver/v1", http_client=client, max_retries=0,
                         _strict_response_validation=True)


def chat(client, headers, model: str) -> httpx.Response:
    return client.post("/v1/chat/completions", headers=headers, json={"model": model, "messages": [{"role": "user", "content": "Hi"}]})


def test_project_b_uses_a_checkpoint_of_project_a_only_while_granted(client, tmp_path, backend):
    done = finished_job(client, tmp_path)
    checkpoint = f"{done['model']}:ckpt-step-4"
    owner, other = sdk(client, "key-a"), sdk(client, "key-b")
    assert_error(chat(client, KEY_B, checkpoint), 404, code="model_not_found", param="model")

    granted = owner.fine_tuning.checkpoints.permissions.create(checkpoint, project_ids=["proj-b", "proj-c"])
    assert [p.project_id for p in granted.data] == ["proj-b", "proj-c"]
    assert all(p.object == "checkpoint.permission" and p.id.startswith("cp_") for p in granted.data)
    again = owner.fine_tuning.checkpoints.permissions.create(checkpoint, project_ids=["proj-b"])
    assert again.data[0].id == granted.data[0].id  # granting twice is the same permission
    listed = owner.fine_tuning.checkpoints.permissions.list(checkpoint, limit=1)
    assert [p.project_id for p in listed] == ["proj-c", "proj-b"]  # newest first, over two pages
    assert [p.id for p in owner.fine_tuning.checkpoints.permissions.list(checkpoint, project_id="proj-b")] == [granted.data[0].id]

    answer = other.chat.completions.create(model=checkpoint, messages=[{"role": "user", "content": "Hi"}])
    assert answer.choices[0].message.content == "hi"
    assert backend.loaded[checkpoint] == done["ckpt_keys"][1]  # project A's checkpoint archive
    # The grant is for that checkpoint only, and B cannot manage it.
    assert_error(chat(client, KEY_B, f"{done['model']}:ckpt-step-2"), 404, code="model_not_found", param="model")
    assert_error(chat(client, KEY_B, done["model"]), 404, code="model_not_found", param="model")
    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.checkpoints.permissions.create(checkpoint, project_ids=["proj-b"])

    deleted = owner.fine_tuning.checkpoints.permissions.delete(granted.data[0].id, fine_tuned_model_checkpoint=checkpoint)
    assert (deleted.id, deleted.deleted, deleted.object) == (granted.data[0].id, True, "checkpoint.permission")
    # Revoked: refused at once, though the backend still holds the adapter.
    assert checkpoint in backend.loaded
    assert_error(chat(client, KEY_B, checkpoint), 404, code="model_not_found", param="model")
    assert chat(client, {"Authorization": "Bearer key-c"}, checkpoint).status_code == 200
    # Deleting the model ends every grant at once.
    owner.models.delete(done["model"])
    assert_error(chat(client, {"Authorization": "Bearer key-c"}, checkpoint), 404, code="model_not_found", param="model")
    with pytest.raises(openai.NotFoundError):
        owner.fine_tuning.checkpoints.permissions.list(checkpoint)


def test_bad_permission_requests(client, tmp_path):
    done = finished_job(client, tmp_path)
    checkpoint = f"{done['model']}:ckpt-step-2"
    path = f"/v1/fine_tuning/checkpoints/{checkpoint}/permissions"
    assert_error(client.post(path, json={"project_ids": ["proj-x"]}, headers=KEY_A), 400, code="invalid_value", param="project_ids[0]")
    assert_error(client.post(path, json={"project_ids": ["proj-b", "proj-a"]}, headers=KEY_A), 400, code="invalid_value",
                 param="project_ids[1]")
    assert client.get(path, headers=KEY_A).json()["data"] == []  # nothing half-stored
    assert_error(client.delete(f"{path}/cp_nothing", headers=KEY_A), 404, code="permission_not_found", param="permission_id")
    assert_error(client.get("/v1/fine_tuning/checkpoints/ft:none:proj-a::x:ckpt-step-1/permissions", headers=KEY_A), 404,
                 code="model_not_found", param="fine_tuned_model_checkpoint")


def test_an_empty_grant_is_refused(client, tmp_path):
    done = finished_job(client, tmp_path)
    path = f"/v1/fine_tuning/checkpoints/{done['model']}:ckpt-step-2/permissions"
    assert client.post(path, json={"project_ids": []}, headers=KEY_A).status_code == 400


def test_a_granted_checkpoint_is_in_the_granted_projects_models_while_it_lasts(client, tmp_path):
    """GET /v1/models of a granted project lists the checkpoint model, owned_by the owning project (OpenAI: the owning
    organization); a revoke removes it for that project only, a deletion of the owner's model for every project."""
    done = finished_job(client, tmp_path)
    checkpoint = f"{done['model']}:ckpt-step-4"
    owner, b, c = sdk(client, "key-a"), sdk(client, "key-b"), sdk(client, "key-c")

    def listed(project: openai.OpenAI) -> list[str]:
        return [m.id for m in project.models.list()]

    assert checkpoint not in listed(b)
    with pytest.raises(openai.NotFoundError):
        b.models.retrieve(checkpoint)
    granted = owner.fine_tuning.checkpoints.permissions.create(checkpoint, project_ids=["proj-b", "proj-c"])
    for project in (b, c):
        assert listed(project).count(checkpoint) == 1
        model = project.models.retrieve(checkpoint)
        assert (model.id, model.object, model.owned_by) == (checkpoint, "model", "proj-a")
        assert model.created > 0
    # Only that checkpoint: not the job's model nor its other checkpoint, and the owner's own list is unchanged.
    assert done["model"] not in listed(b) and f"{done['model']}:ckpt-step-2" not in listed(b)
    assert checkpoint not in listed(owner) and done["model"] in listed(owner)
    with pytest.raises(openai.NotFoundError):  # listed is not owned: B cannot delete it
        b.models.delete(checkpoint)

    owner.fine_tuning.checkpoints.permissions.delete(granted.data[0].id, fine_tuned_model_checkpoint=checkpoint)
    assert checkpoint not in listed(b)
    with pytest.raises(openai.NotFoundError):
        b.models.retrieve(checkpoint)
    assert checkpoint in listed(c)  # C's grant stands

    owner.models.delete(done["model"])
    assert checkpoint not in listed(c)
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve(checkpoint)
