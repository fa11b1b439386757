"""A job's hyperparameters: OpenAI's three keys plus every option of `TrainingConfig`.

OpenAI's keys and what "auto" means here:
- `n_epochs` 1..50, auto -> 3 (the engine's default);
- `batch_size` 1..256, auto -> 8 (examples per optimizer step; the engine's default);
- `learning_rate_multiplier` > 0, auto -> 1.0: the engine's learning_rate is multiplier x 2e-4 (its default).
Every other key is an engine option (`lora_r`, `quant_type`, `max_steps`, ...), checked by `TrainingConfig`
itself. `resolve` validates the object once, at the request; a job stores the object as given and the resolved
`TrainingConfig` (`resolved()`), and `echo` renders what the wire shows from those two: the three OpenAI keys as
numbers plus every engine option; `method_object` wraps that in the job's `method` (the config's `method` option,
which the request sets with `method.type`, never among the hyperparameters). `Hyperparameters` is the typed shape of the object for the OpenAPI schema.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import ConfigDict, Field, create_model

from contract.options import DPO_OPTIONS, ConfigError, TrainingConfig, unused_options

DEFAULT_METHOD: str = TrainingConfig.model_fields["method"].default

BASE_LEARNING_RATE: float = TrainingConfig.model_fields["learning_rate"].default
DEFAULT_MICRO_BATCH: int = TrainingConfig.model_fields["micro_batch_size"].default
AUTO_N_EPOCHS = 3
AUTO_BATCH_SIZE = 8
N_EPOCHS_RANGE = (1, 50)
BATCH_SIZE_RANGE = (1, 256)


def _is_auto(value: Any) -> bool:
    return value is None or value == "auto"


def _openai_int(values: dict[str, Any], name: str, auto: int, bounds: tuple[int, int]) -> int:
    value = values.pop(name, "auto")
    if _is_auto(value):
        return auto
    low, high = bounds
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"'{name}' must be an integer from {low} to {high}, or 'auto' (got {value!r})", param=name)
    return value


def _micro_batch_for(batch_size: int) -> int:
    """The largest divisor of batch_size that is at most the engine's default micro-batch."""
    return max(d for d in range(1, DEFAULT_MICRO_BATCH + 1) if batch_size % d == 0)


OPENAI_KEYS = ("n_epochs", "batch_size", "learning_rate_multiplier")


def resolve(given: Mapping[str, Any], *, seed: int, method: str = DEFAULT_METHOD) -> tuple[TrainingConfig, dict[str, Any]]:
    """Build the engine config of a `method` job from a hyperparameters object and return it with the values to echo
    (`echo`). Raises ConfigError whose `param` is a key of `given`; naming an option that has no effect with the
    others is an error too."""
    values = dict(given)
    for key, where in (("seed", "the top-level 'seed' parameter"), ("method", "'method.type'")):
        if key in values:
            raise ConfigError(f"Set the {key} with {where}, not in hyperparameters", param=key)
    if _is_auto(values.get("beta", 0)):  # OpenAI's beta "auto": the engine's default
        values.pop("beta")
    n_epochs = _openai_int(values, "n_epochs", AUTO_N_EPOCHS, N_EPOCHS_RANGE)
    batch_size = _openai_int(values, "batch_size", AUTO_BATCH_SIZE, BATCH_SIZE_RANGE)

    multiplier = values.pop("learning_rate_multiplier", "auto")
    if not _is_auto(multiplier):
        if isinstance(multiplier, bool) or not isinstance(multiplier, int | float) or not math.isfinite(multiplier) or multiplier <= 0:
            raise ConfigError(
                f"'learning_rate_multiplier' must be a number > 0, or 'auto' (got {multiplier!r})", param="learning_rate_multiplier"
            )
        if "learning_rate" in values:
            raise ConfigError("Set either 'learning_rate' or 'learning_rate_multiplier', not both", param="learning_rate")
        values["learning_rate"] = multiplier * BASE_LEARNING_RATE

    values.update(n_epochs=n_epochs, batch_size=batch_size, seed=seed, method=method)
    if "micro_batch_size" not in values and values.get("micro_batch_tokens") is None and batch_size % DEFAULT_MICRO_BATCH:
        values["micro_batch_size"] = _micro_batch_for(batch_size)
    try:
        cfg = TrainingConfig.from_dict(values)
    except ConfigError as err:
        if err.param == "learning_rate" and not _is_auto(multiplier):
            raise ConfigError(
                f"{err.message} (learning_rate = learning_rate_multiplier x {BASE_LEARNING_RATE})",
                param="learning_rate_multiplier",
                code=err.code,
            ) from None
        raise
    unused = unused_options(cfg)
    for name in given:
        if name in unused:
            param, message = unused[name]
            raise ConfigError(message, param=param)
    return cfg, echo(given, cfg.resolved())


def echo(given: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """A job's hyperparameters as the wire shows them, from what it stores: the object as given and the resolved
    config. OpenAI's three keys come first, as numbers; the seed is the job's top-level `seed` too."""
    multiplier = given.get("learning_rate_multiplier", "auto")
    if _is_auto(multiplier):
        multiplier = config["learning_rate"] / BASE_LEARNING_RATE
    echoed = {"n_epochs": config["n_epochs"], "batch_size": config["batch_size"], "learning_rate_multiplier": float(multiplier)}
    hidden = {"method"} | (set() if config.get("method") == "dpo" else set(DPO_OPTIONS))
    return echoed | {k: v for k, v in config.items() if k not in echoed and k not in hidden}


def method_object(method: str, hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """A job's `method` as the wire shows it (OpenAI's shape), from its config's `method` and its `echo`:
    {"type": "supervised", "supervised": {"hyperparameters": {...}}}."""
    return {"type": method, method: {"hyperparameters": hyperparameters}}


def _schema_fields() -> dict[str, Any]:
    auto = "'auto' or absent: "
    fields: dict[str, Any] = {
        "n_epochs": (int | Literal["auto"], Field("auto", description=f"Passes over the training file, {N_EPOCHS_RANGE[0]} to "
                                                  f"{N_EPOCHS_RANGE[1]}; {auto}{AUTO_N_EPOCHS}.")),
        "batch_size": (int | Literal["auto"], Field("auto", description=f"Examples per optimizer step, {BATCH_SIZE_RANGE[0]} to "
                                                    f"{BATCH_SIZE_RANGE[1]}; {auto}{AUTO_BATCH_SIZE}.")),
        "learning_rate_multiplier": (float | Literal["auto"], Field("auto", description="learning_rate = multiplier x "
                                                                    f"{BASE_LEARNING_RATE}; {auto}1.0.")),
    }
    fields["beta"] = (float | Literal["auto"], Field("auto", description=TrainingConfig.model_fields["beta"].description + " 'auto' or absent: 0.1."))
    for name, field in TrainingConfig.model_fields.items():
        if name not in fields and name not in ("seed", "method"):  # the job's top-level `seed` and `method.type`
            fields[name] = (field.annotation, field)
    return fields


# The hyperparameters object as the OpenAPI schema shows it: every option with its description and default.
Hyperparameters = create_model("Hyperparameters", __config__=ConfigDict(extra="forbid"), **_schema_fields())
