"""Which quantization a job runs with, given the options the user gave and the base model's config.json.

A base directory whose config.json has a `quantization_config` with `quant_method` gptq or awq is pre-quantized:
its weights are trained as they are stored, so the job's `quantization` becomes that method. The on-the-fly
options (bitsandbytes' and HQQ's) make no sense on it and are refused when given, as is asking for gptq/awq on a
base that is not stored that way (what the base is: contract.base_model.base_quantization). Torch-free: the API
decides this when a job is created, the engine CLI too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from contract.base_model import PREQUANTIZED_METHODS, base_quantization
from contract.errors import ConfigError

# Options that configure quantizing a float base on load: meaningless for a pre-quantized one.
ON_THE_FLY_OPTIONS = ("quant_type", "double_quant", "hqq_bits", "hqq_group_size")
QUANTIZE_HINT = ("make a {method} copy of the base with `qlora-quantize --method {method} BASE_DIR CALIBRATION.jsonl OUT_DIR` "
                 "and put OUT_DIR in the models directory")


def decide_quantization(given: Mapping[str, Any], model_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The options `given` (as the user gave them, not defaults) with `quantization` decided for the base whose
    config.json is `model_config`. Raises ConfigError naming the offending option."""
    method = base_quantization(model_config)
    options = dict(given)
    asked = options.get("quantization")
    if method is None:
        if asked in PREQUANTIZED_METHODS:
            raise ConfigError(f"quantization={asked!r} trains on a base stored pre-quantized with {asked.upper()}, and this base is "
                              "not; " + QUANTIZE_HINT.format(method=asked), param="quantization")
        return options
    if "quantization" in options and asked != method:
        raise ConfigError(f"the base model is pre-quantized with {method.upper()}, so it cannot be quantized again with "
                          f"quantization={asked!r}; leave quantization out (or set it to {method!r})", param="quantization")
    for name in ON_THE_FLY_OPTIONS:
        if name in options:
            raise ConfigError(f"{name!r} configures quantizing a float base on load; the base model is pre-quantized with "
                              f"{method.upper()}: leave {name!r} out", param=name)
    if options.get("compute_dtype") == "fp32":
        raise ConfigError(f"{method.upper()} kernels compute in 16 bits: compute_dtype must be 'auto', 'bf16' or 'fp16' "
                          f"on a {method.upper()} base", param="compute_dtype")
    options["quantization"] = method
    return options
