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
from core.storage import make_storage
from core.tables import Checkpoint, File, Job, now
from inference.engine import ChatEngine
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
            for i in range(app.state.admitted_limit):  # ... and the waiting line is full (two projects: each has a share)
                thread = threading.Thread(target=lambda key=(KEY_A, KEY_B)[i % 2]: client.post(
                    "/v1/chat/completions", headers=key, json={"model": MODEL, "messages": HELLO, "max_tokens": 1}))
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
    upstream_settings = settings.model_copy(update={"inference_max_new_tokens": 8})
    upstream_app = create_inference_app(upstream_settings, ChatEngine(  # vLLM's way: adapters by directory, in the shared one only
        models_dir, make_storage(settings), tmp_path / "cache", max_new_tokens=8, local_adapter_root=shared))
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


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the forwarding, not the database, is under test
def test_out_of_range_requests_are_the_callers_400(client):
    """Issue 20, defects 5 and 9: a seed past 64 bits used to reach torch as a 500 (a 503 the SDK retries forever);
    max_tokens above QLORA_CHAT_MAX_TOKENS is refused by the API, whatever the backend would do."""
    for body, param in (({"seed": 2**64}, "seed"), ({"seed": -(2**63) - 1}, "seed"), ({"max_tokens": 4097}, "max_tokens"),
                        ({"max_completion_tokens": 4097}, "max_completion_tokens")):
        response = client.post("/v1/chat/completions", headers=KEY_A, json={"model": MODEL, "messages": HELLO, **body})
        assert_error(response, 400, param=param, code="invalid_value")
        assert response.headers["x-should-retry"] == "false"  # not retried: it cannot succeed


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_deleting_a_model_deletes_its_unpacked_copies(tmp_path, database_url, redis_url, queue_name, models_dir, settings, tiny_model_dir):
    """Issue 20, defect 8: the backend keeps one adapter attached here, so the model's adapter is dropped by the LRU
    when its checkpoint's is attached; deleting the model still deletes both unpacked copies, by key."""
    backend_app = create_inference_app(settings.model_copy(update={"inference_max_adapters": 1, "inference_max_new_tokens": 2}))
    cache = settings.home / "inference-cache"
    with serving(backend_app) as url, api_client(tmp_path, database_url, redis_url, queue_name, models_dir, url) as client:
        model, checkpoint = trained_job(client, tmp_path, tiny_model_dir)
        answer(sdk(client), model), answer(sdk(client), checkpoint)
        assert set(backend_app.state.engine.served) == {checkpoint} and len([d for d in cache.iterdir() if d.is_dir()]) == 2
        assert sdk(client).models.delete(model).deleted
        assert [d.name for d in cache.iterdir()] == []


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the forwarding, not the database, is under test
def test_fifty_streams_from_two_projects_half_abandoned(tmp_path, database_url, redis_url, queue_name, models_dir, settings):
    """Issue 20's load test, on loopback: 50 streamed chats at once through the API, 25 per project, while the engine
    is busy. Each project gets its share of the backend's line (10 of 24 places; the rest a 429 to retry); then half
    of the clients close their socket mid-stream. The others get their whole answer, every place comes back, and a
    plain chat is answered at once."""
    import httpx

    backend_app = create_inference_app(settings.model_copy(update={
        "inference_max_waiting": 24, "inference_max_waiting_per_project": 10, "inference_max_new_tokens": 3}))
    engine = backend_app.state.engine
    started, go = threading.Barrier(51, timeout=60), threading.Event()
    status: dict[int, int] = {}
    outcome: dict[int, tuple[str, int, str]] = {}  # index -> (project, status, how it ended)
    leaves = [i % 4 < 2 for i in range(50)]  # half the clients close their socket mid-stream

    def chat(i: int, url: str) -> None:
        project, key = ("proj-a", "key-a") if i % 2 else ("proj-b", "key-b")
        with httpx.Client(base_url=url, timeout=60) as http, http.stream("POST", "/v1/chat/completions", headers={
                "authorization": f"Bearer {key}"}, json={"model": MODEL, "messages": HELLO, "max_tokens": 3, "stream": True}) as response:
            lines = response.iter_lines()
            if response.status_code == 200:
                assert next(line for line in lines if line.startswith("data: "))  # the first chunk: the stream is on
            else:
                response.read()
            status[i] = response.status_code
            started.wait()
            go.wait(60)
            if response.status_code != 200:
                outcome[i] = (project, response.status_code, response.json()["error"]["code"])
            elif leaves[i]:
                outcome[i] = (project, 200, "left")  # leaves mid-stream: the socket closes with the block
            else:
                outcome[i] = (project, 200, [line for line in lines if line.startswith("data: ")][-1])

    with serving(backend_app) as backend_url:
        with serving(create_app(settings.model_copy(update={"inference_url": backend_url}))) as api_url:
            with httpx.Client(base_url=api_url, headers=KEY_A, timeout=60) as plain:  # the base loaded, before the engine is held
                assert plain.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "max_tokens": 1}).status_code == 200
            engine._generating.acquire()  # a long generation in progress: every stream waits in line
            threads = [threading.Thread(target=chat, args=(i, api_url), daemon=True) for i in range(50)]
            try:
                for thread in threads:
                    thread.start()
                started.wait()  # every client has its status (and a stream its first chunk)
                assert backend_app.state.line.by_project == {"proj-a": 10, "proj-b": 10}
                go.set()  # the leavers close their sockets, while the engine is still busy
                staying = sum(1 for i, code in status.items() if code == 200 and not leaves[i])
                deadline = time.monotonic() + 30
                while backend_app.state.admitted() > staying and time.monotonic() < deadline:  # the leavers' places come back
                    time.sleep(0.02)
                assert backend_app.state.admitted() == staying, backend_app.state.line.by_project
            finally:
                go.set()
                engine._generating.release()
            for thread in threads:
                thread.join(60)
            assert len(outcome) == 50
            for project in ("proj-a", "proj-b"):
                mine = {i: o for i, o in outcome.items() if o[0] == project}
                assert {(code, end) for _, code, end in mine.values() if code != 200} == {(429, "rate_limit_exceeded")}
                served = {i: end for i, (_, code, end) in mine.items() if code == 200}
                assert len(served) == 10, mine  # its share of the line, whatever the other project did
                assert all(end == ("left" if leaves[i] else "data: [DONE]") for i, end in served.items()), served
            # A stream's place comes back when the server closes it, just after its client has read [DONE].
            deadline = time.monotonic() + 5
            while backend_app.state.admitted() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert backend_app.state.admitted() == 0
            with httpx.Client(base_url=api_url, headers=KEY_B, timeout=60) as plain:
                reply = plain.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "max_tokens": 2})
                assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] is not None
