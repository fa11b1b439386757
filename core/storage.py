"""Object storage: one interface, two backends (a local directory, or any S3-compatible server via boto3).

Datasets, checkpoint archives and result files live here under keys like `files/<file id>`; the database
holds the key. Writes never leave a partial object visible: the local backend writes to a temporary file
and renames it, S3 publishes an object only when its (multipart) upload completes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from core.settings import Settings

CHUNK = 1024 * 1024
S3_MIN_PART = 5 * 1024 * 1024  # S3's smallest part of a multipart upload (all but the last)
PARTIAL_SUFFIX = ".partial"  # the local backend's object being written
STALE_PARTIAL_S = 15 * 60  # a partial file untouched this long was left by a killed writer

log = logging.getLogger(__name__)


class ObjectNotFound(KeyError):
    pass


class ObjectTooLarge(ValueError):
    def __init__(self, limit: int):
        super().__init__(f"object exceeds the limit of {limit} bytes")
        self.limit = limit


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    sha256: str


class ObjectStorage(Protocol):
    def put_file(self, key: str, path: Path) -> StoredObject: ...
    def put_fileobj(self, key: str, fileobj: BinaryIO) -> None: ...
    def concatenate(self, key: str, sources: list[str]) -> None: ...
    def download(self, key: str, path: Path) -> None: ...
    def iter_bytes(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]: ...
    def size(self, key: str) -> int: ...
    def delete(self, key: str) -> None: ...
    def exists(self, key: str) -> bool: ...


def spool_stream(stream: BinaryIO, directory: Path | None = None, max_bytes: int | None = None) -> tuple[Path, int, str]:
    """Copy a stream to a temporary file in chunks (never whole in memory), hashing and counting as it goes.
    Raises ObjectTooLarge (and removes the file) past `max_bytes`. Returns (path, size, sha256)."""
    digest = hashlib.sha256()
    size = 0
    fd, name = tempfile.mkstemp(prefix="upload-", dir=directory)
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := stream.read(CHUNK):
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise ObjectTooLarge(max_bytes)
                digest.update(chunk)
                out.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path, size, digest.hexdigest()


def _fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable (POSIX: the directory entry is only on disk once the directory is synced)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class LocalStorage:
    """Objects as files under a root directory (the embedded default)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError(f"invalid object key {key!r}")
        return path

    def put_file(self, key: str, path: Path) -> StoredObject:
        """Copy to `KEY.partial`, fsync it, rename it over the key, fsync the directory: once this returns, the
        object survives a power loss (a row committed after it never names a missing or truncated file). A
        failed write (a full disk) removes its partial file and raises."""
        with Path(path).open("rb") as source:
            self._publish(key, [source])
        target = self._path(key)
        return StoredObject(key, target.stat().st_size, sha256_of(target))

    def put_fileobj(self, key: str, fileobj: BinaryIO) -> None:
        """Store what `fileobj` holds (read in chunks), published as `put_file` publishes."""
        self._publish(key, [fileobj])

    def concatenate(self, key: str, sources: list[str]) -> None:
        """Store the objects `sources`, in this order, as one object `key`; the sources stay."""
        paths = [self._path(source) for source in sources]
        missing = [source for source, path in zip(sources, paths, strict=True) if not path.is_file()]
        if missing:
            raise ObjectNotFound(missing[0])
        with contextlib.ExitStack() as stack:
            self._publish(key, [stack.enter_context(path.open("rb")) for path in paths])

    def _publish(self, key: str, readers: list[BinaryIO]) -> None:
        """Copy `readers` one after the other into `KEY.partial`, then fsync and rename it over the key."""
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + PARTIAL_SUFFIX)
        try:
            with tmp.open("wb") as out:
                for reader in readers:
                    shutil.copyfileobj(reader, out, CHUNK)
                out.flush()
                os.fsync(out.fileno())
            tmp.replace(target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_directory(target.parent)

    def remove_stale_partials(self, older_than_s: float = STALE_PARTIAL_S) -> list[Path]:
        """Delete the `*.partial` files that writers killed mid-copy left behind: those untouched for
        `older_than_s` (a write in progress keeps its file's mtime fresh). Returns what was removed."""
        cutoff = time.time() - older_than_s
        removed = []
        for path in self.root.rglob(f"*{PARTIAL_SUFFIX}"):
            try:
                if path.is_file() and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed.append(path)
            except FileNotFoundError:  # finished or removed meanwhile
                continue
        return removed

    def download(self, key: str, path: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise ObjectNotFound(key)
        shutil.copyfile(source, path)

    def iter_bytes(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        source = self._path(key)
        if not source.is_file():
            raise ObjectNotFound(key)

        def chunks() -> Iterator[bytes]:
            with source.open("rb") as f:
                while chunk := f.read(chunk_size):
                    yield chunk

        return chunks()

    def size(self, key: str) -> int:
        source = self._path(key)
        if not source.is_file():
            raise ObjectNotFound(key)
        return source.stat().st_size

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()


class S3Storage:
    """Objects in an S3 bucket (AWS, MinIO, or any S3-compatible server). boto3 reads credentials from the
    usual AWS_* variables; `endpoint_url` points it at MinIO."""

    def __init__(self, bucket: str, endpoint_url: str | None = None, region: str | None = None, client=None):  # noqa: ANN001
        import boto3

        self.bucket = bucket
        self.endpoint_url, self.region = endpoint_url, region
        self.client = client or boto3.client("s3", endpoint_url=endpoint_url, region_name=region)
        self._probe_client = None

    def probe(self, timeout_s: float) -> None:
        """One cheap request with short timeouts and no retries, for readiness checks: boto3's defaults (60 s reads,
        several attempts) would keep a probe of a hung endpoint waiting for minutes. Raises when the store does not
        answer in time."""
        if self._probe_client is None:
            import boto3
            from botocore.config import Config

            config = Config(connect_timeout=timeout_s, read_timeout=timeout_s, retries={"total_max_attempts": 1, "mode": "standard"})
            self._probe_client = boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config)
        try:
            self._probe_client.head_object(Bucket=self.bucket, Key="readyz-probe")
        except Exception as exc:
            if not self._missing(exc):  # an answer, even "no such key", means the store is there
                raise

    def ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)

    def put_file(self, key: str, path: Path) -> StoredObject:
        # upload_file uses multipart uploads for large files: the object appears only when complete.
        self.client.upload_file(str(path), self.bucket, key)
        return StoredObject(key, path.stat().st_size, sha256_of(path))

    def put_fileobj(self, key: str, fileobj: BinaryIO) -> None:
        """One PUT that streams `fileobj` (a seekable file; up to S3's 5 GB per PUT, far above an upload part)."""
        fileobj.seek(0, os.SEEK_END)
        length = fileobj.tell()
        fileobj.seek(0)
        self.client.put_object(Bucket=self.bucket, Key=key, Body=fileobj, ContentLength=length)

    def concatenate(self, key: str, sources: list[str]) -> None:
        """A multipart upload of `key` whose parts are server-side copies of `sources` (no byte passes through this
        process). S3 wants every part but the last to be at least 5 MiB; smaller sources are copied in with their
        neighbours through a temporary file on disk instead, one part at a time."""
        sizes = [self.size(source) for source in sources]
        upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
        try:
            parts = []
            pending: list[str] = []  # small sources gathered into the next part
            pending_bytes = 0
            for index, (source, size) in enumerate(zip(sources, sizes, strict=True)):
                is_last = index == len(sources) - 1
                if not pending and (size >= S3_MIN_PART or is_last):
                    answer = self.client.upload_part_copy(Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=len(parts) + 1,
                                                          CopySource={"Bucket": self.bucket, "Key": source})
                    parts.append({"PartNumber": len(parts) + 1, "ETag": answer["CopyPartResult"]["ETag"]})
                    continue
                pending.append(source)
                pending_bytes += size
                if pending_bytes >= S3_MIN_PART or is_last:
                    parts.append(self._upload_joined_part(key, upload_id, len(parts) + 1, pending))
                    pending, pending_bytes = [], 0
            self.client.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts})
        except BaseException:
            with contextlib.suppress(Exception):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            raise

    def _upload_joined_part(self, key: str, upload_id: str, number: int, sources: list[str]) -> dict[str, Any]:
        with tempfile.TemporaryFile() as joined:
            for source in sources:
                for chunk in self.iter_bytes(source):
                    joined.write(chunk)
            length = joined.tell()
            joined.seek(0)
            answer = self.client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number,
                                             Body=joined, ContentLength=length)
        return {"PartNumber": number, "ETag": answer["ETag"]}

    def _missing(self, exc: Exception) -> bool:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code")
        return code in ("404", "NoSuchKey", "NotFound")

    def download(self, key: str, path: Path) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.download_file(self.bucket, key, str(path))
        except ClientError as exc:
            if self._missing(exc):
                raise ObjectNotFound(key) from None
            raise

    def iter_bytes(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
        except ClientError as exc:
            if self._missing(exc):
                raise ObjectNotFound(key) from None
            raise
        return body.iter_chunks(chunk_size)

    def size(self, key: str) -> int:
        from botocore.exceptions import ClientError

        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"])
        except ClientError as exc:
            if self._missing(exc):
                raise ObjectNotFound(key) from None
            raise

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=key)

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
            return True
        except ObjectNotFound:
            return False


