"""The stored-bytes limit of a project, checked the same way before an upload and before a merged export. Live
uploads of the Uploads API count with their declared size from their creation (core/uploads.py)."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.errors import quota_exceeded
from core.models import File as FileRow
from core.models import file_is_live
from core.settings import Settings
from core.uploads import reserved_bytes


def check_stored_bytes(session: Session, settings: Settings, project: str, size: int, what: str = "") -> None:
    """429 when `size` more bytes (`what`, for the message) would pass the project's stored-bytes limit."""
    stored = session.scalar(select(func.coalesce(func.sum(FileRow.bytes), 0)).where(FileRow.project == project, file_is_live()))
    stored += reserved_bytes(session, project)
    if stored + size > settings.max_stored_bytes_per_project:
        raise quota_exceeded(f"This project stores {stored} bytes of files; {what or ''}{size} more would pass its limit of "
                             f"{settings.max_stored_bytes_per_project}", "QLORA_MAX_STORED_BYTES_PER_PROJECT")
