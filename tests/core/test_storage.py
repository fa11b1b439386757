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
