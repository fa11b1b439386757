"""The error responses the OpenAPI document lists: the ones the API really returns, each with OpenAI's envelope.

FastAPI documents a 422 `{"detail": [...]}` on every operation with parameters, but api/errors.py answers
validation errors with a 400 envelope. `error_responses` builds the `responses=` entries the routes declare
(every /v1 operation gets `V1_ERRORS` from api/main.py, each route adds its own), and `openapi_without_422`
removes FastAPI's 422 entries and their schemas from the generated document.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field
from starlette.routing import compile_path


class ErrorObject(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, quota_error or server_error.")
    param: str | None = Field(description="The parameter at fault, dotted (hyperparameters.lora_r), or null.")
    code: str | None = Field(description="A machine-readable code (invalid_value, job_not_found, ...), or null.")


class ErrorResponse(BaseModel):
    """OpenAI's error envelope: every error this API returns has this body."""

    error: ErrorObject


# What each status means here; the routes' own descriptions, when they declare one, replace these.
ERROR_DESCRIPTIONS = {
    400: "Invalid request: a parameter is missing, of the wrong type or out of range; `param` names it.",
    401: "Missing or unknown API key (`invalid_api_key`).",
    403: "The operation is not allowed on this object.",
    404: "No such object in the caller's project; `code` says which kind.",
    409: "The object is not in a state that allows the operation.",
    413: "The request body is over the service's limit (`request_too_large`, or `file_too_large` for uploads).",
    415: "A multipart body sent to an operation that takes no files (`unsupported_media_type`).",
    429: "Over one of the project's limits (`quota_exceeded`); the message names the setting.",
    500: "A server fault the API names (`code`).",
    503: "A backend this operation needs is unavailable or busy; retry shortly.",
}


def error_responses(*statuses: int, **descriptions: str) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for these statuses, each with the envelope schema. A description for one of them is
    passed as `_404="..."` (a keyword cannot start with a digit)."""
    return {
        status: {"model": ErrorResponse, "description": descriptions.get(f"_{status}", ERROR_DESCRIPTIONS[status])}
        for status in statuses
    }


# Every operation under /v1 may answer these: a NUL character in the URL or an invalid parameter (400), a missing
# or wrong key (401, api/guard.py), a body over the cap (413, checked on Content-Length for every request) and a
# multipart body where no file is taken (415, api/guard.py).
V1_ERRORS = error_responses(400, 401, 413, 415)


def path_patterns(app: FastAPI) -> list[tuple[re.Pattern[str], str, dict[str, Any]]]:
    """Each path of the app's OpenAPI document: the pattern of the request paths it serves, the path itself
    (`/v1/files/{file_id}`) and its operations by lowercase method. Literal paths first, so that
    `/v1/fine_tuning/jobs` is not taken for a parameter of another."""
    paths = app.openapi()["paths"]
    return [(compile_path(path)[0], path, paths[path]) for path in sorted(paths, key=lambda path: (path.count("{"), path))]


def takes_multipart(operation: dict[str, Any]) -> bool:
    """The operation's body is a multipart form (it takes files)."""
    return "multipart/form-data" in operation.get("requestBody", {}).get("content", {})


def drop_422(app: FastAPI) -> None:
    """Make `app.openapi()` leave out FastAPI's 422 responses (this API never sends one) and the validation schemas
    only they use. FastAPI builds the document once and caches it; the 422s are removed from that one copy."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        first = app.openapi_schema is None
        spec = build()
        if first:
            for path_item in spec.get("paths", {}).values():
                for operation in path_item.values():
                    operation.get("responses", {}).pop("422", None)
            schemas = spec.get("components", {}).get("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
        return spec

    app.openapi = openapi  # type: ignore[method-assign]
