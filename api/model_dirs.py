"""Base models: one directory each under `settings.models_dir`, holding a Hugging Face config.json.
The directory's name is the model id that jobs name in `model`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from contract.base_model import read_config_json, stored_format
from contract.errors import ConfigError
from core.settings import Settings


def _models_dir(settings: Settings) -> Path:
    assert settings.models_dir is not None  # Settings fills it in
    return settings.models_dir


def find_base_model(settings: Settings, name: str) -> Path | None:
    """The directory of base model `name`, or None. Only a plain directory name is looked up, so a model id can
    never reach outside the models directory ('../x', 'a/b', '.hidden')."""
    if not name or name.startswith(".") or "/" in name or "\\" in name or "\x00" in name or len(name.encode()) > 255:
        return None  # 255 bytes: the longest file name Linux allows
    path = _models_dir(settings) / name
    try:
        return path if (path / "config.json").is_file() else None
    except OSError:  # a name the file system refuses
        return None


def list_base_models(settings: Settings) -> list[Path]:
    root = _models_dir(settings)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if find_base_model(settings, p.name) is not None)


def base_config(path: Path) -> dict[str, Any] | None:
    """The model's config.json as a dict (contract.base_model.read_config_json), or None when it cannot be read as a
    JSON object: the API then plans for a float base without an estimate, and the engine reports the fault."""
    try:
        return read_config_json(path)
    except ConfigError:
        return None


def weights_bytes(path: Path) -> int:
    """The bytes of a model directory's weight files: about what a merged 16-bit copy of a 16-bit base stores."""
    return sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin") for f in path.glob(pattern) if f.is_file())


def stored_quantization(path: Path) -> dict[str, Any] | None:
    """How base model `path` is stored already, from its config.json's `quantization_config`
    (`{"method", "bits", "group_size"}`), or None: a plain 16/32-bit base (jobs quantize it on load) or a config.json
    that cannot be read."""
    config = base_config(path)
    return stored_format(config) if config is not None else None
