"""The embedded inference server: OpenAI's chat completions on a tiny Llama, adapters loaded by storage key,
streaming, stop strings, seeds, the adapter LRU and the bound on waiting requests."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from core.settings import Settings
from inference.engine import ChatEngine
from inference.server import create_app
from tests.inference.conftest import BASE, store_adapter

QUESTION = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture
def engine(models_root, storage, tmp_path) -> ChatEngine:
    return ChatEngine(models_root, storage, tmp_path / "cache", max_adapters=2, dtype="fp32", max_new_tokens=12)


def make_client(tmp_path, engine, **overrides) -> TestClient:
    settings = Settings(home=tmp_path / "home", models_dir=engine.models_dir, storage="local", storage_dir=tmp_path / "objects", **overrides)
    return TestClient(create_app(settings, engine), headers={"authorization": f"Bearer {settings.inference_secret_value()}"})


@pytest.fixture
def client(tmp_path, engine):
    with make_client(tmp_path, engine) as test_client:
        yield test_client


def ask(client: TestClient, model: str = BASE, **body) -> dict:
    response = client.post("/v1/chat/completions", json={"model": model, "messages": QUESTION, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return ChatCompletion.model_validate(response.json(), strict=False).model_dump()


def load(client: TestClient, name: str, key: str) -> None:
    response = client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": key, "base_model_name": BASE})
    assert response.status_code == 200, response.text


def peft_greedy(tiny_model_dir, adapter_dir, tokenizer, max_new_tokens: int) -> str:
    """The reference: the same greedy generation with peft alone, outside the server."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    text = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_base_and_adapter_answers_match_peft(client, storage, tmp_path, tiny_model_dir, tokenizer):
    adapter_dir = store_adapter(tiny_model_dir, storage, "files/file-a", tmp_path, seed=1)
    base = ask(client, max_tokens=6)
    assert base["choices"][0]["message"]["content"] == peft_greedy(tiny_model_dir, None, tokenizer, 6)
    assert base["choices"][0]["finish_reason"] == "length" and base["usage"]["completion_tokens"] == 6
    assert base["usage"]["total_tokens"] == base["usage"]["prompt_tokens"] + 6 and base["model"] == BASE

    # An adapter not loaded yet is a 404: the API's signal to load it.
    missing = client.post("/v1/chat/completions", json={"model": "ft:x", "messages": QUESTION})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    load(client, "ft:x", "files/file-a")
    tuned = ask(client, "ft:x", max_tokens=6)
    assert tuned["choices"][0]["message"]["content"] == peft_greedy(tiny_model_dir, adapter_dir, tokenizer, 6)
    assert tuned["choices"][0]["message"]["content"] != base["choices"][0]["message"]["content"]
    assert tuned["model"] == "ft:x"
    # The base alone is still served as it was, with the adapter attached beside it.
    assert ask(client, max_tokens=6)["choices"][0]["message"]["content"] == base["choices"][0]["message"]["content"]


def test_least_recently_used_adapter_is_dropped(client, engine, storage, tmp_path, tiny_model_dir):
    for seed in (1, 2, 3):
        store_adapter(tiny_model_dir, storage, f"files/file-{seed}", tmp_path, seed=seed)
    load(client, "m1", "files/file-1")
    load(client, "m2", "files/file-2")
    ask(client, "m1", max_tokens=1)  # m1 is now the most recently used
    load(client, "m3", "files/file-3")  # max_adapters=2: m2 goes
    assert client.post("/v1/chat/completions", json={"model": "m2", "messages": QUESTION}).status_code == 404
    assert {m["id"] for m in client.get("/v1/models").json()["data"]} == {BASE, "m1", "m3"}
    assert len(engine.bases[BASE].model.peft_config) == 2  # dropped from the model, not only from the list
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "m1"}).status_code == 200
    assert client.post("/v1/chat/completions", json={"model": "m1", "messages": QUESTION}).status_code == 404
    assert not (tmp_path / "cache" / "files_file-1").exists()  # unloading deletes the unpacked copy ...
    assert (tmp_path / "cache" / "files_file-2").is_dir()  # ... the LRU keeps it, to attach it again fast


def test_the_base_answers_as_before_once_its_last_adapter_is_unloaded(client, engine, storage, tmp_path, tiny_model_dir):
    before = ask(client, max_tokens=6)["choices"][0]["message"]["content"]
    store_adapter(tiny_model_dir, storage, "files/file-1", tmp_path, seed=1)
    load(client, "m1", "files/file-1")
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "m1"}).status_code == 200
    assert ask(client, max_tokens=6)["choices"][0]["message"]["content"] == before
    load(client, "m1", "files/file-1")  # and an adapter attaches again
    assert ask(client, "m1", max_tokens=6)["choices"][0]["message"]["content"] != before


