"""/v1/uploads: a large file in parts (OpenAI's Uploads API; the SDK's `uploads.upload_file_chunked`).

`POST /uploads` reserves the declared bytes against the project's stored-bytes limit and opens a pending upload
for an hour. Each part (multipart field `data`, up to 64 MiB) is spooled to disk by the form parser and stored as
an object of its own. Completion reads the parts in the order given, once, as a stream (MD5, SHA-256 and the
line-by-line check of POST /v1/files, never the whole file in memory nor on the API's disk), then joins them into
the file's object (on S3 a multipart upload of server-side copies) and records the file; the parts are deleted.
Cancelled and expired uploads lose their parts here or in the sweeper (core/uploads.py).
"""

from __future__ import annotations

import hmac
import io
from typing import Annotated

from fastapi import APIRouter, File, UploadFile
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from api.deps import CurrentProject, SessionDep, SettingsDep, StorageDep
from api.errors import APIError, bad_request, not_found
from api.openapi import error_responses
from api.routes.files import UploadRoute, check_purpose, summarize_faults
from api.schemas import UploadComplete, UploadCreate, UploadObject, UploadPartObject, first_unstorable
from contract.data_format import validate_file
from core import ids
from core.quotas import check_stored_bytes, lock_project
from core.settings import Settings
from core.storage import CHUNK, ConcatenatedReader, ObjectNotFound, delete_quietly
from core.tables import File as FileRow
from core.tables import Upload, UploadPart, now
from core.uploads import MAX_PART_BYTES, UPLOAD_LIFETIME_S, discard_parts

router = APIRouter(prefix="/uploads", tags=["uploads"])


class PartRoute(UploadRoute):
    """A part's body is cut off past 64 MiB, before it is read whole (see UploadRoute)."""

    param = "data"

    def max_bytes(self, settings: Settings) -> int:
        return MAX_PART_BYTES


def _check_storable(body: UploadCreate | UploadComplete) -> None:
    if found := first_unstorable(body.model_dump(exclude_none=True)):
        param, reason = found
        raise bad_request(f"Invalid '{param}': {reason}.", param=param or None, code="invalid_value")


def get_upload(session: Session, project: str, upload_id: str, *, lock: bool = False) -> Upload:
    query = select(Upload).where(Upload.id == upload_id, Upload.project == project)
    row = session.scalar(query.with_for_update() if lock else query)
    if row is None:
        raise not_found(f"No such upload: {upload_id}", param="upload_id", code="upload_not_found")
    return row


def check_pending(row: Upload, action: str) -> None:
    """400 naming why an upload that is not pending (completed, cancelled, expired) cannot take `action`."""
    status = UploadObject.from_row(row).status
    if status != "pending":
        raise bad_request(f"Cannot {action} upload {row.id}: it is {status}.", param="upload_id", code=f"upload_{status}")


@router.post("", response_model=UploadObject, summary="Create an upload", responses=error_responses(429))
def create_upload(body: UploadCreate, project: CurrentProject, session: SessionDep, settings: SettingsDep) -> UploadObject:
    _check_storable(body)
    check_purpose(body.purpose)
    limit = settings.max_multipart_upload_bytes
    if body.bytes > limit:
        raise bad_request(f"An upload may hold at most {limit} bytes; this one declares {body.bytes}.", param="bytes", code="invalid_value")
    created_at = now()
    row = Upload(id=ids.upload_id(), project=project, filename=body.filename, purpose=body.purpose, mime_type=body.mime_type,
                 bytes=body.bytes, status="pending", created_at=created_at, expires_at=created_at + UPLOAD_LIFETIME_S,
                 file_expires_after=body.expires_after.seconds if body.expires_after else None)
    # The project's row lock orders this reservation with concurrent uploads and exports (see POST /v1/files).
    lock_project(session, project)
    check_stored_bytes(session, settings, project, body.bytes)
    session.add(row)
    session.commit()
    return UploadObject.from_row(row)


def add_part(upload_id: str, project: CurrentProject, session: SessionDep, storage: StorageDep,
             data: Annotated[UploadFile, File(description="The part's bytes (at most 64 MiB).")]) -> UploadPartObject:
    check_pending(get_upload(session, project, upload_id), "add a part to")
    size = data.size if data.size is not None else data.file.seek(0, io.SEEK_END)
    if size == 0:
        raise bad_request("A part must hold at least one byte.", param="data", code="invalid_value")
    part = UploadPart(id=ids.upload_part_id(), upload_id=upload_id, bytes=size, created_at=now())
    part.storage_key = f"uploads/{upload_id}/{part.id}"
    session.rollback()  # no transaction held while the part is stored
    data.file.seek(0)
    storage.put_fileobj(part.storage_key, data.file)
    try:
        # Under the upload's row lock: the upload is still pending and all its parts stay within its declared bytes.
        upload = get_upload(session, project, upload_id, lock=True)
        check_pending(upload, "add a part to")
        received = session.scalar(select(func.coalesce(func.sum(UploadPart.bytes), 0)).where(UploadPart.upload_id == upload_id))
        if received + size > upload.bytes:
            raise bad_request(f"This part would bring upload {upload_id} to {received + size} bytes, more than the {upload.bytes} it was "
                              "created with.", param="data", code="upload_bytes_exceeded")
        session.add(part)
        session.commit()
    except BaseException:
        delete_quietly(storage, part.storage_key)
        raise
    return UploadPartObject.model_validate(part)


