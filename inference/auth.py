"""The inference backends' (inference/server.py, inference/vllm_front.py) check that a request comes from the API:
the shared secret every request carries. Torch-free: the vLLM front uses it."""

from __future__ import annotations

import secrets
from collections.abc import Callable

from fastapi import Request

from api.errors import APIError


def require_secret(secret: str) -> Callable[[Request], None]:
    """A dependency: every route but /health needs `Authorization: Bearer <the shared secret>` (the API's)."""
    expected = f"Bearer {secret}".encode()

    def check(request: Request) -> None:
        if request.url.path != "/health" and not secrets.compare_digest(request.headers.get("authorization", "").encode(), expected):
            raise APIError(401, "This inference backend answers the service's API only (QLORA_INFERENCE_SECRET).",
                           code="invalid_api_key")

    return check
