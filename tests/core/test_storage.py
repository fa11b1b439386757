"""Object storage: one contract, run against both backends (a local directory, and S3 through moto's server)."""

from __future__ import annotations

import hashlib
import io
import os
import secrets
from pathlib import Path

import pytest

from core.settings import Settings
from core.storage import (
    LocalStorage,
    ObjectNotFound,
    ObjectTooLarge,
    S3Storage,
    StoredObject,
    make_storage,
    sha256_of,
    spool_stream,
)


@pytest.fixture
def local_storage(tmp_path) -> LocalStorage:
    return LocalStorage(tmp_path / "objects")


@pytest.fixture
def s3_storage(s3_endpoint, aws_test_credentials) -> S3Storage:
    storage = S3Storage(f"qlora-test-{secrets.token_hex(4)}", endpoint_url=s3_endpoint, region="us-east-1")
    storage.ensure_bucket()
    storage.ensure_bucket()  # idempotent: the bucket exists now
    return storage


@pytest.fixture(params=["local", "s3"])
def storage(request):
    return request.getfixturevalue(f"{request.param}_storage")


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_put_size_exists_iter_download_delete(storage, tmp_path):
    data = b'{"messages": []}\n' * 1000
    source = write(tmp_path / "upload.jsonl", data)
    key = "files/file-abc"

    assert not storage.exists(key)
    stored = storage.put_file(key, source)
    assert stored == StoredObject(key, len(data), hashlib.sha256(data).hexdigest())
    assert storage.exists(key)
    assert storage.size(key) == len(data)
    assert b"".join(storage.iter_bytes(key, chunk_size=4096)) == data
    assert all(len(chunk) <= 4096 for chunk in storage.iter_bytes(key, chunk_size=4096))

    target = tmp_path / "downloaded"
    storage.download(key, target)
    assert target.read_bytes() == data

    storage.put_file(key, write(tmp_path / "second", b"replaced"))
    assert b"".join(storage.iter_bytes(key)) == b"replaced"

    storage.delete(key)
    assert not storage.exists(key)
    storage.delete(key)  # deleting a missing object is not an error, on either backend


def test_missing_keys_raise_object_not_found(storage, tmp_path):
    key = "files/missing"
    with pytest.raises(ObjectNotFound):
        storage.size(key)
    with pytest.raises(ObjectNotFound):
        storage.iter_bytes(key)
    target = tmp_path / "never"
    with pytest.raises(ObjectNotFound):
        storage.download(key, target)
    assert not target.exists()
    assert not storage.exists(key)
    assert issubclass(ObjectNotFound, KeyError)


def test_an_object_above_the_multipart_threshold_round_trips(storage, tmp_path):
    # boto3 switches to a multipart upload at TransferConfig.multipart_threshold (8 MiB by default); go past it.
    from boto3.s3.transfer import TransferConfig

    size = TransferConfig().multipart_threshold + 1024 * 1024 + 17
    data = os.urandom(size)
    source = write(tmp_path / "big.bin", data)
    stored = storage.put_file("checkpoints/big.tar.gz", source)
    digest = hashlib.sha256(data).hexdigest()
    assert (stored.size, stored.sha256) == (size, digest)

    target = tmp_path / "big.out"
    storage.download("checkpoints/big.tar.gz", target)
    assert sha256_of(target) == digest
    hasher = hashlib.sha256()
    for chunk in storage.iter_bytes("checkpoints/big.tar.gz"):
        hasher.update(chunk)
    assert hasher.hexdigest() == digest
    if isinstance(storage, S3Storage):
        etag = storage.client.head_object(Bucket=storage.bucket, Key="checkpoints/big.tar.gz")["ETag"]
        assert "-" in etag, f"expected a multipart ETag (md5-N), got {etag}"


def test_a_5_mb_object_round_trips(storage, tmp_path):
    data = os.urandom(5 * 1024 * 1024)
    stored = storage.put_file("files/five-mb", write(tmp_path / "five", data))
    assert stored.sha256 == hashlib.sha256(data).hexdigest() and storage.size("files/five-mb") == len(data)
    assert hashlib.sha256(b"".join(storage.iter_bytes("files/five-mb"))).hexdigest() == stored.sha256


# --- spool_stream ---------------------------------------------------------------------------------------------


def test_spool_stream_counts_and_hashes(tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 5)
    path, size, digest = spool_stream(io.BytesIO(data), directory=tmp_path, max_bytes=len(data))
    assert (size, digest) == (len(data), hashlib.sha256(data).hexdigest())
    assert path.parent == tmp_path and path.read_bytes() == data


def test_spool_stream_enforces_max_bytes_and_leaves_no_file(tmp_path):
    data = os.urandom(2 * 1024 * 1024 + 1)
    with pytest.raises(ObjectTooLarge) as caught:
        spool_stream(io.BytesIO(data), directory=tmp_path, max_bytes=2 * 1024 * 1024)
    assert caught.value.limit == 2 * 1024 * 1024
    assert list(tmp_path.iterdir()) == []


