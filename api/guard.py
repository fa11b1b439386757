"""What a request must pass before any route reads its body: a URL without NUL characters, a valid API key,
and a body under the cap.

A caller without a key must not be able to make the API read (and hold) a large body: FastAPI parses a JSON body
before the route's dependencies run, so the key check there comes too late. `RequestGuard` is a pure ASGI
middleware in front of the routes under /v1: it answers 401 before a byte of the body is read, refuses a body
whose Content-Length is over `Settings.max_json_bytes` with 413, and stops reading a body sent without a length
(chunked) once it passes the cap. Only the operations whose OpenAPI body is a multipart form (they take files:
POST /v1/files) take one: they stream it to disk under their own cap, `Settings.max_upload_bytes`
(routes/files.py). A multipart body to any other operation is a 415 before it is read, so that content type is
no way around the cap.
"""

from __future__ import annotations

import re

from fastapi.responses import JSONResponse
from fastapi.security.utils import get_authorization_scheme_param
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import project_for_key
from api.errors import APIError, error_body
from api.openapi import path_patterns, takes_multipart
from core.settings import Settings

GUARDED_PREFIX = "/v1/"


def body_too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than {limit} bytes, the most this API accepts for JSON.",
                    code="request_too_large")


def multipart_not_taken() -> APIError:
    return APIError(415, "This operation takes no files: send its body as JSON (Content-Type: application/json), not as "
                    "a multipart form.", code="unsupported_media_type")


class RequestGuard:
    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        self.settings = settings
        # (METHOD, path pattern) of the operations that take files; read from the app on its first request.
        self.file_operations: list[tuple[str, re.Pattern[str]]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(GUARDED_PREFIX):
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        try:
            _check_url(scope)
            self._check_key(headers.get(b"authorization", b"").decode("latin-1"))
            limit = self._body_limit(scope, headers)
        except APIError as err:
            await self._reject(err, scope, send)
            return
        if limit is None:
            await self.app(scope, receive, send)
            return

        received = 0

        async def capped_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise body_too_large(limit)  # rendered by the error handlers, as any APIError
            return message

        await self.app(scope, capped_receive, send)

    def _check_key(self, authorization: str) -> None:
        from fastapi.security import HTTPAuthorizationCredentials

        scheme, token = get_authorization_scheme_param(authorization)
        credentials = HTTPAuthorizationCredentials(scheme=scheme, credentials=token) if scheme.lower() == "bearer" and token else None
        project_for_key(self.settings, credentials)  # raises the 401 the routes would

    def _body_limit(self, scope: Scope, headers: dict[bytes, bytes]) -> int | None:
        """The byte cap for this request's body, or None when it is not capped here (an upload)."""
        if headers.get(b"content-type", b"").lower().lstrip().startswith(b"multipart/"):
            if self._takes_files(scope):
                return None
            raise multipart_not_taken()
        limit = self.settings.max_json_bytes
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise body_too_large(limit)
        return limit

    def _takes_files(self, scope: Scope) -> bool:
        if self.file_operations is None:
            self.file_operations = [(method.upper(), regex) for regex, _, operations in path_patterns(scope["app"])
                                    for method, operation in operations.items() if takes_multipart(operation)]
        return any(method == scope["method"] and regex.match(scope["path"]) for method, regex in self.file_operations)

    async def _reject(self, err: APIError, scope: Scope, send: Send) -> None:
        response = JSONResponse(error_body(err.message, err.type, err.param, err.code), status_code=err.status_code,
                                headers={**(err.headers or {}), "connection": "close"})
        await response(scope, _no_body, send)


def _check_url(scope: Scope) -> None:
    """No NUL character in the path or the query: PostgreSQL cannot compare text with one (it would be a 500)."""
    query = scope.get("query_string", b"").lower()
    if "\x00" in scope["path"] or b"%00" in query or b"\x00" in query:
        raise APIError(400, "The request's URL contains a NUL character.", code="invalid_value")


async def _no_body() -> Message:
    # The body is never read: the connection is closed after the answer.
    return {"type": "http.disconnect"}
