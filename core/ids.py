"""Object ids in OpenAI's shapes: file-..., ftjob-..., ftevent-..., ftckpt_...; and ours, export-..., jobend-..."""

import secrets

_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def _token(n: int = 24) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(n))


def file_id() -> str:
    return f"file-{_token()}"


def job_id() -> str:
    return f"ftjob-{_token()}"


def event_id() -> str:
    return f"ftevent-{_token()}"


def checkpoint_id() -> str:
    return f"ftckpt_{_token()}"


def export_id() -> str:
    return f"export-{_token()}"


def job_ended_id() -> str:
    return f"jobend-{_token()}"


def upload_id() -> str:
    return f"upload_{_token()}"


def upload_part_id() -> str:
    return f"part_{_token()}"


def checkpoint_permission_id() -> str:
    return f"cp_{_token()}"


def webhook_endpoint_id() -> str:
    return f"we_{_token()}"


def webhook_event_id() -> str:
    return f"evt_{_token()}"


def webhook_message_id() -> str:
    """A delivery's `webhook-id` (Standard Webhooks' msg_ prefix): the same on every attempt of it."""
    return f"msg_{_token()}"
