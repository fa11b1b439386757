"""/v1/chat/completions: chat with a base model, a fine-tuned model or a checkpoint model of the caller's project.

The API stays torch-free: it checks the request and the caller's right to the model, then forwards to the
inference backend (the embedded server or vLLM, one protocol; see inference/server.py), naming the adapter's
object-storage key when the backend does not serve it yet. Streamed answers pass through chunk by chunk.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy.orm import Session

from api.deps import CurrentProject, SessionDep, SettingsDep
from api.errors import INVALID_REQUEST, APIError, bad_request, not_found
from api.model_dirs import find_base_model
from api.openapi import error_responses
from api.schemas import first_unstorable
from core import logs
from core.chat import PROJECT_HEADER, ChatCompletionCreate
from core.fine_tuned_models import find_usable_adapter
from core.settings import Settings

router = APIRouter(tags=["chat"])


@dataclass(frozen=True)
class Served:
    """How the backend serves a model: its name there (the public model id), the base and the adapter's archive."""

    name: str
    base: str
    adapter_key: str | None


def model_not_found(model: str) -> APIError:
    return not_found(f"The model '{model}' does not exist or you do not have access to it.", param="model", code="model_not_found")


def find_served_model(session: Session, settings: Settings, project: str, model: str) -> Served:
    """A base model, or a fine-tuned or checkpoint model `project` may use (core/fine_tuned_models.py: its own, or
    a checkpoint granted to it, whose model is not deleted), served on the base its job trained on; anything else,
    another project's included, is model_not_found."""
    if find_base_model(settings, model) is not None:
        return Served(model, model, None)
    usable = find_usable_adapter(session, project, model)
    if usable is not None:
        return Served(model, usable.base_model, usable.storage_key)
    raise model_not_found(model)


def backend_unavailable(message: str) -> APIError:
    return APIError(503, message, type="server_error", code="inference_unavailable", headers={"x-should-retry": "true", "retry-after": "1"})


def _backend_error(response: httpx.Response, body: bytes) -> APIError:
    """The backend's refusal, as our envelope: its 4xx pass through (they name the parameter; a 429, the project's
    share of the line taken, with its retry headers), its 5xx and a refused secret (401/403: a misconfigured
    deployment, not the caller's fault) are a 503."""
    if response.status_code >= 500 or response.status_code in (401, 403):
        return backend_unavailable("The inference backend is busy or failing; retry shortly.")
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        error = None
    fields = {k: v for k, v in error.items() if isinstance(v, str)} if isinstance(error, dict) else {}
    retry = {"x-should-retry": "true", "retry-after": response.headers.get("retry-after", "1")} if response.status_code == 429 else None
    return APIError(response.status_code, fields.get("message") or "The inference backend refused the request.",
                    type=fields.get("type", INVALID_REQUEST), param=fields.get("param"), code=fields.get("code"), headers=retry)


