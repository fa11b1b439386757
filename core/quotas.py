"""Every limit of a project, in one place: the project's row lock that orders concurrent requests from their count
to their commit, the job quotas, the stored-bytes quota and the project's share of the training queue.

Stored bytes are the project's live files plus the bytes reserved by its uploads in progress (their declared size)
and by its merged exports not yet stored (queued or running): an export reserves its estimated size when it is accepted, so a storm of exports cannot all fit under a
limit that holds one, and the worker checks again with the real size when it commits the merged file.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.exports import ACTIVE, ExportStatus
from core.jobs import TERMINAL, JobStatus
from core.settings import Settings
from core.tables import Export, Job, Project, file_is_live
from core.tables import File as FileRow
from core.uploads import reserved_bytes as reserved_upload_bytes


class QuotaExceeded(Exception):
    """A project over one of its limits (the API answers 429 `quota_exceeded`); `setting` names the limit."""

    def __init__(self, message: str, setting: str):
        super().__init__(message)
        self.message, self.setting = message, setting


def lock_project(session: Session, project: str) -> None:
    """Take the project's row lock (PostgreSQL; SQLite has one writer anyway) until the transaction ends: without it
    two requests could both count N-1 and both add one, passing a limit of N."""
    session.execute(select(Project.name).where(Project.name == project).with_for_update())


def check_job_slots(session: Session, settings: Settings, project: str) -> None:
    """Room for one more job: fewer than the active (queued or running) and queued limits. Call under `lock_project`."""
    active = dict(session.execute(select(Job.status, func.count()).where(
        # The active statuses named (not "not terminal"): the (project, status) index then skips the project's history.
        Job.project == project, Job.status.in_([status.value for status in JobStatus if status not in TERMINAL])).group_by(Job.status)).all())
    if sum(active.values()) >= settings.max_active_jobs_per_project:
        raise QuotaExceeded(f"This project has {sum(active.values())} queued or running jobs, the most it may have at once",
                            "QLORA_MAX_ACTIVE_JOBS_PER_PROJECT")
    queued = active.get(JobStatus.QUEUED.value, 0)
    if queued >= settings.max_queued_jobs_per_project:
        raise QuotaExceeded(f"This project has {queued} queued jobs, the most it may have waiting at once",
                            "QLORA_MAX_QUEUED_JOBS_PER_PROJECT")


def stored_bytes(session: Session, project: str, *, except_export: str | None = None) -> tuple[int, int]:
    """(bytes of the project's live files, bytes reserved: the declared size of its live uploads of the Uploads API
    (core/uploads.py) and the estimated size of its pending merged exports, but `except_export`'s)."""
    files = session.scalar(select(func.coalesce(func.sum(FileRow.bytes), 0)).where(FileRow.project == project, file_is_live()))
    uploads = reserved_upload_bytes(session, project)
    pending = select(func.coalesce(func.sum(Export.reserved_bytes), 0)).join(Job, Job.id == Export.job_id).where(
        Job.project == project, Export.status.in_(ACTIVE))
    if except_export is not None:
        pending = pending.where(Export.id != except_export)
    return int(files or 0), int(uploads or 0) + int(session.scalar(pending) or 0)


def check_stored_bytes(session: Session, settings: Settings, project: str, size: int, what: str = "", *,
                       except_export: str | None = None) -> None:
    """QuotaExceeded when `size` more bytes (`what`, for the message) would pass the project's stored-bytes limit,
    counting the bytes its pending exports reserved (but `except_export`'s: the export being committed)."""
    files, reserved = stored_bytes(session, project, except_export=except_export)
    if files + reserved + size > settings.max_stored_bytes_per_project:
        held = f"{files} bytes of files" + (f" and {reserved} bytes reserved by uploads and merged exports not yet stored"
                                            if reserved else "")
        raise QuotaExceeded(f"This project stores {held}; {what or ''}{size} more would pass its limit of "
                            f"{settings.max_stored_bytes_per_project}", "QLORA_MAX_STORED_BYTES_PER_PROJECT")


def training_queue_room(session: Session, settings: Settings, project: str) -> int:
    """How many more of the project's queued jobs and merged exports may be sent to the training queue now (fair
    dispatch): its messages waiting in the broker stay under QLORA_QUEUED_MESSAGES_PER_PROJECT, its jobs and exports
    running or sent under QLORA_MAX_RUNNING_JOBS_PER_PROJECT. Takes the project's row lock."""
    lock_project(session, project)
    counts = dict(session.execute(
        select(Job.status, func.count()).where(Job.project == project, Job.status.in_([JobStatus.RUNNING.value, JobStatus.QUEUED.value]),
                                               (Job.status == JobStatus.RUNNING.value) | Job.enqueued_at.is_not(None))
        .group_by(Job.status)).all())
    waiting, running = counts.get(JobStatus.QUEUED.value, 0), counts.get(JobStatus.RUNNING.value, 0)
    # A merged export takes a GPU on the same queue: it counts as a job of the project, sent or running.
    exports = dict(session.execute(
        select(Export.status, func.count()).join(Job, Job.id == Export.job_id)
        .where(Job.project == project, Export.status.in_(ACTIVE),
               (Export.status == ExportStatus.RUNNING.value) | Export.enqueued_at.is_not(None))
        .group_by(Export.status)).all())
    waiting += exports.get(ExportStatus.QUEUED.value, 0)
    running += exports.get(ExportStatus.RUNNING.value, 0)
    return min(settings.queued_messages_per_project - waiting, settings.max_running_jobs_per_project - running - waiting)
