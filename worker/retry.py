"""Riding out brief outages of the database and the object store while a job trains.

Every write of a running job (events, metrics, checkpoint rows and uploads, the final results) goes through
`retry_transient`: a transient error (connection refused or lost, a timeout, an S3 5xx, a full disk) is retried with
exponential backoff for up to `Settings.outage_retry_s`, and the training loop, which calls the sink, waits
meanwhile. An outage that lasts longer raises `Outage`: the run stops without failing the job, its heartbeat goes
stale, and the sweeper resumes it from its last checkpoint. Any other error is raised at once.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from typing import TypeVar

from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors of the local backend that a little time can cure: a full disk or quota, a flaky network mount.
_TRANSIENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED})
_TRANSIENT_S3_CODES = frozenset({"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeTooSkewed"})


class Outage(RuntimeError):
    """The database or the object store stayed unreachable for longer than the retry window."""


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` says a service was unreachable for a while, rather than that the request was wrong."""
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

    if isinstance(exc, (OperationalError, InterfaceError)):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, (BotoConnectionError, HTTPClientError)):
        return True
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or error.get("Code") in _TRANSIENT_S3_CODES
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError):
        return exc.errno in _TRANSIENT_ERRNOS
    # boto3's transfer manager wraps a failed upload's cause.
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and type(exc).__name__ == "S3UploadFailedError" and is_transient(cause)


def retry_transient(action: Callable[[], T], window_s: float, what: str) -> T:
    """Run `action`, retrying transient errors for up to `window_s` seconds; `Outage` if they last longer."""

    def warn(state) -> None:  # noqa: ANN001
        log.warning("%s failed (%s), retrying for up to %.0f s", what, type(state.outcome.exception()).__name__, window_s)

    retrying = Retrying(retry=retry_if_exception(is_transient), wait=wait_exponential(multiplier=0.25, max=5),
                        stop=stop_after_delay(window_s), before_sleep=warn, reraise=True)
    try:
        return retrying(action)
    except Exception as exc:
        if is_transient(exc):
            raise Outage(f"{what}: still failing after {window_s:.0f} s ({type(exc).__name__})") from exc
        raise