class InferenceClient:
    """The API's one client for the inference backend. Every request carries the shared secret; a chat request
    names the caller's project (the backend's per-project share of its line). A chat request for an adapter the
    backend does not serve yet (its 404) loads the adapter from its storage key and is sent once more."""

    def __init__(self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None):
        self.settings = settings
        timeout = httpx.Timeout(settings.inference_timeout_s, connect=5.0)
        secret = settings.inference_secret_value() if settings.inference_url else ""
        self.http = httpx.AsyncClient(base_url=settings.inference_url.rstrip("/"), timeout=timeout, transport=transport,
                                      headers={"authorization": f"Bearer {secret}"})

    async def aclose(self) -> None:
        await self.http.aclose()

    async def open(self, served: Served, body: dict[str, Any], project: str) -> httpx.Response:
        """Send `project`'s chat request; the response is open (streamed) and succeeded, or an APIError is raised."""
        if not self.settings.inference_url:
            raise backend_unavailable("No inference backend is configured (QLORA_INFERENCE_URL).")
        request = {**body, "model": served.name}
        response = await self._send("POST", "/v1/chat/completions", request, project)
        if response.status_code == 404 and served.adapter_key is not None:
            await response.aclose()
            await self._load(served)
            response = await self._send("POST", "/v1/chat/completions", request, project)
        if response.status_code == 200:
            return response
        content = await response.aread()
        await response.aclose()
        if response.status_code == 404:
            raise model_not_found(served.name)
        raise _backend_error(response, content)

    async def unload(self, name: str, key: str | None) -> None:
        """Best effort: the backend drops a deleted model's adapter and deletes its unpacked copy by `key`, attached
        or not (the API refuses the model anyway)."""
        if self.settings.inference_url:
            try:
                response = await self._send("POST", "/v1/unload_lora_adapter", {"lora_name": name, "lora_path": key})
                await response.aclose()
            except APIError:
                pass

    async def _load(self, served: Served) -> None:
        response = await self._send("POST", "/v1/load_lora_adapter",
                                    {"lora_name": served.name, "lora_path": served.adapter_key, "base_model_name": served.base})
        content = await response.aread()
        await response.aclose()
        if response.status_code != 200:
            raise _backend_error(response, content) if response.status_code >= 500 else APIError(
                500, "The model's adapter could not be loaded.", type="server_error", code="adapter_load_failed")

    async def _send(self, method: str, path: str, body: dict[str, Any], project: str | None = None) -> httpx.Response:
        try:
            # The caller's request id goes on, so that the backend's log lines for it carry the same id.
            request_id = logs.context().get("request_id")
            headers = {"x-request-id": request_id} if request_id else {}
            if project is not None:
                headers[PROJECT_HEADER] = project
            return await self.http.send(self.http.build_request(method, path, json=body, headers=headers), stream=True)
        except httpx.TimeoutException:
            raise backend_unavailable("The inference backend did not answer in time; retry shortly.") from None
        except httpx.TransportError:
            raise backend_unavailable("The inference backend cannot be reached; retry shortly.") from None


# The backend's own refusals (a 4xx naming the parameter) pass through with their status; its 5xx become a 503.
@router.post("/chat/completions", summary="Create a chat completion", responses={
    200: {"content": {"text/event-stream": {}}, "description": "The completion; with `stream: true`, server-sent events."},
    **error_responses(404, 429, 500, 503, _500="The model's adapter could not be loaded by the backend (`adapter_load_failed`).",
    _429="Your project has its share of the inference server's waiting line (`rate_limit_exceeded`); retry shortly.",
    _503="No inference backend is configured, or it is unreachable, busy or failing (`inference_unavailable`); retry shortly.")})
async def create_chat_completion(body: ChatCompletionCreate, project: CurrentProject, session: SessionDep,
                                 settings: SettingsDep, request: Request) -> Any:
    # The model is looked up in the database (no NUL there); the whole body is sent on as UTF-8 JSON (no lone
    # surrogates): either fault is the caller's 400, not a 500 from the database or the encoder.
    if unsendable := first_unstorable({"model": body.model}) or first_unstorable(body.model_dump(exclude_none=True), nul_ok=True):
        param, reason = unsendable
        raise bad_request(f"Invalid '{param}': {reason}.", param=param or None, code="invalid_value")
    if too_many := body.token_limit_error(settings.chat_max_tokens):
        raise bad_request(too_many[1], param=too_many[0], code="invalid_value")
    served = await run_in_threadpool(find_served_model, session, settings, project, body.model)
    session.close()  # the database is done with; a long generation holds no connection
    client: InferenceClient = request.app.state.inference
    response = await client.open(served, body.model_dump(exclude_unset=True, exclude_none=True), project)
    if not body.stream:
        content = await response.aread()
        await response.aclose()
        return JSONResponse(json.loads(content))

    async def passthrough() -> AsyncIterator[bytes]:
        try:
            async for piece in response.aiter_raw():
                yield piece
        except httpx.HTTPError:
            yield b'data: {"error": {"message": "The inference backend went away.", "type": "server_error", "param": null, "code": "inference_unavailable"}}\n\n'
        finally:
            await response.aclose()

    return StreamingResponse(passthrough(), media_type="text/event-stream", headers={"cache-control": "no-cache"})
