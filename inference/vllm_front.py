"""The service's inference protocol in front of vLLM's OpenAI server (the backend at scale).

    python -m inference.vllm_front --port 8001 --upstream http://vllm:8000 --adapter-dir /adapters

vLLM (started with `--enable-lora` and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True) loads an adapter from a directory on
its own disk, while the API names adapters by their object-storage key. This front fetches and unpacks the archive
into a directory it shares with vLLM (`--adapter-dir`, the same volume in both containers) and hands vLLM
that path; chat completions and unloads pass through unchanged, streamed answers chunk by chunk. It holds no
model and no torch.

Like the embedded server it answers only the API (the shared secret, QLORA_INFERENCE_SECRET, as a bearer token),
passes the same token on to vLLM (started with `--api-key` set to it), takes adapters by object key only, deletes
a deleted model's unpacked copy by key and keeps its cache under QLORA_INFERENCE_CACHE_MAX_BYTES.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from api.errors import APIError, RequestIdMiddleware, register_error_handlers
from core.settings import Settings, get_settings
from core.storage import make_storage
from inference.adapters import AdapterError, cached_path, check_key, fetch_adapter, remove_cached, trim_cache
from inference.auth import require_secret


class LoadAdapter(BaseModel):
    lora_name: str
    lora_path: str  # the object key of the adapter's archive
    base_model_name: str | None = None  # passed on: vLLM serves one base and ignores it


class UnloadAdapter(BaseModel):
    lora_name: str
    lora_path: str | None = None  # the object key: its unpacked copy is deleted even when vLLM no longer holds it


def create_app(upstream: str, adapter_dir: Path, settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    storage = make_storage(settings)
    secret = settings.inference_secret_value()
    http = httpx.AsyncClient(base_url=upstream.rstrip("/"), timeout=httpx.Timeout(settings.inference_timeout_s, connect=5.0),
                             headers={"authorization": f"Bearer {secret}"})  # vLLM's --api-key
    keys: dict[str, str] = {}  # adapter name -> object key, to delete its unpacked copy on unload

    async def send(method: str, path: str, content: bytes) -> httpx.Response:
        try:
            return await http.send(http.build_request(method, path, content=content, headers={"content-type": "application/json"}),
                                   stream=True)
        except httpx.TransportError:
            raise APIError(503, "vLLM cannot be reached.", type="server_error", code="inference_unavailable",
                           headers={"x-should-retry": "true"}) from None

    async def relay(response: httpx.Response) -> Response:
        body = await response.aread()
        await response.aclose()
        return Response(body, status_code=response.status_code, media_type=response.headers.get("content-type"))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await http.aclose()

    app = FastAPI(title="QLoRA service: inference front for vLLM", version="0.1.0", lifespan=lifespan,
                  dependencies=[Depends(require_secret(secret))])
    register_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)

    @app.get("/health")
    async def health() -> Response:
        return await relay(await send("GET", "/health", b""))

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadAdapter) -> Response:
        try:
            directory = await anyio.to_thread.run_sync(fetch_adapter, storage, body.lora_path, adapter_dir)
        except AdapterError as exc:
            raise APIError(400, str(exc), param="lora_path", code="invalid_adapter") from None
        keys[body.lora_name] = body.lora_path
        attached = {cached_path(adapter_dir, k) for k in keys.values()}
        await anyio.to_thread.run_sync(trim_cache, adapter_dir, settings.inference_cache_max_bytes, attached)
        payload = {"lora_name": body.lora_name, "lora_path": str(directory), "base_model_name": body.base_model_name}
        response = await relay(await send("POST", "/v1/load_lora_adapter", json.dumps(payload).encode()))
        if response.status_code == 400 and b"already been loaded" in bytes(response.body):
            return Response(status_code=200)  # two requests raced to load the same adapter: it is loaded
        return response

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadAdapter) -> Response:
        if body.lora_path is not None:
            try:
                check_key(body.lora_path)
            except AdapterError as exc:
                raise APIError(400, str(exc), param="lora_path", code="invalid_adapter") from None
        response = await relay(await send("POST", "/v1/unload_lora_adapter", json.dumps({"lora_name": body.lora_name}).encode()))
        removed = False
        for key in {k for k in (keys.pop(body.lora_name, None), body.lora_path) if k is not None}:
            removed = await anyio.to_thread.run_sync(remove_cached, adapter_dir, key) or removed
        return Response(status_code=200) if removed and response.status_code == 404 else response

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        response = await send("POST", "/v1/chat/completions", await request.body())
        if response.status_code != 200 or not response.headers.get("content-type", "").startswith("text/event-stream"):
            return await relay(response)

        async def passthrough() -> AsyncIterator[bytes]:
            try:
                async for piece in response.aiter_raw():
                    yield piece
            finally:
                await response.aclose()

        return StreamingResponse(passthrough(), media_type="text/event-stream", headers={"cache-control": "no-cache"})

    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="compose: 0.0.0.0 inside the internal `inference` network only")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--upstream", default="http://vllm:8000", help="vLLM's OpenAI server")
    parser.add_argument("--adapter-dir", type=Path, default=Path("/adapters"), help="a directory vLLM reads at the same path")
    args = parser.parse_args(argv)
    uvicorn.run(create_app(args.upstream, args.adapter_dir), host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
