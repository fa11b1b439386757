"""Checkpoints: the adapter in peft layout plus everything needed to resume exactly.

A checkpoint directory holds
  adapter_config.json, adapter_model.safetensors   the LoRA adapter, loadable with `PeftModel.from_pretrained`
  trainer_state.pt      optimizer, scheduler, RNG states (torch CPU/CUDA, python, numpy), step and data position,
                        and the objective's state if its method keeps one (objectives/base.py)
  trainer_state.json    the same position and the resolved config, readable without torch

Resume restores all of it: restoring only the adapter weights (what many tools do) makes the loss jump
because the optimizer moments, the learning-rate schedule and the data order start over.

Every directory is written under a temporary name, verified, then renamed, so a crash never leaves a
checkpoint that looks complete. Verification re-reads the adapter file and compares it with the model's
adapter tensors: a truncated or empty adapter (a known failure with mismatched peft versions) is an error.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from contract.adapter import ADAPTER_FILES

STATE_PT = "trainer_state.pt"
STATE_JSON = "trainer_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, or does not match the model."""


@dataclass
class TrainerPosition:
    step: int  # optimizer steps done
    epoch: int  # current epoch (0-based)
    batch_in_epoch: int  # optimizer steps done inside the current epoch
    trained_tokens: int  # non-pad tokens seen so far


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def capture_rng() -> dict[str, Any]:
    """The RNG states, in types `torch.load(weights_only=True)` accepts (numpy's key array as a tensor)."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached_gaussian)),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _adapter_state(model: Any) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def verify_adapter(directory: Path, expected: dict[str, torch.Tensor] | None = None) -> int:
    """Check that the adapter in `directory` is complete; returns its number of tensors.

    With `expected` (the model's adapter state), every tensor must be present with the same shape and values."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for name in ADAPTER_FILES:
        path = directory / name
        if not path.is_file() or path.stat().st_size == 0:
            raise CheckpointError(f"{path} is missing or empty")
    try:
        config = json.loads((directory / "adapter_config.json").read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{directory / 'adapter_config.json'} is not valid JSON: {exc}") from None
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{directory} does not hold a LoRA adapter (peft_type={config.get('peft_type')!r})")
    try:
        saved = load_file(directory / "adapter_model.safetensors")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{directory / 'adapter_model.safetensors'} cannot be read: {exc}") from None
    if not saved:
        raise CheckpointError(f"{directory / 'adapter_model.safetensors'} holds no tensors")
    if expected is not None:
        if set(saved) != set(expected):
            missing = sorted(set(expected) - set(saved))[:3]
            raise CheckpointError(f"adapter file lacks {len(set(expected) - set(saved))} tensors (e.g. {missing})")
        for key, tensor in expected.items():
            if saved[key].shape != tensor.shape or not torch.equal(saved[key].to(tensor.device, tensor.dtype), tensor):
                raise CheckpointError(f"adapter tensor {key} differs from the model's after saving")
    return len(saved)


def save_checkpoint(model: Any, optimizer: torch.optim.Optimizer, scheduler: Any, position: TrainerPosition,
                    directory: Path, *, config: dict[str, Any], objective_state: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write, verify and atomically publish a checkpoint directory; returns its final path. `objective_state`: what
    the method keeps across a resume (`Objective.state_dict`), stored in trainer_state.pt if not empty."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    verify_adapter(tmp, {k: v.detach() for k, v in _adapter_state(model).items()})
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": capture_rng(),
            "position": asdict(position),
            **({"objective": objective_state} if objective_state else {}),
        },
        tmp / STATE_PT,
    )
    (tmp / STATE_JSON).write_text(json.dumps({"position": asdict(position), "config": config, **(extra or {})}, indent=2))
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)
    return directory


def load_adapter_weights(model: Any, directory: Path) -> None:
    """Load a checkpoint's adapter tensors into a model built with the same LoRA config."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    verify_adapter(directory)
    result = set_peft_model_state_dict(model, load_file(directory / "adapter_model.safetensors"))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise CheckpointError(f"checkpoint {directory} has tensors the model lacks: {unexpected[:3]}")


def load_initial_adapter(model: Any, directory: Path) -> int:
    """Copy the adapter in `directory` (a fine-tuned model's, the job's starting point) into `model`'s LoRA weights.
    The adapter must have the model's shape and scaling: the same tensors (target modules, rank) and the same
    lora_alpha, rsLoRA and DoRA settings; else ConfigError (param "model"). Returns the number of tensors copied;
    the files in `directory` are only read."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from contract.errors import ConfigError

    verify_adapter(directory)
    saved_config = json.loads((directory / "adapter_config.json").read_text())
    own = model.peft_config["default"]
    for name, default in (("r", None), ("lora_alpha", None), ("use_rslora", False), ("use_dora", False)):
        if saved_config.get(name, default) != getattr(own, name):
            raise ConfigError(f"the adapter of the model this job continues from has {name}={saved_config.get(name, default)!r}, "
                              f"the job's model {name}={getattr(own, name)!r}", param="model", code="incompatible_with_model")
    saved = load_file(directory / "adapter_model.safetensors")
    expected = _adapter_state(model)
    shapes = {k: tuple(v.shape) for k, v in saved.items()}
    if shapes != {k: tuple(v.shape) for k, v in expected.items()}:
        differ = sorted(set(shapes) ^ set(expected)) or sorted(k for k in shapes if shapes[k] != tuple(expected[k].shape))
        raise ConfigError(f"the adapter of the model this job continues from does not fit the job's model (e.g. {differ[0]}): "
                          "another base, rank or set of target modules", param="model", code="incompatible_with_model")
    set_peft_model_state_dict(model, saved)
    return len(saved)


def load_trainer_state(directory: Path) -> dict[str, Any]:
    path = directory / STATE_PT
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {STATE_PT}: it cannot be resumed from")
    # weights_only: whoever can write the object store must not be able to run code on a worker through a pickle.
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path} holds objects other than tensors and plain values; it is not loaded: "
                              f"{str(exc).splitlines()[0][:300]}") from None


def read_checkpoint_config(directory: Path) -> dict[str, Any]:
    path = directory / STATE_JSON
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {STATE_JSON}")
    return json.loads(path.read_text())
