"""Where a job's hyperparameters come from in the create-job body, and the 400 a bad one gets.

The translation of OpenAI's keys and the options themselves are the contract's (contract.hyperparameters).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from api.errors import bad_request
from api.schemas import JobCreate
from contract.hyperparameters import DEFAULT_METHOD, resolve
from contract.options import METHODS, ConfigError, TrainingConfig
from contract.prequantized import decide_quantization


def job_options(body: JobCreate, seed: int, model_config: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], TrainingConfig]:
    """Take the method from `method.type` and the hyperparameters from `method.<type>.hyperparameters` or the
    deprecated top-level `hyperparameters`, and resolve them for the base model whose config.json is `model_config`
    (a pre-quantized base decides `quantization`: contract.prequantized): the object as given and its config, what
    the job row stores. Every error is a 400 whose `param` is the dotted path of the key."""
    given: Mapping[str, Any] | None = None
    method = DEFAULT_METHOD
    if body.method is not None:
        if body.method.type not in METHODS:
            supported = " or ".join(repr(m) for m in METHODS)
            raise bad_request(
                f"Method type {body.method.type!r} is not supported; use {supported}.", param="method.type", code="unsupported_value"
            )
        method = body.method.type
        section = getattr(body.method, method, None)
        if section is not None:
            given = section.hyperparameters
    where = f"method.{method}.hyperparameters"
    if body.hyperparameters is not None:
        if given is not None:
            raise bad_request(
                f"Give hyperparameters either in {where} or in the deprecated top-level hyperparameters, not both.",
                param="hyperparameters",
                code="invalid_value",
            )
        given, where = body.hyperparameters, "hyperparameters"
    options = dict(given or {})
    try:
        cfg, _ = resolve(decide_quantization(options, model_config), seed=seed, method=method)
        check_length_fits(cfg, model_config)
    except ConfigError as err:
        if err.param == "model":  # the base itself cannot be trained on
            raise bad_request(err.message, param="model", code="invalid_value") from None
        raise bad_request(err.message, param=f"{where}.{err.param}" if err.param else where, code=err.code) from None
    return options, cfg


def check_length_fits(cfg: TrainingConfig, model_config: Mapping[str, Any] | None) -> None:
    """A job with memory_budget_gb whose length cannot fit it even with every layer offloaded and the MLPs tiled is
    refused here (ContextTooLong: param max_seq_length or micro_batch_tokens, with the longest that fits); without a
    budget the worker checks against its card's free memory before loading the model. A base whose shape the estimate
    cannot read is not refused."""
    if model_config is None or cfg.memory_budget_gb is None:
        return
    from contract.device_choices import GIB, check_fits
    from worker.training.tunables import LOSS_CHUNK_TOKENS

    try:
        check_fits(model_config, cfg, budget_bytes=int(cfg.memory_budget_gb * GIB), loss_chunk_tokens=LOSS_CHUNK_TOKENS)
    except ConfigError:
        raise
    except (ValueError, ArithmeticError, TypeError):  # an architecture the estimate does not model
        return
