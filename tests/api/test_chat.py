"""POST /v1/chat/completions through the API: the caller's models only, forwarded to the real embedded
inference server (on a port of its own) that loads adapters from the API's object storage by key."""

from __future__ import annotations

import threading
import time

import openai
import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from core import ids
from core.models import Checkpoint, File, Job, now
from inference.server import create_app as create_inference_app
from inference.vllm_front import create_app as create_front_app
from tests.api.conftest import make_settings
from tests.api.helpers import KEY_A, KEY_B, MODEL, assert_error, db
from tests.conftest import free_port
from tests.inference.conftest import serving, store_adapter

HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture
def models_dir(tmp_path, tiny_model_dir):
    root = tmp_path / "models"
    root.mkdir()
    (root / MODEL).symlink_to(tiny_model_dir)  # real weights: the backend loads them
    return root


@pytest.fixture
def backend(settings):
    """The inference server on the API's models and object storage, as `make run` starts it."""
    app = create_inference_app(settings.model_copy(update={"inference_max_new_tokens": 8}))
    with serving(app) as url:
        yield app, url


def api_client(tmp_path, database_url, redis_url, queue_name, models_dir, inference_url: str) -> TestClient:
    return TestClient(create_app(make_settings(tmp_path, database_url, redis_url, queue_name, models_dir, inference_url=inference_url)))


@pytest.fixture
def client(tmp_path, database_url, redis_url, queue_name, models_dir, backend):
    with api_client(tmp_path, database_url, redis_url, queue_name, models_dir, backend[1]) as test_client:
        yield test_client


def sdk(client: TestClient, key: str = "key-a") -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url="http://testserver/v1", http_client=client, max_retries=0,
                         _strict_response_validation=True)


def trained_job(client: TestClient, tmp_path, tiny_model_dir, *, project: str = "proj-a") -> tuple[str, str]:
    """A succeeded job with its adapter stored as the worker stores it, and one checkpoint with another adapter.
    Returns (fine-tuned model, checkpoint model)."""
    storage = client.app.state.storage
    assert client.get("/v1/models", headers=KEY_A if project == "proj-a" else KEY_B).status_code == 200  # makes the project
    job_id, file_id, ckpt_id = ids.job_id(), ids.file_id(), ids.checkpoint_id()
    store_adapter(tiny_model_dir, storage, f"files/{file_id}", tmp_path, seed=1)
    store_adapter(tiny_model_dir, storage, f"checkpoints/{job_id}/{ckpt_id}.tar.gz", tmp_path, seed=2)
    model = f"ft:{MODEL}:{project}:t:{job_id.removeprefix('ftjob-')}"
    with db(client) as session:
        session.add(Job(id=job_id, project=project, model=MODEL, training_file="file-x", hyperparameters={}, training_config={"seed": 1},
                        status="succeeded", fine_tuned_model=model, result_files=[file_id], created_at=now(), finished_at=now()))
        session.flush()
        session.add(File(id=file_id, project=project, filename=f"{job_id}-adapter.tar.gz", purpose="fine-tune-results", bytes=1,
                         sha256="0" * 64, status="processed", storage_key=f"files/{file_id}", created_at=now()))
        session.add(Checkpoint(id=ckpt_id, job_id=job_id, step=2, metrics={}, storage_key=f"checkpoints/{job_id}/{ckpt_id}.tar.gz",
                               fine_tuned_model_checkpoint=f"{model}:ckpt-step-2", created_at=now()))
    return model, f"{model}:ckpt-step-2"


def answer(client: openai.OpenAI, model: str, **kwargs) -> str:
    done = client.chat.completions.create(model=model, messages=HELLO, temperature=0, max_tokens=8, **kwargs)
    assert done.model == model and done.usage.completion_tokens > 0 and done.object == "chat.completion"
    return done.choices[0].message.content


