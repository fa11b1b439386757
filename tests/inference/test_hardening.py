"""The inference backends under abuse (issue 20): callers that go away, callers without the secret, callers that
name paths, one project flooding the line, more bases and adapters than fit, concurrent fetches of one adapter.
Each fault is caused for real on a served app: sockets closed mid-request, requests sent without the secret."""

from __future__ import annotations

import json
import socket
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from contract.adapter import ADAPTER_FILES
from core.settings import Settings
from core.storage import LocalStorage
from inference.adapters import cached_path, fetch_adapter
from inference.engine import ChatEngine, GenerationCancelled
from inference.server import create_app
from inference.vllm_front import create_app as create_front_app
from tests.inference.conftest import BASE, serving, store_adapter

QUESTION = [{"role": "user", "content": "Name a colour."}]


class RecordingEngine(ChatEngine):
    """The real engine, recording how each generate() call was asked to stop and how it ended."""

    def __init__(self, *args, **kwargs):  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.calls: list[dict] = []

    def generate(self, prepared, on_text=None, cancelled=None):  # noqa: ANN001, ANN201
        call = {"cancelled": cancelled}
        self.calls.append(call)
        try:
            call["result"] = super().generate(prepared, on_text, cancelled)
        except GenerationCancelled:
            call["result"] = "cancelled"
            raise
        return call["result"]


def settings_for(tmp_path, models_root, **overrides) -> Settings:
    return Settings(home=tmp_path / "home", models_dir=models_root, storage="local", storage_dir=tmp_path / "objects", **overrides)


def engine_for(models_root, storage, tmp_path, cls: type[ChatEngine] = ChatEngine, **kwargs) -> ChatEngine:
    return cls(models_root, storage, tmp_path / "cache", dtype="fp32", max_new_tokens=4, **kwargs)


def authed(app, settings: Settings) -> TestClient:  # noqa: ANN001
    return TestClient(app, headers={"authorization": f"Bearer {settings.inference_secret_value()}"})