def test_spool_stream_leaves_no_file_when_the_stream_fails(tmp_path):
    class Broken(io.RawIOBase):
        def read(self, n=-1):
            raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        spool_stream(Broken(), directory=tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- local backend, make_storage ------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["../x", "files/../../x", "/etc/passwd", "", "."])
def test_local_storage_refuses_keys_outside_its_root(local_storage, tmp_path, key):
    with pytest.raises(ValueError, match="invalid object key"):
        local_storage.put_file(key, write(tmp_path / "f", b"x"))
    with pytest.raises(ValueError):
        local_storage.exists(key)
    assert not (tmp_path / "x").exists()


def test_local_storage_leaves_no_partial_file(local_storage, tmp_path):
    local_storage.put_file("files/a", write(tmp_path / "f", b"abc"))
    assert sorted(p.name for p in (local_storage.root / "files").iterdir()) == ["a"]


def test_make_storage_picks_s3_when_a_bucket_is_set(no_qlora_env, tmp_path, aws_test_credentials):
    storage = make_storage(Settings(home=tmp_path, s3_bucket="qlora", s3_endpoint="http://127.0.0.1:9"))
    assert isinstance(storage, S3Storage) and storage.bucket == "qlora"
    assert storage.client.meta.endpoint_url == "http://127.0.0.1:9"


def test_make_storage_defaults_to_a_local_directory_under_home(no_qlora_env, tmp_path):
    storage = make_storage(Settings(home=tmp_path))
    assert isinstance(storage, LocalStorage) and storage.root == tmp_path.resolve() / "objects"
    assert storage.root.is_dir()


def test_make_storage_s3_without_a_bucket_is_refused(no_qlora_env, tmp_path):
    with pytest.raises(ValueError, match="QLORA_S3_BUCKET"):
        make_storage(Settings(home=tmp_path, storage="s3"))


def test_s3_bucket_from_the_environment(no_qlora_env, tmp_path, s3_endpoint, aws_test_credentials):
    bucket = f"qlora-env-{secrets.token_hex(4)}"
    no_qlora_env.setenv("QLORA_HOME", str(tmp_path))
    no_qlora_env.setenv("QLORA_S3_BUCKET", bucket)
    no_qlora_env.setenv("QLORA_S3_ENDPOINT", s3_endpoint)
    storage = make_storage(Settings())
    assert isinstance(storage, S3Storage)
    storage.ensure_bucket()
    storage.put_file("files/x", write(tmp_path / "x", b"hello"))
    assert storage.size("files/x") == 5


def test_local_writes_are_synced_before_the_rename_and_the_rename_after(local_storage, tmp_path, monkeypatch):
    """A power loss cannot be caused here; what makes a write survive one can be watched: the data is fsynced
    while it is still the partial file, and the directory (the rename) after the object has its name."""
    real_fsync = os.fsync
    synced: list[tuple[str, bool]] = []

    def watching_fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        synced.append((path, (local_storage.root / "files" / "a").exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", watching_fsync)
    local_storage.put_file("files/a", write(tmp_path / "f", b"abc"))
    directory = str((local_storage.root / "files").resolve())
    assert synced == [(directory + "/a.partial", False), (directory, True)]


def test_stale_partial_files_of_killed_writers_are_removed(local_storage, tmp_path):
    from core.storage import STALE_PARTIAL_S, remove_stale_partials

    local_storage.put_file("files/kept", write(tmp_path / "f", b"abc"))
    stale = local_storage.root / "checkpoints" / "ftjob-x" / "step-000002-ckpt.tar.gz.partial"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half")
    old = os.stat(stale).st_mtime - STALE_PARTIAL_S - 60
    os.utime(stale, (old, old))
    fresh = local_storage.root / "files" / "being-written.partial"  # a write in progress: left alone
    fresh.write_bytes(b"half")
    assert remove_stale_partials(local_storage) == [str(stale)]
    assert not stale.exists() and fresh.exists() and local_storage.exists("files/kept")


@pytest.fixture
def small_disk(tmp_path):
    from tests.faults import small_disk

    with small_disk(tmp_path / "small-disk", "1m") as mount:
        yield mount


def test_a_write_to_a_full_disk_leaves_nothing_and_counts_as_an_outage(small_disk, tmp_path):
    import errno

    from worker.retry import Outage, is_transient, retry_transient

    storage = LocalStorage(small_disk / "objects")
    storage.put_file("files/small", write(tmp_path / "small", b"x" * 1000))
    big = write(tmp_path / "big", os.urandom(2 << 20))
    with pytest.raises(OSError) as failed:
        storage.put_file("files/big", big)
    assert failed.value.errno == errno.ENOSPC and is_transient(failed.value)  # retried, then left to the sweeper
    assert sorted(p.name for p in (storage.root / "files").iterdir()) == ["small"]  # no partial, no object
    with pytest.raises(Outage):
        retry_transient(lambda: storage.put_file("files/big", big), 1.0, "upload")
    assert not storage.exists("files/big") and storage.exists("files/small")