def test_base_fine_tuned_and_checkpoint_models_answer(client, tmp_path, tiny_model_dir, backend):
    model, checkpoint = trained_job(client, tmp_path, tiny_model_dir)
    a = sdk(client)
    base, tuned, at_step_2 = answer(a, MODEL), answer(a, model), answer(a, checkpoint)
    assert len({base, tuned, at_step_2}) == 3  # three different weights, three different greedy answers
    assert set(backend[0].state.engine.served) == {model, checkpoint}  # loaded on first use, by storage key
    assert answer(a, model) == tuned  # the second request finds it loaded

    # Streamed through the API, chunk by chunk, with the usage chunk last.
    chunks = list(a.chat.completions.create(model=model, messages=HELLO, temperature=0, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == tuned
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0 and all(c.model == model for c in chunks)

    # The developer role and text parts are accepted as OpenAI sends them.
    parts = a.chat.completions.create(model=MODEL, temperature=0, max_completion_tokens=8, messages=[
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hello there"}]}])
    assert parts.choices[0].message.content


def test_only_the_callers_live_models(client, tmp_path, tiny_model_dir, backend):
    model, checkpoint = trained_job(client, tmp_path, tiny_model_dir)
    for name in (model, checkpoint, "ft:nope", "../etc", MODEL + "x"):
        with pytest.raises(openai.NotFoundError) as err:
            sdk(client, "key-b").chat.completions.create(model=name, messages=HELLO)
        assert (err.value.code, err.value.param) == ("model_not_found", "model")
    answer(sdk(client), model), answer(sdk(client), checkpoint)
    assert set(backend[0].state.engine.served) == {model, checkpoint}
    assert sdk(client).models.delete(model).deleted
    for name in (model, checkpoint):
        with pytest.raises(openai.NotFoundError):
            sdk(client).chat.completions.create(model=name, messages=HELLO)
    assert backend[0].state.engine.served == {}  # the backend dropped both on the delete


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the forwarding, not the database, is under test
@pytest.mark.parametrize(("body", "param", "code"), [
    ({"frequency_penalty": 0.5}, "frequency_penalty", "unknown_parameter"),
    ({"logprobs": True}, "logprobs", "unknown_parameter"),
    ({"tools": []}, "tools", "unknown_parameter"),
    ({"n": 2}, "n", "invalid_value"),
    ({"temperature": 3}, "temperature", "invalid_value"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
    ({"stream_options": {"include_usage": True}}, None, "invalid_value"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role", "invalid_value"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, None, None),
    ({"messages": []}, "messages", "invalid_value"),
])
def test_unsupported_parameters_are_refused_by_name(client, body, param, code):
    response = client.post("/v1/chat/completions", headers=KEY_A, json={"model": MODEL, "messages": HELLO, **body})
    error = response.json()["error"]
    assert response.status_code == 400, response.text
    if param is not None:
        assert (error["param"], error["code"]) == (param, code)
    else:
        assert error["param"] is None or error["param"].startswith("messages")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the forwarding, not the database, is under test
def test_a_backend_that_is_down_or_busy_is_a_503_to_retry(tmp_path, database_url, redis_url, queue_name, models_dir, backend):
    for url in (f"http://127.0.0.1:{free_port()}", ""):
        with api_client(tmp_path, database_url, redis_url, queue_name, models_dir, url) as down:
            started = time.monotonic()
            response = down.post("/v1/chat/completions", headers=KEY_A, json={"model": MODEL, "messages": HELLO})
            assert time.monotonic() - started < 10
            assert_error(response, 503, code="inference_unavailable", type="server_error")
            assert response.headers["x-should-retry"] == "true"

    app, url = backend
    with api_client(tmp_path, database_url, redis_url, queue_name, models_dir, url) as client:
        client.post("/v1/chat/completions", headers=KEY_A, json={"model": MODEL, "messages": HELLO, "max_tokens": 1})  # base loaded
        engine = app.state.engine
        engine._generating.acquire()  # a long generation holds the backend ...
        waiting = []
        try:
            for _ in range(app.state.admitted_limit):  # ... and the waiting line is full
                thread = threading.Thread(target=lambda: client.post(
                    "/v1/chat/completions", headers=KEY_A, json={"model": MODEL, "messages": HELLO, "max_tokens": 1}))
                thread.start()
                waiting.append(thread)
            deadline = time.monotonic() + 10
            while app.state.admitted() < app.state.admitted_limit and time.monotonic() < deadline:
                time.sleep(0.02)
            response = client.post("/v1/chat/completions", headers=KEY_A, json={"model": MODEL, "messages": HELLO})
            assert_error(response, 503, code="inference_unavailable", type="server_error")
            assert response.headers["x-should-retry"] == "true"
        finally:
            engine._generating.release()
        for thread in waiting:
            thread.join(30)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the forwarding, not the database, is under test
def test_the_vllm_front_hands_vllm_an_unpacked_directory(tmp_path, database_url, redis_url, queue_name, models_dir, tiny_model_dir):
    """inference/vllm_front.py between the API and an OpenAI server that loads adapters from local directories, as
    vLLM does. vLLM needs a GPU; the embedded server stands in for it, taking the directory the front unpacked
    (vLLM's `lora_path`) instead of an object key."""
    settings = make_settings(tmp_path, database_url, redis_url, queue_name, models_dir)
    shared = tmp_path / "adapters"  # the volume the front and vLLM share
    upstream_app = create_inference_app(settings.model_copy(update={"inference_max_new_tokens": 8}))
    with serving(upstream_app) as upstream, serving(create_front_app(upstream, shared, settings)) as front:
        with TestClient(create_app(settings.model_copy(update={"inference_url": front}))) as client:
            model, _ = trained_job(client, tmp_path, tiny_model_dir)
            sdk = openai.OpenAI(api_key="key-a", base_url="http://testserver/v1", http_client=client, max_retries=0,
                                _strict_response_validation=True)
            reply = sdk.chat.completions.create(model=model, messages=HELLO, temperature=0, max_tokens=6)
            engine = upstream_app.state.engine
            loaded_from = engine.keys[model]
            assert loaded_from.startswith(str(shared)) and (shared / loaded_from.split("/")[-1] / "adapter_config.json").is_file()
            assert reply.model == model and reply.choices[0].message.content
            assert reply.choices[0].message.content != sdk.chat.completions.create(
                model=MODEL, messages=HELLO, temperature=0, max_tokens=6).choices[0].message.content
            chunks = list(sdk.chat.completions.create(model=model, messages=HELLO, temperature=0, max_tokens=6, stream=True))
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content

            assert sdk.models.delete(model).deleted  # the API unloads through the front, which deletes the copy
            assert model not in engine.served and not any(shared.iterdir())


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the forwarding, not the database, is under test
def test_the_request_id_goes_on_to_the_backend(tmp_path, database_url, redis_url, queue_name, models_dir, settings):
    """The backend (the real inference server, its requests recorded on the way in) gets the caller's x-request-id, so
    its log lines for the request carry the same id as the API's."""
    seen: list[tuple[str, str]] = []
    inner = create_inference_app(settings.model_copy(update={"inference_max_new_tokens": 2}))

    async def recording(scope, receive, send):  # noqa: ANN001, ANN202
        if scope["type"] == "http":
            seen.append((scope["path"], dict(scope["headers"]).get(b"x-request-id", b"").decode()))
        await inner(scope, receive, send)

    with serving(recording) as url, api_client(tmp_path, database_url, redis_url, queue_name, models_dir, url) as client:
        answer = client.post("/v1/chat/completions", headers={**KEY_A, "x-request-id": "req-chat-1"},
                             json={"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]})
        assert answer.status_code == 200, answer.text
    assert ("/v1/chat/completions", "req-chat-1") in seen
