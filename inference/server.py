"""The embedded inference server: OpenAI's chat completions on transformers + peft (what `make run` starts).

    python -m inference.server [--host 127.0.0.1] [--port 8001]

It speaks the same protocol as vLLM's OpenAI server with runtime LoRA loading, so the API's client works with
either: `POST /v1/chat/completions` where `model` is a base id or a loaded adapter's name, and
`POST /v1/load_lora_adapter` / `POST /v1/unload_lora_adapter` with `lora_name` and `lora_path`. Here
`lora_path` is the object-storage key of the adapter's archive (the server reads the same storage as the
workers) and `base_model_name` names the base to attach it to; a chat request for a name it does not serve is
a 404, which tells the API to load the adapter and ask again.

Every route but /health needs the shared secret (`Authorization: Bearer`, QLORA_INFERENCE_SECRET), which only the
API has. Requests are served one at a time and wait their turn; past `QLORA_INFERENCE_MAX_WAITING` waiting requests
the server answers 503, past `QLORA_INFERENCE_MAX_WAITING_PER_PROJECT` of one project (the `x-qlora-project`
header the API sets) 429, both with `x-should-retry: true`. A request whose caller went away leaves the line, or
stops generating at the next token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from api.errors import APIError, RequestIdMiddleware, register_error_handlers
from core import chat
from core.logs import configure_logging
from core.settings import Settings, get_settings
from core.storage import make_storage
from inference.auth import require_secret
from inference.engine import AdapterError, ChatEngine, ChatRequest, ChatResult, GenerationCancelled, InvalidRequest, ModelNotFound, Prepared

log = logging.getLogger("inference")


class LoadAdapter(BaseModel):
    lora_name: str
    lora_path: str
    base_model_name: str


class UnloadAdapter(BaseModel):
    lora_name: str
    lora_path: str | None = None  # the adapter's object key: its unpacked copy is deleted even when no longer attached


def _not_served(model: str) -> APIError:
    return APIError(404, f"The model '{model}' does not exist.", param="model", code="model_not_found")


class Admission:
    """The bounds of the waiting line: requests waiting or generating, in all and per project (its share, so one
    project cannot fill the line). Used on the event loop only."""

    def __init__(self, limit: int, per_project: int):
        self.limit, self.per_project = limit, per_project
        self.total = 0
        self.by_project: Counter[str] = Counter()

    def enter(self, project: str) -> Callable[[], None]:
        """Take a place in the line, or raise the 503 (line full) or the 429 (the project's share taken). Returns
        the place's release, which may be called any number of times."""
        if self.total >= self.limit:
            raise APIError(503, "The inference server is busy; retry shortly.", type="server_error", code="overloaded",
                           headers={"x-should-retry": "true", "retry-after": "1"})
        if self.by_project[project] >= self.per_project:
            raise APIError(429, f"Your project has {self.per_project} chat requests waiting or generating, its share of the "
                           "inference server; retry shortly (limit set by QLORA_INFERENCE_MAX_WAITING_PER_PROJECT).", type="requests", code="rate_limit_exceeded",
                           headers={"x-should-retry": "true", "retry-after": "1"})
        self.total += 1
        self.by_project[project] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.total -= 1
                self.by_project[project] -= 1

        return release


def create_app(settings: Settings | None = None, engine: ChatEngine | None = None) -> FastAPI:
    settings = settings or get_settings()
    assert settings.models_dir is not None
    engine = engine or ChatEngine(settings.models_dir, make_storage(settings), settings.home / "inference-cache",
                                  max_adapters=settings.inference_max_adapters, base_weights=settings.inference_base_weights,
                                  max_new_tokens=settings.inference_max_new_tokens, max_bases=settings.inference_max_bases,
                                  cache_max_bytes=settings.inference_cache_max_bytes)
    app = FastAPI(title="QLoRA service: embedded inference server", version="0.1.0",
                  dependencies=[Depends(require_secret(settings.inference_secret_value()))])
    app.state.engine = engine
    register_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)
    line = Admission(settings.inference_max_waiting, settings.inference_max_waiting_per_project)
    app.state.admitted = lambda: line.total
    app.state.admitted_limit = settings.inference_max_waiting
    app.state.line = line

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
        try:
            if not await anyio.to_thread.run_sync(engine.unload_adapter, body.lora_name, body.lora_path):
                raise _not_served(body.lora_name)
        except AdapterError as exc:
            raise APIError(400, str(exc), param="lora_path", code="invalid_adapter") from None
        return {"status": "unloaded", "lora_name": body.lora_name}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: chat.ChatCompletionCreate, request: Request) -> Any:
        if too_many := body.token_limit_error(settings.chat_max_tokens):
            raise APIError(400, too_many[1], param=too_many[0], code="invalid_value")
        release = line.enter(request.headers.get(chat.PROJECT_HEADER, ""))
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
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            streamed = _StreamedChat(engine, prepared, body.model, include_usage, release)
            return _ClosingStream(streamed.events(), streamed.close)
        try:
            result = await _generate_while_connected(engine, prepared, request)
        except ModelNotFound:
            raise _not_served(body.model) from None
        except GenerationCancelled:
            return Response(status_code=499)  # the caller went away: nobody reads this
        finally:
            release()
        return chat.completion(chat.completion_id(), int(time.time()), body.model, result.text, result.finish_reason,
                               result.prompt_tokens, result.completion_tokens)

    return app


