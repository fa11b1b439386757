"""Pure formatting for the command line: error lines, progress lines, tables. No I/O here, so it is unit-tested
in-process (tests/cli/test_output.py)."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import openai

# How `qlora` ends; docs/cli.md lists them. `jobs watch` exits with the job's outcome.
EXIT_OK = 0  # done; a watched job succeeded
EXIT_ERROR = 1  # the API refused the request, the service could not be reached, or an upload failed validation
EXIT_USAGE = 2  # bad command line or job file (argparse uses 2 too)
EXIT_JOB_FAILED = 3  # the watched job failed
EXIT_JOB_CANCELLED = 4  # the watched job was cancelled
EXIT_INTERRUPTED = 130  # Ctrl-C while watching (the job goes on)

OUTCOME_EXIT = {"succeeded": EXIT_OK, "failed": EXIT_JOB_FAILED, "cancelled": EXIT_JOB_CANCELLED}
TERMINAL = frozenset(OUTCOME_EXIT)


def api_error_line(exc: openai.APIError, base_url: str) -> str:
    """One readable line for anything the SDK raises: the envelope's message with its HTTP status, code and param,
    or what went wrong on the way to the service."""
    if isinstance(exc, openai.APITimeoutError):
        return f"error: the service at {base_url} did not answer in time"
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__
        reason = str(cause) if cause is not None and str(cause) else type(cause or exc).__name__
        return f"error: cannot reach the service at {base_url} ({reason}); is it running (make run), and is --base-url right?"
    if isinstance(exc, openai.APIStatusError):
        labels = [str(exc.status_code)]
        if exc.code:
            labels.append(str(exc.code))
        if exc.param:
            labels.append(f"param {exc.param}")
        message = _envelope_message(exc)
        hint = " (check --api-key, QLORA_API_KEY or OPENAI_API_KEY)" if exc.status_code == 401 else ""
        return f"error [{', '.join(labels)}]: {message}{hint}"
    return f"error: {exc.message}"


def _envelope_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping) and isinstance(inner.get("message"), str):
            return inner["message"]
    return exc.message


def fault_lines(status_details: str | None) -> list[str]:
    """An upload's faults, one per line: the API joins them with '; ' (api/routes/files.py: summarize_faults)."""
    if not status_details:
        return []
    return [part.strip() for part in status_details.split("; ") if part.strip()]


def duration(seconds: float | None) -> str:
    """'1:02:03', '2:03', or '?' when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def eta_seconds(data: Mapping[str, Any]) -> float | None:
    """Time left after a metrics event: the step's wall time times the steps still to go."""
    step, total, seconds = data.get("step"), data.get("total_steps"), data.get("step_seconds")
    if not all(isinstance(v, int | float) for v in (step, total, seconds)):
        return None
    return max(total - step, 0) * seconds


def progress_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    """What a progress update says, from a metrics event's data (worker/database_sink.py: the step's metrics and
    total_steps): the machine-readable form of `progress_line`."""
    keys = ("step", "total_steps", "train_loss", "valid_loss", "train_mean_token_accuracy", "train_rewards_accuracies",
            "train_rewards_margins", "learning_rate", "tokens_per_second", "epoch")
    fields = {k: data.get(k) for k in keys if data.get(k) is not None}
    eta = eta_seconds(data)
    if eta is not None:
        fields["eta_seconds"] = round(eta, 1)
    return fields


def progress_line(data: Mapping[str, Any]) -> str:
    """'step 3/8 (38%)  loss 2.4312  valid 2.3010  lr 1.00e-03  1,234 tok/s  ETA 0:12'."""
    step, total = data.get("step"), data.get("total_steps")
    parts = [f"step {step}/{total if total is not None else '?'}"]
    if isinstance(step, int) and isinstance(total, int) and total > 0:
        parts[0] += f" ({100 * step // total}%)"
    parts += _metric_parts(data)
    eta = eta_seconds(data)
    if eta is not None:
        parts.append(f"ETA {duration(eta)}")
    return "  ".join(parts)


def _metric_parts(data: Mapping[str, Any]) -> list[str]:
    parts = []
    for key, label in (("train_loss", "loss"), ("valid_loss", "valid")):
        if isinstance(data.get(key), int | float):
            parts.append(f"{label} {data[key]:.4f}")
    # A dpo job's reward accuracy and margin (docs/training.md, "Preference tuning (DPO)").
    for key, label in (("train_rewards_accuracies", "reward acc"), ("train_rewards_margins", "margin")):
        if isinstance(data.get(key), int | float):
            parts.append(f"{label} {data[key]:.3f}")
    if isinstance(data.get("learning_rate"), int | float):
        parts.append(f"lr {data['learning_rate']:.2e}")
    if isinstance(data.get("tokens_per_second"), int | float):
        parts.append(f"{data['tokens_per_second']:,.0f} tok/s")
    return parts


def bar_postfix(data: Mapping[str, Any]) -> str:
    """The metrics shown after a progress bar (the bar itself shows step/total)."""
    parts = _metric_parts(data)
    eta = eta_seconds(data)
    if eta is not None:
        parts.append(f"ETA {duration(eta)}")
    return "  ".join(parts)


def event_line(event: Mapping[str, Any]) -> str:
    """'12:03:04 [warn] message'."""
    when = timestamp(event.get("created_at"), time_only=True)
    return f"{when} [{event.get('level', 'info')}] {event.get('message', '')}"


def timestamp(unix: int | None, *, time_only: bool = False) -> str:
    if unix is None:
        return "-"
    moment = dt.datetime.fromtimestamp(unix)
    return moment.strftime("%H:%M:%S" if time_only else "%Y-%m-%d %H:%M:%S")


def table(rows: Iterable[Sequence[Any]], header: Sequence[str]) -> str:
    """Left-aligned columns, two spaces apart; None shows as '-'."""
    cells = [[str(h) for h in header]] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in cells)


def job_summary(job: Mapping[str, Any]) -> str:
    """`qlora jobs get`: the fields a person looks at, one per line."""
    lines = [
        ("id", job.get("id")),
        ("status", job.get("status")),
        ("model", job.get("model")),
        ("training_file", job.get("training_file")),
        ("validation_file", job.get("validation_file")),
        ("suffix", job.get("user_provided_suffix")),
        ("created", timestamp(job.get("created_at"))),
        ("finished", timestamp(job.get("finished_at"))),
        ("fine_tuned_model", job.get("fine_tuned_model")),
        ("trained_tokens", job.get("trained_tokens")),
        ("result_files", ", ".join(job.get("result_files") or []) or None),
    ]
    if job.get("estimated_finish") and job.get("status") not in TERMINAL:
        lines.append(("estimated_finish", timestamp(job["estimated_finish"])))
    error = job.get("error")
    if error:
        param = f" (param {error['param']})" if error.get("param") else ""
        lines.append(("error", f"{error.get('code')}: {error.get('message')}{param}"))
    hyper = job.get("hyperparameters") or {}
    if hyper:
        lines.append(("hyperparameters", ", ".join(f"{k}={v}" for k, v in sorted(hyper.items()))))
    width = max(len(name) for name, _ in lines)
    return "\n".join(f"{name.ljust(width)}  {'-' if value is None else value}" for name, value in lines)