def raw_post(url: str, path: str, body: dict, headers: dict[str, str]) -> socket.socket:
    """Send a POST on a socket of our own and return the socket, unread: the test closes it when it likes."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=10)
    head = "".join(f"{k}: {v}\r\n" for k, v in {"host": host, "content-type": "application/json", "content-length": str(len(payload)),
                                                 **headers}.items())
    sock.sendall(f"POST {path} HTTP/1.1\r\n{head}\r\n".encode() + payload)
    return sock


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    seen = b""
    while marker not in seen:
        piece = sock.recv(4096)
        assert piece, f"closed before {marker!r}: {seen!r}"
        seen += piece
    return seen


def test_abandoned_streams_give_their_places_back(tmp_path, models_root, storage):
    """Defect 1: with two places in the line, two streams whose clients close the socket (one while it waits its
    turn, the engine busy) used to keep both places for good: every later chat was a 503."""
    settings = settings_for(tmp_path, models_root, inference_max_waiting=2)
    engine = engine_for(models_root, storage, tmp_path, RecordingEngine)
    app = create_app(settings, engine)
    auth = {"authorization": f"Bearer {settings.inference_secret_value()}"}
    with serving(app) as url:
        with authed(app, settings) as client:
            assert client.post("/v1/chat/completions", json={"model": BASE, "messages": QUESTION, "max_tokens": 1}).status_code == 200
        engine._generating.acquire()  # a long generation holds the engine: both streams wait in line
        try:
            sockets = [raw_post(url, "/v1/chat/completions", {"model": BASE, "messages": QUESTION, "stream": True, "max_tokens": 4},
                                auth) for _ in range(2)]
            for sock in sockets:
                read_until(sock, b"data: ")  # the stream has begun (its first chunk, the role)
            assert app.state.admitted() == 2
            for sock in sockets:
                sock.close()
            # Both leave the line while the engine is still busy: they never generate.
            wait_until(lambda: app.state.admitted() == 0, "the abandoned streams to give their places back")
        finally:
            engine._generating.release()
        wait_until(lambda: len(engine.calls) == 3 and all("result" in c for c in engine.calls), "the generations to end")
        assert [c["result"] for c in engine.calls[1:]] == ["cancelled", "cancelled"]
        with authed(app, settings) as client:
            assert client.post("/v1/chat/completions", json={"model": BASE, "messages": QUESTION, "max_tokens": 2}).status_code == 200


def test_a_non_streamed_request_whose_caller_left_is_not_generated(tmp_path, models_root, storage):
    """Defect 1: a caller that gives up on a plain request (the API's timeout, a client's Ctrl-C) used to have its
    answer generated anyway, after everything queued before it."""
    settings = settings_for(tmp_path, models_root)
    engine = engine_for(models_root, storage, tmp_path, RecordingEngine)
    app = create_app(settings, engine)
    with serving(app) as url:
        with authed(app, settings) as client:
            assert client.post("/v1/chat/completions", json={"model": BASE, "messages": QUESTION, "max_tokens": 1}).status_code == 200
        engine._generating.acquire()
        try:
            sock = raw_post(url, "/v1/chat/completions", {"model": BASE, "messages": QUESTION, "max_tokens": 4},
                            {"authorization": f"Bearer {settings.inference_secret_value()}"})
            wait_until(lambda: len(engine.calls) == 2, "the request to wait for its turn")
            sock.close()
            wait_until(lambda: engine.calls[1]["cancelled"] is not None and engine.calls[1]["cancelled"].is_set(),
                       "the server to see the caller go")
        finally:
            engine._generating.release()
        wait_until(lambda: "result" in engine.calls[1], "the request to end")
        assert engine.calls[1]["result"] == "cancelled"
        wait_until(lambda: app.state.admitted() == 0, "its place in the line back")


def test_the_backends_answer_only_the_secret(tmp_path, models_root, storage):
    """Defect 6: without the shared secret nothing but /health answers, on the embedded server and the vLLM front
    (which passes the secret on to vLLM, as its --api-key)."""
    settings = settings_for(tmp_path, models_root)
    upstream = create_app(settings, engine_for(models_root, storage, tmp_path))
    with serving(upstream) as upstream_url, serving(create_front_app(upstream_url, tmp_path / "shared", settings)) as front_url:
        for url in (upstream_url, front_url):
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": settings.inference_secret_value()}):
                with _client(url) as client:
                    routes = [("GET", "/v1/models", None)] if url == upstream_url else []  # the front has no /v1/models
                    for method, path, body in (*routes, ("POST", "/v1/chat/completions", {"model": BASE, "messages": QUESTION}),
                                               ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "files/x", "base_model_name": BASE}),
                                               ("POST", "/v1/unload_lora_adapter", {"lora_name": "x"})):
                        response = client.request(method, path, json=body, headers=headers)
                        assert response.status_code == 401, (url, path, response.text)
                        assert response.json()["error"]["code"] == "invalid_api_key"
                    assert client.get("/health").status_code == 200
        with _client(front_url, settings) as front:  # with the secret, through the front to the server: it answers
            reply = front.post("/v1/chat/completions", json={"model": BASE, "messages": QUESTION, "max_tokens": 2})
            assert reply.status_code == 200, reply.text


def _client(url: str, settings: Settings | None = None):  # noqa: ANN202
    import httpx

    headers = {"authorization": f"Bearer {settings.inference_secret_value()}"} if settings else {}
    return httpx.Client(base_url=url, headers=headers, timeout=30)


@pytest.mark.parametrize("path", ["/etc", "../home/api_key", "files/../../home/api_key", "files/..", "checkpoints/a/../../x",
                                  "models/tiny-llama", "", "files/a\x00b"])
def test_callers_name_adapters_by_object_key_only(tmp_path, models_root, storage, tiny_model_dir, path):
    """Defects 6 and 9: an absolute path (even to a real adapter), a key with `..` or outside files/ and checkpoints/
    is a 400 naming lora_path, on load and on unload; never a 500, never a file read."""
    settings = settings_for(tmp_path, models_root)
    adapter = store_adapter(tiny_model_dir, storage, "files/file-a", tmp_path, seed=1)
    with authed(create_app(settings, engine_for(models_root, storage, tmp_path)), settings) as client:
        for name in (path, str(adapter)):
            response = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": name, "base_model_name": BASE})
            assert response.status_code == 400, response.text
            assert (response.json()["error"]["param"], response.json()["error"]["code"]) == ("lora_path", "invalid_adapter")
        response = client.post("/v1/unload_lora_adapter", json={"lora_name": "x", "lora_path": path})
        assert response.status_code == 400 and response.json()["error"]["param"] == "lora_path"
        assert (tmp_path / "home").is_dir() and tiny_model_dir.is_dir()


def test_resource_ceilings(tmp_path, models_root, storage, tiny_model_dir):
    """Defect 5: max_tokens above QLORA_CHAT_MAX_TOKENS is a 400 naming it; at most QLORA_INFERENCE_MAX_BASES bases
    stay loaded; a seed past 64 bits is a 400 naming seed (defect 9), not a 500 from torch."""
    (models_root / "other-llama").symlink_to(tiny_model_dir)
    settings = settings_for(tmp_path, models_root, chat_max_tokens=8)
    engine = engine_for(models_root, storage, tmp_path, max_bases=1)
    with authed(create_app(settings, engine), settings) as client:
        for limit in ("max_tokens", "max_completion_tokens"):
            response = client.post("/v1/chat/completions", json={"model": BASE, "messages": QUESTION, limit: 9})
            assert response.status_code == 400 and (response.json()["error"]["param"], response.json()["error"]["code"]) == (limit, "invalid_value")
        for seed in (2**64, -(2**63) - 1):
            response = client.post("/v1/chat/completions", json={"model": BASE, "messages": QUESTION, "seed": seed, "max_tokens": 1})
            assert response.status_code == 400 and response.json()["error"]["param"] == "seed", response.text
        assert client.post("/v1/chat/completions", json={"model": BASE, "messages": QUESTION, "max_tokens": 8,
                                                        "seed": 2**63 - 1}).status_code == 200
        first = engine.bases[BASE].model
        assert client.post("/v1/chat/completions", json={"model": "other-llama", "messages": QUESTION, "max_tokens": 1}).status_code == 200
        assert list(engine.bases) == ["other-llama"]  # the least recently used base went
        assert client.post("/v1/chat/completions", json={"model": BASE, "messages": QUESTION, "max_tokens": 1}).status_code == 200
        assert list(engine.bases) == [BASE] and engine.bases[BASE].model is not first  # loaded again


def test_each_project_has_a_share_of_the_line(tmp_path, models_root, storage):
    """Defect 5: one project (the x-qlora-project header the API sets) may hold at most its share of the line; past
    it its requests get a 429 to retry, while another project still gets in."""
    settings = settings_for(tmp_path, models_root, inference_max_waiting=6, inference_max_waiting_per_project=2)
    engine = engine_for(models_root, storage, tmp_path)
    app = create_app(settings, engine)
    with authed(app, settings) as client:
        assert client.post("/v1/chat/completions", json={"model": BASE, "messages": QUESTION, "max_tokens": 1}).status_code == 200
        statuses: list[int] = []

        def ask(project: str) -> None:
            statuses.append(client.post("/v1/chat/completions", headers={"x-qlora-project": project},
                                        json={"model": BASE, "messages": QUESTION, "max_tokens": 1}).status_code)

        engine._generating.acquire()
        try:
            flood = [threading.Thread(target=ask, args=("greedy",)) for _ in range(2)]
            for thread in flood:
                thread.start()
            wait_until(lambda: app.state.line.by_project["greedy"] == 2, "the flood to fill its share")
            probe: list = []  # in a thread: admitted, it would wait for the engine the test holds
            threading.Thread(target=lambda: probe.append(client.post("/v1/chat/completions", headers={"x-qlora-project": "greedy"},
                             json={"model": BASE, "messages": QUESTION, "max_tokens": 1})), daemon=True).start()
            wait_until(lambda: probe or app.state.line.by_project["greedy"] > 2, "the third request's answer")
            assert probe, "a third request of the same project got into the line"
            refused = probe[0]
            assert refused.status_code == 429 and refused.headers["x-should-retry"] == "true"
            assert refused.json()["error"]["code"] == "rate_limit_exceeded"
            other = threading.Thread(target=ask, args=("modest",))
            other.start()
            wait_until(lambda: app.state.line.by_project["modest"] == 1, "the other project to get in")
        finally:
            engine._generating.release()
        for thread in [*flood, other]:
            thread.join(30)
        assert statuses == [200, 200, 200]
        wait_until(lambda: app.state.admitted() == 0, "every place back")


def pack(tmp_path: Path, adapter_dir: Path, name: str, extra: dict[str, bytes]) -> Path:
    """A checkpoint-shaped archive: the adapter's files and others beside them (optimizer state)."""
    archive = tmp_path / f"{name}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for child in adapter_dir.iterdir():
            tar.add(child, arcname=child.name)
        for file_name, content in extra.items():
            (tmp_path / file_name).write_bytes(content)
            tar.add(tmp_path / file_name, arcname=file_name)
    return archive