def _engine_request(body: chat.ChatCompletionCreate) -> ChatRequest:
    return ChatRequest(model=body.model, messages=[m.as_template_message() for m in body.messages], max_tokens=body.token_limit,
                       temperature=body.temperature, top_p=body.top_p, stop=body.stop_list, seed=body.seed)


async def _generate_while_connected(engine: ChatEngine, prepared: Prepared, request: Request) -> ChatResult:
    """engine.generate in a thread, stopped (GenerationCancelled, or a short answer) when the caller disconnects:
    nobody would read the rest."""
    cancelled = threading.Event()
    outcome: dict[str, Any] = {}

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        cancelled.set()

    async with anyio.create_task_group() as group:
        group.start_soon(watch)
        try:
            outcome["result"] = await anyio.to_thread.run_sync(engine.generate, prepared, None, cancelled)
        except Exception as exc:  # noqa: BLE001 (raised below, outside the task group)
            outcome["error"] = exc
        group.cancel_scope.cancel()
    if "error" in outcome:
        raise outcome["error"]
    if cancelled.is_set():
        raise GenerationCancelled
    return outcome["result"]


def _sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


class _ClosingStream(StreamingResponse):
    """A stream of server-sent events whose `close` runs however the response ends: finished, failed, or the client
    gone, even before the first chunk (when the body's generator never starts, so its own `finally` never runs).
    Shielded: the disconnect that cancelled the response does not cancel the cleanup."""

    def __init__(self, content: AsyncIterator[bytes], close: Callable[[], Awaitable[None]]):
        super().__init__(content, media_type="text/event-stream", headers={"cache-control": "no-cache"})
        self._close = close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._close()


class _StreamedChat:
    """One streamed answer: the generation runs in a thread and hands its pieces over through a queue; `close`
    stops it (a client that left: at the next token, or before its turn), waits for the thread and frees the
    request's place in the line."""

    def __init__(self, engine: ChatEngine, prepared: Prepared, model: str, include_usage: bool, release: Callable[[], None]):
        self.engine, self.prepared, self.model, self.include_usage, self.release = engine, prepared, model, include_usage, release
        self.cancelled = threading.Event()
        self.thread: threading.Thread | None = None

    async def events(self) -> AsyncIterator[bytes]:
        """The answer in OpenAI's chunk shape, ending with `data: [DONE]`."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        completion_id, created, model = chat.completion_id(), int(time.time()), self.model

        def work() -> None:
            try:
                result = self.engine.generate(self.prepared, lambda text: loop.call_soon_threadsafe(pieces.put_nowait, ("text", text)),
                                              self.cancelled)
                loop.call_soon_threadsafe(pieces.put_nowait, ("done", result))
            except GenerationCancelled:
                pass  # the reader is gone
            except BaseException as exc:  # noqa: BLE001 (reported to the client as an error event)
                loop.call_soon_threadsafe(pieces.put_nowait, ("error", exc))

        yield _sse(chat.chunk(completion_id, created, model, {"role": "assistant", "content": ""}))
        self.thread = threading.Thread(target=work, name="chat-stream", daemon=True)
        self.thread.start()
        while True:
            kind, value = await pieces.get()
            if kind == "text":
                yield _sse(chat.chunk(completion_id, created, model, {"content": value}))
            elif kind == "error":
                log.error("generation failed for %s", model, exc_info=value)
                yield _sse({"error": {"message": "The generation failed.", "type": "server_error", "param": None, "code": "internal_error"}})
                return
            else:
                yield _sse(chat.chunk(completion_id, created, model, {}, value.finish_reason))
                if self.include_usage:
                    yield _sse(chat.chunk(completion_id, created, model, None,
                                          usage_counts=chat.usage(value.prompt_tokens, value.completion_tokens)))
                yield _sse("[DONE]")
                return

    async def close(self) -> None:
        self.cancelled.set()  # a no-op once the generation ended
        if self.thread is not None and self.thread.is_alive():
            await anyio.to_thread.run_sync(self.thread.join)
        self.release()


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
