"""Adapter archives from object storage, unpacked once into a local directory (torch-free: the vLLM front uses it)."""

from __future__ import annotations

import re
import shutil
import tarfile
from pathlib import Path

from contract.adapter import ADAPTER_FILES
from core.storage import ObjectNotFound, ObjectStorage


class AdapterError(ValueError):
    """An adapter could not be fetched or attached (missing object, not a LoRA adapter, another base)."""


def cached_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / re.sub(r"[^A-Za-z0-9._-]", "_", key)


def is_adapter_dir(directory: Path) -> bool:
    return all((directory / f).is_file() for f in ADAPTER_FILES)


def fetch_adapter(storage: ObjectStorage, key: str, cache_dir: Path) -> Path:
    """The adapter archive stored at `key` (a job's or a checkpoint's .tar.gz), unpacked under `cache_dir`. Unpacked
    once per key: archives are immutable. A half-done unpack never looks done (it is renamed into place)."""
    directory = cached_path(cache_dir, key)
    if is_adapter_dir(directory):
        return directory
    cache_dir.mkdir(parents=True, exist_ok=True)
    archive = directory.with_suffix(".tar.gz.partial")
    unpacking = directory.with_suffix(".partial")
    shutil.rmtree(unpacking, ignore_errors=True)
    try:
        storage.download(key, archive)
    except ObjectNotFound:
        raise AdapterError(f"no adapter is stored at {key}") from None
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(unpacking, filter="data")  # "data": no absolute paths, links or devices
    except (tarfile.TarError, OSError) as exc:
        raise AdapterError(f"the archive at {key} cannot be unpacked: {exc}") from None
    finally:
        archive.unlink(missing_ok=True)
    if not is_adapter_dir(unpacking):
        shutil.rmtree(unpacking, ignore_errors=True)
        raise AdapterError(f"the archive at {key} holds no LoRA adapter")
    shutil.rmtree(directory, ignore_errors=True)
    unpacking.rename(directory)
    return directory