def test_bad_adapter_and_bad_requests(client, storage, tmp_path):
    response = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "files/none", "base_model_name": BASE})
    assert response.status_code == 400 and response.json()["error"]["param"] == "lora_path"
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tar")
    storage.put_file("files/junk", tmp_path / "junk.tar.gz")
    response = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "files/junk", "base_model_name": BASE})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_adapter"
    too_long = client.post("/v1/chat/completions", json={"model": BASE, "messages": QUESTION, "max_tokens": 10**6})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "max_tokens"


def stream(client: TestClient, **body) -> list[dict | str]:
    events: list[dict | str] = []
    with client.stream("POST", "/v1/chat/completions", json={"model": BASE, "messages": QUESTION, "stream": True, **body}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_streaming_gives_the_same_answer_in_chunks(client):
    whole = ask(client, max_tokens=8)
    events = stream(client, max_tokens=8, temperature=0, stream_options={"include_usage": True})
    assert events[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(e) for e in events[:-1]]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole["choices"][0]["message"]["content"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole["choices"][0]["finish_reason"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole["usage"]["completion_tokens"]
    assert all(c.usage is None for c in chunks[:-1])
    assert all(c.usage is None for c in (ChatCompletionChunk.model_validate(e) for e in stream(client, max_tokens=3)[:-1]))


def test_stop_strings_cut_the_answer_streamed_or_not(client):
    sampled = {"temperature": 1.0, "seed": 5, "max_tokens": 12}  # a varied answer, the same each time
    whole = ask(client, **sampled)
    text = whole["choices"][0]["message"]["content"]
    assert len(set(text)) > 4, text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cut = ask(client, **sampled, stop=[stop, "never-in-it"])
    assert cut["choices"][0]["message"]["content"] == text[:text.find(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop" and whole["choices"][0]["finish_reason"] == "length"
    assert cut["usage"]["completion_tokens"] < 12
    # A stop string is looked for in the answer only: the prompt ends with a newline, the answer starts without one.
    assert ask(client, **sampled, stop="\n" + text[:2])["choices"][0]["message"]["content"] == text
    events = stream(client, **sampled, stop=stop)
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"]) == text[:text.find(stop)]


def test_a_seed_repeats_a_sampled_answer(client):
    first = ask(client, temperature=1.5, seed=11, max_tokens=10)["choices"][0]["message"]["content"]
    assert ask(client, temperature=1.5, seed=11, max_tokens=10)["choices"][0]["message"]["content"] == first
    others = {ask(client, temperature=1.5, seed=s, max_tokens=10)["choices"][0]["message"]["content"] for s in (12, 13, 14)}
    assert others != {first}


def test_requests_wait_their_turn_up_to_the_limit(tmp_path, engine):
    with make_client(tmp_path, engine, inference_max_waiting=2) as client:
        ask(client, max_tokens=1)  # the base is loaded before the engine is held
        results: list[int] = []
        engine._generating.acquire()  # a long generation in progress
        try:
            waiting = [threading.Thread(target=lambda: results.append(
                client.post("/v1/chat/completions", json={"model": BASE, "messages": QUESTION, "max_tokens": 2}).status_code))
                for _ in range(2)]
            for thread in waiting:
                thread.start()
            deadline = time.monotonic() + 10
            while client.app.state.admitted() < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            refused = client.post("/v1/chat/completions", json={"model": BASE, "messages": QUESTION})
            assert refused.status_code == 503 and refused.headers["x-should-retry"] == "true"
            assert refused.json()["error"]["code"] == "overloaded"
        finally:
            engine._generating.release()
        for thread in waiting:
            thread.join(30)
        assert results == [200, 200]  # queued, not refused
        assert client.app.state.admitted() == 0


def test_the_base_can_be_served_in_nf4(models_root, storage, tmp_path, tiny_model_dir):
    """QLORA_INFERENCE_BASE_WEIGHTS=nf4: the base is quantized on load with bitsandbytes (4x less memory) and still
    answers, adapters attached on top of the 4-bit layers."""
    import bitsandbytes as bnb

    engine = ChatEngine(models_root, storage, tmp_path / "cache", base_weights="nf4", dtype="fp32", max_new_tokens=4)
    store_adapter(tiny_model_dir, storage, "files/file-a", tmp_path, seed=1)
    with make_client(tmp_path, engine) as client:
        base = ask(client, max_tokens=4)
        load(client, "ft:x", "files/file-a")
        tuned = ask(client, "ft:x", max_tokens=4)
    layers = [m for m in engine.bases[BASE].model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(layer.weight.quant_type == "nf4" for layer in layers)
    assert base["usage"]["completion_tokens"] == 4 and tuned["usage"]["completion_tokens"] == 4
