"""The embedded inference server: OpenAI's chat completions on transformers + peft (what `make run` starts).

    python -m inference.server [--host 127.0.0.1] [--port 8001]

It speaks the same protocol as vLLM's OpenAI server with runtime LoRA loading, so the API's client works with
either: `POST /v1/chat/completions` where `model` is a base id or a loaded adapter's name, and
`POST /v1/load_lora_adapter` / `POST /v1/unload_lora_adapter` with `lora_name` and `lora_path`. Here
`lora_path` is the object-storage key of the adapter's archive (the server reads the same storage as the
workers) and `base_model_name` names the base to attach it to; a chat request for a name it does not serve is
a 404, which tells the API to load the adapter and ask again.

Requests are served one at a time and wait their turn; past `QLORA_INFERENCE_MAX_WAITING` waiting requests
the server answers 503 with `x-should-retry: true`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from api.errors import APIError, RequestIdMiddleware, register_error_handlers
from core import chat
from core.logs import configure_logging
from core.settings import Settings, get_settings
from core.storage import make_storage
from inference.engine import AdapterError, ChatEngine, ChatRequest, InvalidRequest, ModelNotFound

log = logging.getLogger("inference")


class LoadAdapter(BaseModel):
    lora_name: str
    lora_path: str
    base_model_name: str


class UnloadAdapter(BaseModel):
    lora_name: str


def _not_served(model: str) -> APIError:
    return APIError(404, f"The model '{model}' does not exist.", param="model", code="model_not_found")


def create_app(settings: Settings | None = None, engine: ChatEngine | None = None) -> FastAPI:
    settings = settings or get_settings()
    assert settings.models_dir is not None
    engine = engine or ChatEngine(settings.models_dir, make_storage(settings), settings.home / "inference-cache",
                                  max_adapters=settings.inference_max_adapters, base_weights=settings.inference_base_weights,
                                  max_new_tokens=settings.inference_max_new_tokens)
    app = FastAPI(title="QLoRA service: embedded inference server", version="0.1.0")
    app.state.engine = engine
    register_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)
    admitted = {"n": 0}  # requests waiting or generating; past the limit the answer is 503

    def admit() -> None:
        if admitted["n"] >= settings.inference_max_waiting:
            raise APIError(503, "The inference server is busy; retry shortly.", type="server_error", code="overloaded",
                           headers={"x-should-retry": "true", "retry-after": "1"})
        admitted["n"] += 1

    def release() -> None:
        admitted["n"] -= 1

    app.state.admitted = lambda: admitted["n"]
    app.state.admitted_limit = settings.inference_max_waiting

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "system"} for m in engine.models()]}

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadAdapter) -> dict[str, str]:
        try:
            await anyio.to_thread.run_sync(engine.load_adapter, body.lora_name, body.lora_path, body.base_model_name)
        except ModelNotFound:
            raise APIError(404, f"No base model '{body.base_model_name}'.", param="base_model_name", code="model_not_found") from None
        except AdapterError as exc:
            raise APIError(400, str(exc), param="lora_path", code="invalid_adapter") from None
        return {"status": "loaded", "lora_name": body.lora_name}

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadAdapter) -> dict[str, str]:
        if not await anyio.to_thread.run_sync(engine.unload_adapter, body.lora_name):
            raise _not_served(body.lora_name)
        return {"status": "unloaded", "lora_name": body.lora_name}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: chat.ChatCompletionCreate, request: Request) -> Any:
        admit()
        try:
            prepared = await anyio.to_thread.run_sync(engine.prepare, _engine_request(body))
        except ModelNotFound:
            release()
            raise _not_served(body.model) from None
        except InvalidRequest as exc:
            release()
            raise APIError(400, str(exc), param=exc.param, code="context_length_exceeded") from None
        except BaseException:
            release()
            raise
        completion_id, created = chat.completion_id(), int(time.time())
        if not body.stream:
            try:
                result = await anyio.to_thread.run_sync(engine.generate, prepared)
            except ModelNotFound:
                raise _not_served(body.model) from None
            finally:
                release()
            return chat.completion(completion_id, created, body.model, result.text, result.finish_reason, result.prompt_tokens,
                                   result.completion_tokens)
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(_stream(engine, prepared, body.model, completion_id, created, include_usage, release),
                                 media_type="text/event-stream", headers={"cache-control": "no-cache"})

    return app


def _engine_request(body: chat.ChatCompletionCreate) -> ChatRequest:
    return ChatRequest(model=body.model, messages=[m.as_template_message() for m in body.messages], max_tokens=body.token_limit,
                       temperature=body.temperature, top_p=body.top_p, stop=body.stop_list, seed=body.seed)


def _sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


async def _stream(engine: ChatEngine, prepared: Any, model: str, completion_id: str, created: int, include_usage: bool,
                  release: Any) -> AsyncIterator[bytes]:
    """The answer as server-sent events in OpenAI's chunk shape, ending with `data: [DONE]`. The generation runs
    in a thread and hands its pieces over through a queue; a client that goes away stops it at the next token."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    cancelled = threading.Event()

    def work() -> None:
        try:
            result = engine.generate(prepared, lambda text: loop.call_soon_threadsafe(pieces.put_nowait, ("text", text)), cancelled)
            loop.call_soon_threadsafe(pieces.put_nowait, ("done", result))
        except BaseException as exc:  # noqa: BLE001 (reported to the client as an error event)
            loop.call_soon_threadsafe(pieces.put_nowait, ("error", exc))

    thread = threading.Thread(target=work, name="chat-stream", daemon=True)
    try:
        yield _sse(chat.chunk(completion_id, created, model, {"role": "assistant", "content": ""}))
        thread.start()
        while True:
            kind, value = await pieces.get()
            if kind == "text":
                yield _sse(chat.chunk(completion_id, created, model, {"content": value}))
            elif kind == "error":
                log.error("generation failed for %s", model, exc_info=value)
                yield _sse({"error": {"message": "The generation failed.", "type": "server_error", "param": None, "code": "internal_error"}})
                break
            else:
                yield _sse(chat.chunk(completion_id, created, model, {}, value.finish_reason))
                if include_usage:
                    yield _sse(chat.chunk(completion_id, created, model, None, usage_counts=chat.usage(value.prompt_tokens,
                                                                                                        value.completion_tokens)))
                yield _sse("[DONE]")
                break
    finally:
        cancelled.set()  # a no-op once the generation ended; else the client left and it stops at the next token
        if thread.is_alive():
            await anyio.to_thread.run_sync(thread.join)
        release()


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args(argv)
    configure_logging(get_settings().log_format)
    uvicorn.run(create_app(), host=args.host, port=args.port, log_config=None)  # uvicorn's loggers through ours
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
