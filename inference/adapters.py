"""Adapter archives from object storage, unpacked once into a local cache directory (torch-free: the vLLM front
uses it too).

Callers name an adapter by its object key, and only keys of the shape the service stores adapters under are
taken (`files/<id>`, `checkpoints/<job>/<checkpoint>.tar.gz`): no absolute path, no `..`, nothing else of the
storage. Only the adapter's own files are unpacked (a checkpoint archive also holds the optimizer state), and the
cache is bounded by bytes, the least recently used copies going first.
"""

from __future__ import annotations

import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path

from contract.adapter import ADAPTER_FILES
from core.storage import ObjectNotFound, ObjectStorage

_KEY = re.compile(r"(files|checkpoints)(/[A-Za-z0-9_-][A-Za-z0-9._-]*){1,3}")


class AdapterError(ValueError):
    """An adapter could not be fetched or attached (a bad key, a missing object, not a LoRA adapter, another base)."""


def check_key(key: str) -> None:
    """Raise AdapterError unless `key` is an adapter's object key as the service stores them."""
    if not _KEY.fullmatch(key) or any(part in {".", ".."} for part in key.split("/")):
        raise AdapterError(f"'{key}' is not the object key of an adapter archive (files/... or checkpoints/...)")


def cached_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / re.sub(r"[^A-Za-z0-9._-]", "_", key)


def is_adapter_dir(directory: Path) -> bool:
    return all((directory / f).is_file() for f in ADAPTER_FILES)


def fetch_adapter(storage: ObjectStorage, key: str, cache_dir: Path) -> Path:
    """The adapter archive stored at `key` (a job's or a checkpoint's .tar.gz), its adapter files unpacked under
    `cache_dir`. Unpacked once per key (archives are immutable); each fetch works in a directory of its own and
    renames the result into place, so concurrent fetches of one key never share a half-done file."""
    check_key(key)
    directory = cached_path(cache_dir, key)
    if is_adapter_dir(directory):
        os.utime(directory)  # recently used: the cache bound drops it last
        return directory
    cache_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".fetch-"))  # a dot: never taken for a cached adapter
    try:
        archive, unpacked = work / "archive.tar.gz", work / "adapter"
        try:
            storage.download(key, archive)
        except ObjectNotFound:
            raise AdapterError(f"no adapter is stored at {key}") from None
        try:
            with tarfile.open(archive) as tar:
                wanted = [m for m in tar.getmembers() if m.isfile() and m.name.removeprefix("./") in ADAPTER_FILES]
                tar.extractall(unpacked, members=wanted, filter="data")  # "data": no absolute paths, links or devices
        except (tarfile.TarError, OSError) as exc:
            raise AdapterError(f"the archive at {key} cannot be unpacked: {exc}") from None
        if not is_adapter_dir(unpacked):
            raise AdapterError(f"the archive at {key} holds no LoRA adapter")
        try:
            unpacked.rename(directory)
        except OSError:  # another fetch of the same key got there first: its copy is the same
            if not is_adapter_dir(directory):
                raise
        os.utime(directory)
        return directory
    finally:
        shutil.rmtree(work, ignore_errors=True)


def remove_cached(cache_dir: Path, key: str) -> bool:
    """Delete the unpacked copy of `key`, if any (its model was deleted). True when there was one."""
    check_key(key)  # a caller's key: never a path out of the cache
    directory = cached_path(cache_dir, key)
    existed = directory.exists()
    shutil.rmtree(directory, ignore_errors=True)
    return existed


def _size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def trim_cache(cache_dir: Path, max_bytes: int, keep: set[Path]) -> list[Path]:
    """Delete the least recently used unpacked adapters until the cache holds at most `max_bytes`, sparing those in
    `keep` (attached ones: a backend may read them again). Returns what was deleted."""
    if not cache_dir.is_dir():
        return []
    entries = [(d.stat().st_mtime, d, _size(d)) for d in cache_dir.iterdir() if d.is_dir() and not d.name.startswith(".")]
    total = sum(size for _, _, size in entries)
    deleted: list[Path] = []
    for _, directory, size in sorted(entries, key=lambda e: e[0]):
        if total <= max_bytes:
            break
        if directory in keep:
            continue
        shutil.rmtree(directory, ignore_errors=True)
        total -= size
        deleted.append(directory)
    return deleted
