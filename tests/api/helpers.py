"""Helpers shared by the API tests: auth headers, training data, error checks, the Redis queue's messages."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import redis
from sqlalchemy.orm import Session

from core.db import session_scope

KEY_A = {"Authorization": "Bearer key-a"}  # project proj-a
KEY_B = {"Authorization": "Bearer key-b"}  # project proj-b
API_KEYS = "key-a=proj-a,key-b=proj-b"
MAX_UPLOAD = 64 * 1024
MODEL = "tiny-llama"

# A Llama-shaped config.json: enough for the model check and the memory estimate, no weights needed.
TINY_LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 1000,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
}


def chat_jsonl(n: int = 12) -> bytes:
    lines = [
        {"messages": [{"role": "user", "content": f"What is {i} + {i}?"}, {"role": "assistant", "content": str(2 * i)}]} for i in range(n)
    ]
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def upload(
    client: httpx.Client,
    content: bytes,
    *,
    headers: dict[str, str] = KEY_A,
    filename: str = "train.jsonl",
    purpose: str = "fine-tune",
    data: dict[str, Any] | None = None,
) -> httpx.Response:
    return client.post(
        "/v1/files", headers=headers, data={"purpose": purpose, **(data or {})}, files={"file": (filename, content, "application/jsonl")}
    )


def upload_ok(client: httpx.Client, content: bytes | None = None, **kwargs: Any) -> dict[str, Any]:
    response = upload(client, chat_jsonl() if content is None else content, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


def create_job(client: httpx.Client, training_file: str, *, headers: dict[str, str] = KEY_A, **body: Any) -> httpx.Response:
    return client.post("/v1/fine_tuning/jobs", headers=headers, json={"model": MODEL, "training_file": training_file, **body})


def create_job_ok(client: httpx.Client, training_file: str, **body: Any) -> dict[str, Any]:
    response = create_job(client, training_file, **body)
    assert response.status_code == 200, response.text
    return response.json()


def assert_error(
    response: httpx.Response, status: int, *, code: str | None, param: str | None = None, type: str = "invalid_request_error"
) -> dict[str, Any]:
    """The response is OpenAI's error envelope with these values, and carries the headers every error must."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert (error["type"], error["code"], error["param"]) == (type, code, param), error
    assert response.headers["x-request-id"]
    if 400 <= status < 500:
        assert response.headers["x-should-retry"] == "false"
    return error


@contextmanager
def db(client: Any) -> Iterator[Session]:
    """A session on the app's database (to look at rows, or to write them as a worker would)."""
    with session_scope(client.app.state.session_factory) as session:
        yield session


def queued_tasks(redis_url: str, queue: str) -> list[tuple[str, list[Any]]]:
    """(task name, args) of every message waiting in a queue. kombu's Redis transport keeps a queue as a Redis
    list named after it; each item is a JSON envelope whose body is the base64 of Celery's [args, kwargs, embed]."""
    client = redis.Redis.from_url(redis_url)
    tasks = []
    for raw in client.lrange(queue, 0, -1):
        message = json.loads(raw)
        body = json.loads(base64.b64decode(message["body"]))
        tasks.append((message["headers"]["task"], body[0]))
    return tasks