def test_the_adapter_cache_is_bounded_and_deleted_by_key(tmp_path, models_root, storage, tiny_model_dir):
    """Defect 8: only an archive's adapter files are unpacked (not the optimizer state); the cache stays under
    QLORA_INFERENCE_CACHE_MAX_BYTES, dropping copies no longer attached; an unload naming the key deletes the copy
    of an adapter the LRU dropped, or one a previous run of the server unpacked."""
    adapters = [store_adapter(tiny_model_dir, storage, f"files/file-{i}", tmp_path, seed=i) for i in (1, 2, 3)]
    storage.put_file("checkpoints/ftjob-1/ckpt-1.tar.gz", pack(tmp_path, adapters[0], "ckpt", {"optimizer.pt": b"x" * 100_000,
                                                                                                  "trainer_state.json": b"{}"}))
    one = sum(f.stat().st_size for f in adapters[0].iterdir() if f.name in ADAPTER_FILES)
    settings = settings_for(tmp_path, models_root)
    engine = engine_for(models_root, storage, tmp_path, max_adapters=1, cache_max_bytes=int(2.5 * one))
    cache = tmp_path / "cache"
    with authed(create_app(settings, engine), settings) as client:
        def load(name: str, key: str) -> None:
            response = client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": key, "base_model_name": BASE})
            assert response.status_code == 200, response.text

        load("ckpt", "checkpoints/ftjob-1/ckpt-1.tar.gz")
        assert sorted(p.name for p in cached_path(cache, "checkpoints/ftjob-1/ckpt-1.tar.gz").iterdir()) == sorted(ADAPTER_FILES)
        load("m1", "files/file-1")  # max_adapters=1: ckpt is dropped, its copy stays (the cache has room)
        load("m2", "files/file-2")  # m1 dropped; three copies would pass the bound: the oldest unattached goes
        assert not cached_path(cache, "checkpoints/ftjob-1/ckpt-1.tar.gz").exists()
        assert cached_path(cache, "files/file-1").is_dir() and cached_path(cache, "files/file-2").is_dir()
        load("m3", "files/file-3")
        assert not cached_path(cache, "files/file-1").exists() and cached_path(cache, "files/file-3").is_dir()
        assert sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) <= 2.5 * one
        # m2 was dropped by the LRU but its copy is on disk: deleting its model deletes it by key.
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "m2", "lora_path": "files/file-2"}).status_code == 200
        assert not cached_path(cache, "files/file-2").exists()
    # A restarted server knows nothing of m3, attached by the last one: the key still finds its copy.
    restarted = engine_for(models_root, storage, tmp_path)
    with authed(create_app(settings, restarted), settings) as client:
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "m3", "lora_path": "files/file-3"}).status_code == 200
        assert not cached_path(cache, "files/file-3").exists()
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "m3", "lora_path": "files/file-3"}).status_code == 404


