"""Log lines of every process (API, Celery workers, inference server): stdlib logging, one handler on the root logger.

    QLORA_LOG_FORMAT=json   one JSON object a line: time, level, logger, message, the context fields, extras
    QLORA_LOG_FORMAT=text   one readable line, the context fields at its end

The context fields come from a context variable, so every line logged while a request or a job is handled carries
them without being passed around: `request_id` (set by api.errors.RequestIdMiddleware for each request), `job_id`
and `export_id` (set by the worker while it runs a job or an export, see `bound`). Threads start with an empty
context: a thread working for a job binds the job itself.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import traceback
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, TextIO

_context: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("qlora_log_context", default={})  # noqa: B039 (never mutated)

# A LogRecord's own attributes: anything else on a record was passed with `extra=` and goes into the JSON object
# (but uvicorn's `color_message`, the message again with terminal colour codes).
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName", "color_message"}
# Uvicorn's access line: '%s - "%s %s HTTP/%s" %d' with these arguments, also given as fields of their own.
_ACCESS_FIELDS = ("client_addr", "method", "path", "http_version", "status_code")


def context() -> dict[str, str]:
    """The fields every line logged now carries."""
    return _context.get()


def bind(**fields: str | None) -> contextvars.Token[dict[str, str]]:
    """Add fields to this context (None removes one); returns the token to `unbind` with."""
    merged = {**_context.get(), **fields}
    return _context.set({k: v for k, v in merged.items() if v is not None})


def unbind(token: contextvars.Token[dict[str, str]]) -> None:
    _context.reset(token)


@contextlib.contextmanager
def bound(**fields: str | None) -> Iterator[None]:
    token = bind(**fields)
    try:
        yield
    finally:
        unbind(token)


class ContextFilter(logging.Filter):
    """Copies the context fields onto each record as it is handled (in the thread and task that logged it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = _context.get()
        record.qlora_context = fields
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(getattr(record, "qlora_context", None) or _context.get())
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == len(_ACCESS_FIELDS):
            line.update(zip(_ACCESS_FIELDS, record.args, strict=True))
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and key != "qlora_context" and key not in line:
                line[key] = value
        if record.exc_info:
            line["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "qlora_context", None) or _context.get()
        if not fields:
            return text
        first, newline, rest = text.partition("\n")  # after the message, before a traceback
        return first + " [" + " ".join(f"{k}={v}" for k, v in fields.items()) + "]" + newline + rest


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a line is written (a test harness may swap it between tests)."""

    @property
    def stream(self) -> TextIO:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


_MARK = "_qlora_handler"


def configure_logging(log_format: str = "text", level: int | str = logging.INFO, stream: TextIO | None = None) -> logging.Handler:
    """Put one handler in `log_format` on the root logger (replacing the one an earlier call put there, and leaving
    others alone), and send uvicorn's and Python's warnings through it. Returns the handler."""
    handler: logging.Handler = logging.StreamHandler(stream) if stream is not None else _CurrentStderr()
    setattr(handler, _MARK, True)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Uvicorn configures its loggers with handlers of their own (plain text) that do not propagate: through ours instead.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.captureWarnings(True)
    return handler