class ConcatenatedReader(io.RawIOBase):
    """The objects `keys` read one after the other as one stream, in storage-sized chunks (wrap it in
    io.BufferedReader for readline), with the MD5 and SHA-256 of what was read so far."""

    def __init__(self, storage: ObjectStorage, keys: list[str]):
        super().__init__()
        self.md5, self.sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
        self._chunks = (chunk for key in keys for chunk in storage.iter_bytes(key))
        self._buffer = b""

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        while not self._buffer:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self.md5.update(chunk)
            self.sha256.update(chunk)
            self._buffer = chunk
        n = min(len(target), len(self._buffer))
        target[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n


def delete_quietly(storage: ObjectStorage, *keys: str) -> None:
    """Delete objects on a clean-up path (after a failed or refused write): a failure to delete is logged, not
    raised, because it only leaves an orphaned object behind, never a row pointing at nothing."""
    for key in keys:
        try:
            storage.delete(key)
        except Exception:
            log.exception("could not delete object %s; it is orphaned", key)


def remove_stale_partials(storage: ObjectStorage, older_than_s: float = STALE_PARTIAL_S) -> list[str]:
    """The local backend's leftovers of killed writes (see LocalStorage.remove_stale_partials), as paths; nothing
    on S3, which never shows an incomplete upload as an object."""
    if not isinstance(storage, LocalStorage):
        return []
    return [str(path) for path in storage.remove_stale_partials(older_than_s)]


def make_storage(settings: Settings) -> ObjectStorage:
    if settings.storage == "s3":
        if not settings.s3_bucket:
            raise ValueError("QLORA_STORAGE=s3 needs QLORA_S3_BUCKET")
        return S3Storage(settings.s3_bucket, settings.s3_endpoint, settings.s3_region)
    assert settings.storage_dir is not None
    return LocalStorage(settings.storage_dir)
