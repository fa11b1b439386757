"""A job file: the YAML (or JSON) description of one training job that both command lines read, the engine's
(`python -m worker.training.cli`, which trains it here) and the service's (`qlora jobs create -f`, which sends it
to the API).

Imports nothing of ours and no pydantic, so `cli/` (a plain API client) may import it too (docs/architecture.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The keys the engine's command line reads; the service's reads those too (so one file works with both) plus the
# API's own names and fields.
ENGINE_KEYS = frozenset({"base_model", "train_file", "validation_file", "output_dir", "hyperparameters"})
SERVICE_KEYS = ENGINE_KEYS | {"model", "training_file", "suffix", "seed", "metadata"}


class JobFileError(ValueError):
    """A job file that cannot be read, or whose content is not a job."""


def read_job_file(path: Path, keys: frozenset[str]) -> dict[str, Any]:
    """The job file's mapping: JSON for a .json file, else YAML. Raises JobFileError for an unreadable file, one
    that does not parse, a top level that is not a mapping, a key not in `keys`, or hyperparameters that are not
    a mapping."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise JobFileError(f"cannot read {path}: {exc.strerror}") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise JobFileError(f"{path} is not valid JSON: {exc}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise JobFileError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise JobFileError(f"{path}: expected a mapping at the top level")
    unknown = set(data) - keys
    if unknown:
        raise JobFileError(f"{path}: unknown keys {sorted(unknown)} (expected some of {sorted(keys)})")
    if data.get("hyperparameters") is not None and not isinstance(data["hyperparameters"], dict):
        raise JobFileError(f"{path}: hyperparameters must be a mapping")
    return data
