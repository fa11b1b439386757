"""Where a job's hyperparameters come from in the create-job body, and the 400 a bad one gets.

The translation of OpenAI's keys and the options themselves are the contract's (contract.hyperparameters).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from api.errors import bad_request
from api.schemas import JobCreate
from contract.hyperparameters import resolve
from contract.options import ConfigError, TrainingConfig
from contract.prequantized import decide_quantization


def job_options(body: JobCreate, seed: int, model_config: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], TrainingConfig]:
    """Take the hyperparameters from `method.supervised.hyperparameters` or the deprecated top-level
    `hyperparameters` and resolve them for the base model whose config.json is `model_config` (a pre-quantized
    base decides `quantization`: contract.prequantized): the object as given and its config, what the job row
    stores. Every error is a 400 whose `param` is the dotted path of the key."""
    given: Mapping[str, Any] | None = None
    where = "method.supervised.hyperparameters"
    if body.method is not None:
        if body.method.type != "supervised":
            raise bad_request(
                f"Method type {body.method.type!r} is not supported; use 'supervised'.", param="method.type", code="unsupported_value"
            )
        if body.method.supervised is not None:
            given = body.method.supervised.hyperparameters
    if body.hyperparameters is not None:
        if given is not None:
            raise bad_request(
                "Give hyperparameters either in method.supervised.hyperparameters or in the deprecated "
                "top-level hyperparameters, not both.",
                param="hyperparameters",
                code="invalid_value",
            )
        given, where = body.hyperparameters, "hyperparameters"
    options = dict(given or {})
    try:
        cfg, _ = resolve(decide_quantization(options, model_config), seed=seed)
    except ConfigError as err:
        if err.param == "model":  # the base itself cannot be trained on
            raise bad_request(err.message, param="model", code="invalid_value") from None
        raise bad_request(err.message, param=f"{where}.{err.param}" if err.param else where, code=err.code) from None
    return options, cfg