class MeetingStorage(LocalStorage):
    """Local storage whose downloads wait for each other: two fetches of one key are inside download() at once."""

    def __init__(self, root: Path, parties: int):
        super().__init__(root)
        self.barrier = threading.Barrier(parties, timeout=20)

    def download(self, key: str, path: Path) -> None:
        self.barrier.wait()
        super().download(key, path)


def test_concurrent_fetches_of_one_adapter_do_not_collide(tmp_path, tiny_model_dir):
    """Defect 9: the vLLM front fetches in threads, and two loads of one adapter at once used the same `.partial`
    paths: one removed the other's archive mid-unpack. Each fetch now works apart; both get the adapter."""
    storage = MeetingStorage(tmp_path / "objects", parties=2)
    store_adapter(tiny_model_dir, storage, "files/file-a", tmp_path, seed=1)
    results: list[Path | Exception] = []

    def fetch() -> None:
        try:
            results.append(fetch_adapter(storage, "files/file-a", tmp_path / "adapters"))
        except Exception as exc:  # noqa: BLE001 (the assertion below shows it)
            results.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == [cached_path(tmp_path / "adapters", "files/file-a")] * 2
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["files_file-a"]  # no leftovers


def test_the_secret_is_made_once_and_shared_through_the_home(tmp_path, monkeypatch):
    """`make run` needs no setting: the first process of a deployment creates $QLORA_HOME/inference_secret (0600,
    whole), every other reads the same; QLORA_INFERENCE_SECRET overrides it."""
    home = tmp_path / "home"
    first, second = Settings(home=home).inference_secret_value(), Settings(home=home).inference_secret_value()
    assert first == second and len(first) >= 32
    assert (home / "inference_secret").stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv("QLORA_INFERENCE_SECRET", "from-the-environment")
    assert Settings(home=home).inference_secret_value() == "from-the-environment"
