"""A job's hyperparameters: OpenAI's three keys plus every option of `TrainingConfig`.

OpenAI's keys and what "auto" means here (`OpenAIHyperparameters` types them; the bounds and the 'auto' values are
the engine options' of the same name, one set for the API and the engine):
- `n_epochs` 1..50, auto -> 3 (the engine's default);
- `batch_size` 1..256, auto -> 8 (examples per optimizer step; the engine's default);
- `learning_rate_multiplier` > 0, auto -> 1.0: the engine's learning_rate is multiplier x 2e-4 (its default).
Every other key is an engine option (`lora_r`, `quant_type`, `max_steps`, ...), checked by `TrainingConfig`
itself. `resolve` validates the object once, at the request; a job stores the object as given and the resolved
`TrainingConfig` (`resolved()`), and `wire_hyperparameters` renders what the wire shows from those two: the three OpenAI
keys as numbers plus every engine option; `method_object` wraps that in the job's `method` (the config's `method`
option, which the request sets with `method.type`, never among the hyperparameters). `Hyperparameters` is the typed
shape of the object for the OpenAPI schema.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationError, create_model

from contract.options import DPO_OPTIONS, ConfigError, TrainingConfig, unused_options

DEFAULT_METHOD: str = TrainingConfig.model_fields["method"].default

BASE_LEARNING_RATE: float = TrainingConfig.model_fields["learning_rate"].default
DEFAULT_MICRO_BATCH: int = TrainingConfig.model_fields["micro_batch_size"].default
OPENAI_KEYS = ("n_epochs", "batch_size", "learning_rate_multiplier")


def _bounds(name: str) -> tuple[int, int]:
    """The (least, most) a TrainingConfig integer option allows: its Field's ge and le."""
    metadata = TrainingConfig.model_fields[name].metadata
    return (next(m.ge for m in metadata if hasattr(m, "ge")), next(m.le for m in metadata if hasattr(m, "le")))


def _openai_int(name: str, what: str) -> tuple[Any, Any]:
    """OpenAI's integer key `name`, with the bounds and the 'auto' value of the TrainingConfig option of that name."""
    low, high = _bounds(name)
    auto = TrainingConfig.model_fields[name].default
    return (Annotated[int, Field(strict=True, ge=low, le=high)] | Literal["auto"] | None,
            Field("auto", description=f"{what}, {low} to {high}; 'auto' or absent: {auto}."))


# OpenAI's three keys, typed: strict (no "8" for 8, no true for 1), the integers bounded as the engine's options of
# the same name are (one set of bounds: OpenAI's documented ones, docs/training.md), null the same as 'auto'.
OpenAIHyperparameters = create_model(
    "OpenAIHyperparameters",
    n_epochs=_openai_int("n_epochs", "Passes over the training file"),
    batch_size=_openai_int("batch_size", "Examples per optimizer step"),
    learning_rate_multiplier=(Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)] | Literal["auto"] | None,
                              Field("auto", description=f"learning_rate = multiplier x {BASE_LEARNING_RATE}; 'auto' or absent: 1.0.")),
)
_ALLOWED = {"n_epochs": "an integer from {} to {}".format(*_bounds("n_epochs")),
            "batch_size": "an integer from {} to {}".format(*_bounds("batch_size")),
            "learning_rate_multiplier": "a number > 0"}


def _is_auto(value: Any) -> bool:
    return value is None or value == "auto"


def _read_openai_keys(values: dict[str, Any]) -> Any:
    """Take OpenAI's keys out of `values`, validated by OpenAIHyperparameters; ConfigError naming the bad one."""
    try:
        return OpenAIHyperparameters.model_validate({k: values.pop(k) for k in OPENAI_KEYS if k in values})
    except ValidationError as exc:
        error = exc.errors()[0]
        name = str(error["loc"][0])
        raise ConfigError(f"'{name}' must be {_ALLOWED[name]}, or 'auto' (got {error['input']!r})", param=name) from None


def _micro_batch_for(batch_size: int) -> int:
    """The largest divisor of batch_size that is at most the engine's default micro-batch."""
    return max(d for d in range(1, DEFAULT_MICRO_BATCH + 1) if batch_size % d == 0)


def resolve(given: Mapping[str, Any], *, seed: int, method: str = DEFAULT_METHOD) -> tuple[TrainingConfig, dict[str, Any]]:
    """Build the engine config of a `method` job from a hyperparameters object and return it with the values the wire
    shows (`wire_hyperparameters`). Raises ConfigError whose `param` is a key of `given`; naming an option that has no
    effect with the others is an error too."""
    values = dict(given)
    for key, where in (("seed", "the top-level 'seed' parameter"), ("method", "'method.type'")):
        if key in values:
            raise ConfigError(f"Set the {key} with {where}, not in hyperparameters", param=key)
    if _is_auto(values.get("beta", 0)):  # OpenAI's beta "auto": the engine's default
        values.pop("beta")
    openai = _read_openai_keys(values)
    for name in ("n_epochs", "batch_size"):  # 'auto': the engine's default
        value = getattr(openai, name)
        values[name] = TrainingConfig.model_fields[name].default if _is_auto(value) else value
    batch_size = values["batch_size"]

    multiplier = openai.learning_rate_multiplier
    if not _is_auto(multiplier):
        if "learning_rate" in values:
            raise ConfigError("Set either 'learning_rate' or 'learning_rate_multiplier', not both", param="learning_rate")
        values["learning_rate"] = multiplier * BASE_LEARNING_RATE

    values.update(seed=seed, method=method)
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
    return cfg, wire_hyperparameters(given, cfg.resolved())


def wire_hyperparameters(given: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """A job's hyperparameters as the wire shows them, from what it stores: the object as given and the resolved
    config. OpenAI's three keys come first, as numbers; the seed is the job's top-level `seed` too."""
    multiplier = given.get("learning_rate_multiplier", "auto")
    if _is_auto(multiplier):
        multiplier = config["learning_rate"] / BASE_LEARNING_RATE
    echoed = {"n_epochs": config["n_epochs"], "batch_size": config["batch_size"], "learning_rate_multiplier": float(multiplier)}
    hidden = {"method"} | (set() if config.get("method") == "dpo" else set(DPO_OPTIONS))
    return echoed | {k: v for k, v in config.items() if k not in echoed and k not in hidden}


def method_object(method: str, hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """A job's `method` as the wire shows it (OpenAI's shape), from its config's `method` and `wire_hyperparameters`:
    {"type": "supervised", "supervised": {"hyperparameters": {...}}}."""
    return {"type": method, method: {"hyperparameters": hyperparameters}}


def _schema_fields() -> dict[str, Any]:
    fields: dict[str, Any] = {name: (field.annotation, field) for name, field in OpenAIHyperparameters.model_fields.items()}
    fields["beta"] = (float | Literal["auto"], Field("auto", description=TrainingConfig.model_fields["beta"].description + " 'auto' or absent: 0.1."))
    for name, field in TrainingConfig.model_fields.items():
        if name not in fields and name not in ("seed", "method"):  # the job's top-level `seed` and `method.type`
            fields[name] = (field.annotation, field)
    return fields


# The hyperparameters object as the OpenAPI schema shows it: every option with its description and default.
Hyperparameters = create_model("Hyperparameters", __config__=ConfigDict(extra="forbid"), **_schema_fields())
