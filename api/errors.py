"""OpenAI's error envelope for every error, and the headers every response carries.

Every error body is ``{"error": {"message", "type", "param", "code"}}``: our own `APIError`s, FastAPI's request
validation errors (a 400 here, not FastAPI's 422 ``{"detail": ...}``, which leaves the SDK's code/param empty),
unknown routes, wrong methods and unexpected exceptions (500, logged). `RequestIdMiddleware` puts an
``x-request-id`` on every response (the client's own, when it sent a sane one) and ``x-should-retry: false`` on
every 4xx that does not set it (a 429 worth retrying says `true`), so the SDK does not retry a request that cannot
succeed.
"""

from __future__ import annotations

import logging
import re
import secrets
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core import logs

logger = logging.getLogger("api")

INVALID_REQUEST = "invalid_request_error"


class APIError(StarletteHTTPException):
    """An error the client caused (or a server fault we name), rendered as OpenAI's envelope.

    It subclasses Starlette's HTTPException so that FastAPI passes it through untouched even when it is raised
    while the request body is read (see `routes.files.UploadRoute`)."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(status_code=status_code, detail=message, headers=headers)
        self.message = message
        self.type = type
        self.param = param
        self.code = code


def error_body(message: str, type: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def quota_exceeded(message: str, setting: str) -> APIError:
    """429 for a project over one of its limits; the message names the setting that sets it."""
    return APIError(429, f"{message} (limit set by {setting}).", type="quota_error", code="quota_exceeded")


def not_found(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(404, message, param=param, code=code)


# --- request validation errors -------------------------------------------------------------------------------

_LOCATIONS = frozenset({"body", "query", "path", "header", "cookie"})
_TYPE_ERRORS = ("_type", "_parsing", "json_invalid", "is_instance_of", "dataclass_exact_type")


def _param(loc: tuple[Any, ...]) -> str | None:
    """('body', 'hyperparameters', 'lora_r') -> 'hyperparameters.lora_r'; a form field 'expires_after[seconds]'
    -> 'expires_after.seconds'."""
    parts = [str(p) for p in loc]
    if parts and parts[0] in _LOCATIONS:
        parts = parts[1:]
    dotted = ".".join(parts).replace("[", ".").replace("]", "")
    return dotted or None


def _validation_code(error_type: str) -> str:
    if error_type == "missing":
        return "missing_required_parameter"
    if error_type == "extra_forbidden":
        return "unknown_parameter"
    if error_type.endswith(_TYPE_ERRORS) or error_type in _TYPE_ERRORS:
        return "invalid_type"
    return "invalid_value"


def validation_error_body(exc: RequestValidationError) -> dict[str, Any]:
    """The first of pydantic's errors, as the envelope (the SDK shows one message, param and code)."""
    errors = exc.errors()
    if not errors:
        return error_body("Invalid request.", INVALID_REQUEST, None, "invalid_value")
    first = errors[0]
    error_type = str(first.get("type", ""))
    loc = tuple(first.get("loc", ()))
    if error_type == "json_invalid":
        return error_body("We could not parse the JSON body of your request.", INVALID_REQUEST, None, "invalid_json")
    param = _param(loc)
    code = _validation_code(error_type)
    if code == "missing_required_parameter":
        message = f"Missing required parameter: '{param}'." if param else "Missing request body."
    elif code == "unknown_parameter":
        message = f"Unrecognized request argument supplied: '{param}'."
    else:
        reason = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        message = f"Invalid '{param}': {reason}." if param else f"Invalid request body: {reason}."
    return error_body(message, INVALID_REQUEST, param, code)


# --- handlers -------------------------------------------------------------------------------------------------


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if isinstance(exc, APIError):
        body = error_body(exc.message, exc.type, exc.param, exc.code)
    elif exc.status_code == 404:
        body = error_body(f"Invalid URL ({request.method} {request.url.path})", INVALID_REQUEST, None, "unknown_url")
    elif exc.status_code == 400:
        # FastAPI's own 400: a body it could not parse at all (JSON that is not UTF-8, a broken multipart form).
        body = error_body("We could not parse the body of your request.", INVALID_REQUEST, None, "invalid_body")
    elif exc.status_code == 405:
        body = error_body(f"Method {request.method} is not allowed for {request.url.path}", INVALID_REQUEST, None, "method_not_allowed")
    else:
        body = error_body(str(exc.detail), INVALID_REQUEST if exc.status_code < 500 else "server_error", None, None)
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse(validation_error_body(exc), status_code=400)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # Starlette runs this handler outside every other middleware, so the request id is added here.
    request_id = request.scope.get("state", {}).get("request_id", "")
    logger.error("unhandled error on %s %s (request %s)", request.method, request.url.path, request_id, exc_info=exc)
    body = error_body("The server had an error while processing your request.", "server_error", None, "internal_error")
    return JSONResponse(body, status_code=500, headers={"x-request-id": request_id} if request_id else None)


def register_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)


def register_service_error_handlers(app: FastAPI) -> None:
    """The refusals of core's services as the envelope: a project over one of its limits (core/quotas.py, 429) and a
    job request refused (core/job_service.py, 400). Apart from `register_error_handlers`, which the inference servers
    share and which must not import the database layer."""
    from core.job_service import JobRequestError
    from core.quotas import QuotaExceeded

    async def job_request_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, JobRequestError)
        return await _http_error(request, bad_request(exc.message, param=exc.param, code=exc.code))

    async def quota_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, QuotaExceeded)
        return await _http_error(request, quota_exceeded(exc.message, exc.setting))

    app.add_exception_handler(JobRequestError, job_request_error)
    app.add_exception_handler(QuotaExceeded, quota_error)


# --- headers on every response -------------------------------------------------------------------------------

_CLIENT_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,200}$")  # printable ASCII, no spaces: safe to echo in a header


def new_request_id() -> str:
    return f"req_{secrets.token_hex(16)}"


class RequestIdMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware: it would buffer streamed downloads' context and break on disconnects)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope.get("headers", [])).get(b"x-request-id", b"").decode("latin-1")
        request_id = sent if _CLIENT_REQUEST_ID.match(sent) else new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        # Every line logged while the request is handled carries the id. Not unbound: the server runs each request in
        # a task of its own, whose context ends with it, and the lines logged outside this middleware (the access
        # line, the 500 handler's) must carry it too.
        logs.bind(request_id=request_id)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["x-request-id"] = request_id
                if 400 <= message["status"] < 500 and "x-should-retry" not in headers:  # a 429 to retry says so itself
                    headers["x-should-retry"] = "false"
            await send(message)

        await self.app(scope, receive, send_with_headers)
