"""The Uploads API's bookkeeping shared by the API and the sweeper: what a pending upload reserves, and removing
the parts of uploads that are done with (completed, cancelled or expired).

A part is an object (`uploads/<upload id>/<part id>`) plus its row; the row goes only after the object is deleted,
so a part whose deletion failed is still listed and the next sweep tries again.
"""

from __future__ import annotations

import logging

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from core.db import session_scope
from core.storage import ObjectStorage
from core.tables import Upload, UploadPart, now

UPLOAD_LIFETIME_S = 3600  # OpenAI's: an upload not completed within an hour expires
MAX_PART_BYTES = 64 * 1024 * 1024  # OpenAI's limit per part, and the SDK's default part size

log = logging.getLogger(__name__)


def upload_is_live(at: int | None = None):  # noqa: ANN201 (a SQL expression)
    """Pending and not yet expired: parts may still be added and it may still complete."""
    return (Upload.status == "pending") & (Upload.expires_at > (now() if at is None else at))


def reserved_bytes(session: Session, project: str) -> int:
    """The declared bytes of the project's live uploads: counted against its stored-bytes limit from creation."""
    return session.scalar(select(func.coalesce(func.sum(Upload.bytes), 0)).where(Upload.project == project, upload_is_live()))


def discard_parts(session: Session, storage: ObjectStorage, upload_id: str) -> int:
    """Delete the upload's part objects, then the rows of those deleted; returns how many went. The caller commits."""
    parts = session.execute(select(UploadPart.id, UploadPart.storage_key).where(UploadPart.upload_id == upload_id)).all()
    gone = []
    for part_id, key in parts:
        try:
            storage.delete(key)
        except Exception:
            log.warning("could not delete part %s of upload %s; the sweeper tries again", part_id, upload_id, exc_info=True)
            continue
        gone.append(part_id)
    if gone:
        session.execute(delete(UploadPart).where(UploadPart.id.in_(gone)))
    return len(gone)


def sweep_uploads(session_factory: sessionmaker[Session], storage: ObjectStorage, at: float | None = None) -> list[str]:
    """Mark pending uploads past their hour (at Unix time `at`, now by default) `expired`, and remove the parts of
    every upload that is no longer live (expired, cancelled, or completed with parts left behind). Returns the ids
    of the uploads cleaned."""
    at = now() if at is None else int(at)
    with session_scope(session_factory) as session:
        session.execute(update(Upload).where(Upload.status == "pending", Upload.expires_at <= at).values(status="expired"))
        done_with = session.scalars(select(UploadPart.upload_id).join(Upload, Upload.id == UploadPart.upload_id)
                                    .where(~upload_is_live(at)).distinct()).all()
    for upload_id in done_with:
        with session_scope(session_factory) as session:
            discard_parts(session, storage, upload_id)
    return list(done_with)
