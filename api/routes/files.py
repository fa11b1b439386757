"""/v1/files: upload (validated at once), list, retrieve, download, delete.

An upload is copied to a temporary file in chunks (never whole in memory) with the size limit enforced while
copying, checked with `validate_file`, put in object storage and only then recorded; a file that fails
validation is still stored, with status `error` and the faults in `status_details`, but no job can use it.
The upload check is the format of every line; the number of examples a training file needs is checked when a
job trains on it, since the same upload may serve as a (smaller) validation file.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.responses import Response
from starlette.types import Message

from api.auth import bearer_scheme, project_for_key
from api.deps import CurrentProject, SessionDep, SettingsDep, StorageDep
from api.errors import APIError, bad_request, not_found
from api.openapi import error_responses
from api.pagination import fetch_page_after
from api.schemas import CursorPage, FileDeleted, FileObject
from contract.data_format import ValidationReport, validate_file
from core import ids
from core.quotas import check_stored_bytes, lock_project
from core.settings import Settings
from core.storage import ObjectNotFound, ObjectTooLarge, delete_quietly, spool_stream
from core.tables import File as FileRow
from core.tables import file_is_live, now

UPLOAD_PURPOSES = ("fine-tune",)
# Room for the multipart framing around the file: boundaries, part headers (filename), the purpose and
# expires_after fields. The file's own bytes are limited exactly, while they are copied.
MULTIPART_OVERHEAD = 64 * 1024
EXPIRES_AFTER_SECONDS = (3600, 2592000)
SHOWN_FAULTS = 5
MAX_FILENAME = 512  # the column's width


def file_too_large(limit: int, param: str = "file") -> APIError:
    return APIError(413, f"File is too large: the limit is {limit} bytes.", param=param, code="file_too_large")


class UploadRoute(APIRoute):
    """FastAPI reads a multipart body before any dependency or handler runs, so an upload is checked here
    first, before its body is read: the API key (no one spools a gigabyte without one) and the declared
    Content-Length against the limit. A body without a Content-Length (chunked) is cut off as soon as it
    passes the limit. Subclasses set another limit (`max_bytes`) and name another form field (`param`)."""

    param = "file"

    def max_bytes(self, settings: Settings) -> int:
        return settings.max_upload_bytes

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked_handler(request: Request) -> Response:
            if request.method != "POST":
                return await handler(request)
            settings: Settings = request.app.state.settings
            project_for_key(settings, await bearer_scheme(request))
            max_bytes = self.max_bytes(settings)
            limit = max_bytes + MULTIPART_OVERHEAD
            declared = request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise file_too_large(max_bytes, self.param)
            received = 0

            async def receive() -> Message:
                nonlocal received
                message = await request.receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise file_too_large(max_bytes, self.param)
                return message

            return await handler(Request(request.scope, receive))

        return checked_handler


router = APIRouter(prefix="/files", tags=["files"], route_class=UploadRoute)


def summarize_faults(report: ValidationReport) -> str:
    """'line 3: invalid_file_format: not valid JSON ...; ...; (12 problems in all)': the first few line faults
    and every whole-file fault (too few examples, empty file), each with its line and code."""
    line_faults = [f for f in report.faults if f.line is not None]
    file_faults = [f for f in report.faults if f.line is None]
    parts = []
    for fault in line_faults[:SHOWN_FAULTS]:
        prefix = f"line {fault.line}"
        detail = fault.message.removeprefix(f"{prefix}: ").removeprefix(f"{prefix} ")
        parts.append(f"{prefix}: {fault.code}: {detail}")
    parts += [f"{fault.code}: {fault.message}" for fault in file_faults]
    summary = "; ".join(parts)
    if report.n_faults > len(parts):
        summary += f"; ({report.n_faults} problems in all)"
    return summary


def check_purpose(purpose: str) -> None:
    if purpose not in UPLOAD_PURPOSES:
        raise bad_request(
            f"Invalid purpose {purpose!r}: this service accepts uploads for 'fine-tune' only.", param="purpose", code="unsupported_value"
        )


def _expires_at(created_at: int, anchor: str | None, seconds: int | None) -> int | None:
    if anchor is None and seconds is None:
        return None
    if seconds is None:
        raise bad_request(
            "Missing required parameter: 'expires_after.seconds'.", param="expires_after.seconds", code="missing_required_parameter"
        )
    if anchor is None:
        raise bad_request(
            "Missing required parameter: 'expires_after.anchor'.", param="expires_after.anchor", code="missing_required_parameter"
        )
    return created_at + seconds


def get_file_row(session: Session, project: str, file_id: str) -> FileRow:
    row = session.scalar(select(FileRow).where(FileRow.id == file_id, FileRow.project == project, file_is_live()))
    if row is None:
        raise not_found(f"No such file: {file_id}", param="file_id", code="file_not_found")
    return row


@router.post("", response_model=FileObject, summary="Upload a file", responses=error_responses(429))
def upload_file(
    project: CurrentProject,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    # Typed as any string, so that another purpose gets the handler's own answer (`unsupported_value`), but
    # documented as the one value accepted.
    purpose: Annotated[str, Form(description="Only 'fine-tune' is accepted.", json_schema_extra={"enum": list(UPLOAD_PURPOSES)})],
    file: Annotated[UploadFile, File(description="JSONL training data, one example a line.")],
    expires_after_anchor: Annotated[Literal["created_at"] | None, Form(alias="expires_after[anchor]")] = None,
    expires_after_seconds: Annotated[
        int | None, Form(alias="expires_after[seconds]", ge=EXPIRES_AFTER_SECONDS[0], le=EXPIRES_AFTER_SECONDS[1])
    ] = None,
) -> FileObject:
    check_purpose(purpose)
    filename = file.filename or "upload"
    if len(filename) > MAX_FILENAME:
        raise bad_request(f"The file name is longer than {MAX_FILENAME} characters.", param="file", code="invalid_value")
    created_at = now()
    expires_at = _expires_at(created_at, expires_after_anchor, expires_after_seconds)

    spool_dir = settings.home / "tmp"
    spool_dir.mkdir(parents=True, exist_ok=True)
    try:
        path, size, sha256 = spool_stream(file.file, spool_dir, max_bytes=settings.max_upload_bytes)
    except ObjectTooLarge:
        raise file_too_large(settings.max_upload_bytes) from None
    try:
        check_stored_bytes(session, settings, project, size)  # early, before the work; again under the lock below
        # One example is enough here: the file may serve as a small validation file. The engine's minimum for
        # a training file (MIN_EXAMPLES) is checked when a job trains on it.
        report = validate_file(path, min_examples=1)
        row = FileRow(
            id=ids.file_id(),
            project=project,
            filename=filename,
            purpose=purpose,
            bytes=size,
            sha256=sha256,
            status="processed" if report.ok else "error",
            status_details=None if report.ok else summarize_faults(report),
            n_examples=report.n_examples,
            kind=report.kind if report.ok else None,
            created_at=created_at,
            expires_at=expires_at,
        )
        row.storage_key = f"files/{row.id}"
        storage.put_file(row.storage_key, path)
        try:
            # The project's row lock (PostgreSQL) orders concurrent uploads of one project from the count to the
            # commit: without it two uploads could both fit under the limit and together pass it.
            lock_project(session, project)
            check_stored_bytes(session, settings, project, size)
            session.add(row)
            session.commit()
        except BaseException:
            delete_quietly(storage, row.storage_key)
            raise
    finally:
        Path(path).unlink(missing_ok=True)
    return FileObject.from_row(row)


@router.get("", response_model=CursorPage[FileObject], summary="List files")
def list_files(
    project: CurrentProject,
    session: SessionDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    order: Literal["asc", "desc"] = "desc",
    purpose: str | None = None,
) -> CursorPage[FileObject]:
    where = [FileRow.project == project, file_is_live()]
    if purpose is not None:
        where.append(FileRow.purpose == purpose)
    rows, has_more = fetch_page_after(session, FileRow, where, after=after, limit=limit, newest_first=order == "desc")
    data = [FileObject.from_row(r) for r in rows]
    return CursorPage[FileObject](
        data=data, has_more=has_more, first_id=data[0].id if data else None, last_id=data[-1].id if data else None
    )


@router.get("/{file_id}", response_model=FileObject, summary="Retrieve a file", responses=error_responses(404))
def retrieve_file(file_id: str, project: CurrentProject, session: SessionDep) -> FileObject:
    return FileObject.from_row(get_file_row(session, project, file_id))


@router.get(
    "/{file_id}/content",
    summary="Download a file's content",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, **error_responses(404)},
)
def file_content(file_id: str, project: CurrentProject, session: SessionDep, storage: StorageDep) -> StreamingResponse:
    row = get_file_row(session, project, file_id)
    try:
        chunks = storage.iter_bytes(row.storage_key)
    except ObjectNotFound:
        raise not_found(f"No such file: {file_id}", param="file_id", code="file_not_found") from None
    session.close()  # the connection goes back to the pool now, not after the last byte of a long download
    return StreamingResponse(
        chunks, media_type="application/octet-stream", headers={"content-disposition": f'attachment; filename="{row.id}"'}
    )


@router.delete("/{file_id}", response_model=FileDeleted, summary="Delete a file", responses=error_responses(404))
def delete_file(file_id: str, project: CurrentProject, session: SessionDep, storage: StorageDep) -> FileDeleted:
    row = get_file_row(session, project, file_id)
    session.delete(row)
    session.commit()
    # The row goes first: an object without a row is invisible garbage, a row without its object a broken file.
    delete_quietly(storage, row.storage_key)
    return FileDeleted(id=file_id, deleted=True)