router.add_api_route("/{upload_id}/parts", add_part, methods=["POST"], response_model=UploadPartObject, summary="Add a part to an upload",
                     responses=error_responses(404, 413), route_class_override=PartRoute)


def _ordered_parts(session: Session, upload: Upload, part_ids: list[str]) -> list[UploadPart]:
    """The parts named, in that order; a 400 naming the first id that is repeated, unknown or of another upload."""
    if len(set(part_ids)) != len(part_ids):
        repeated = next(part_id for part_id in part_ids if part_ids.count(part_id) > 1)
        raise bad_request(f"Part {repeated} is listed more than once.", param="part_ids", code="invalid_part")
    rows = {row.id: row for row in session.scalars(select(UploadPart).where(UploadPart.id.in_(part_ids)))}
    for part_id in part_ids:
        row = rows.get(part_id)
        if row is None:
            raise bad_request(f"No such part: {part_id}.", param="part_ids", code="invalid_part")
        if row.upload_id != upload.id:
            raise bad_request(f"Part {part_id} belongs to another upload, not to {upload.id}.", param="part_ids", code="invalid_part")
    return [rows[part_id] for part_id in part_ids]


@router.post("/{upload_id}/complete", response_model=UploadObject, summary="Complete an upload", responses=error_responses(404))
def complete_upload(upload_id: str, body: UploadComplete, project: CurrentProject, session: SessionDep,
                    storage: StorageDep) -> UploadObject:
    _check_storable(body)
    upload = get_upload(session, project, upload_id)
    check_pending(upload, "complete")
    parts = _ordered_parts(session, upload, body.part_ids)
    total = sum(part.bytes for part in parts)
    if total != upload.bytes:
        raise bad_request(f"The parts listed hold {total} bytes, but upload {upload_id} was created with {upload.bytes}.",
                          param="part_ids", code="upload_bytes_mismatch")
    keys = [part.storage_key for part in parts]
    session.rollback()  # no transaction held while the parts are read

    # One pass over the parts in order: the format check of POST /v1/files line by line, with both digests.
    reader = ConcatenatedReader(storage, keys)
    try:
        report = validate_file(io.BufferedReader(reader, CHUNK), min_examples=1)
    except ObjectNotFound:  # the sweeper removed the parts: the upload expired meanwhile
        check_pending(get_upload(session, project, upload_id), "complete")
        raise
    if body.md5 is not None and not hmac.compare_digest(body.md5.lower(), reader.md5.hexdigest()):
        raise bad_request(f"The MD5 of the parts in this order is {reader.md5.hexdigest()}, not the {body.md5} given.",
                          param="md5", code="md5_mismatch")

    created_at = now()
    file = FileRow(id=ids.file_id(), project=project, filename=upload.filename, purpose=upload.purpose, bytes=total,
                   sha256=reader.sha256.hexdigest(), status="processed" if report.ok else "error",
                   status_details=None if report.ok else summarize_faults(report), n_examples=report.n_examples,
                   created_at=created_at,
                   expires_at=created_at + upload.file_expires_after if upload.file_expires_after else None)
    file.storage_key = f"files/{file.id}"
    storage.concatenate(file.storage_key, keys)
    try:
        # The reservation becomes the file in one transaction (the same bytes: no new quota check). Only one of two
        # concurrent completions moves the upload out of `pending`.
        completed = session.execute(update(Upload).where(Upload.id == upload_id, Upload.status == "pending", Upload.expires_at > now())
                                    .values(status="completed", file_id=file.id)).rowcount
        if not completed:
            session.rollback()
            check_pending(get_upload(session, project, upload_id), "complete")
            raise APIError(409, f"Upload {upload_id} changed while completing; retry.", code="conflict")
        session.add(file)
        session.commit()
    except BaseException:
        delete_quietly(storage, file.storage_key)
        raise
    discard_parts(session, storage, upload_id)
    session.commit()
    return UploadObject.from_row(get_upload(session, project, upload_id), file)


@router.post("/{upload_id}/cancel", response_model=UploadObject, summary="Cancel an upload", responses=error_responses(404))
def cancel_upload(upload_id: str, project: CurrentProject, session: SessionDep, storage: StorageDep) -> UploadObject:
    upload = get_upload(session, project, upload_id, lock=True)
    check_pending(upload, "cancel")
    upload.status = "cancelled"
    session.commit()
    discard_parts(session, storage, upload_id)  # what fails to go here, the sweeper removes
    session.commit()
    return UploadObject.from_row(upload)
