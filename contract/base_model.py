"""What a job needs to know of its base model, read from the base directory's config.json: its shape (the
Llama-family fields the memory estimate and the engine use) and how it is stored (a plain float base, or one
pre-quantized with GPTQ/AWQ).

The one reader of config.json for the API, the engine and its CLI (`read_config_json`) and the one parser of its
`quantization_config` (`quantization_config`). Torch-free and pydantic-free: a config is the config.json dict or a
transformers ``PretrainedConfig``, read by field name.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contract.errors import ConfigError

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Bases stored pre-quantized that jobs train on as they are stored (config.json's quant_method).
PREQUANTIZED_METHODS = ("gptq", "awq")


def read_config_json(model_dir: str | Path) -> dict[str, Any]:
    """The base directory's config.json as a dict. Raises ConfigError (param "model") when the directory has none
    (code model_not_found) or it is not a JSON object."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"base model directory {str(Path(model_dir))!r} has no config.json", param="model", code="model_not_found")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"the base model's config.json cannot be read: {exc}", param="model", code="invalid_value") from None
    if not isinstance(config, dict):
        raise ConfigError("the base model's config.json is not a JSON object", param="model", code="invalid_value")
    return config


def _field(model_config: Any, name: str, default: Any = None) -> Any:
    """A field of a config.json dict or of a PretrainedConfig; `default` where it is absent or null."""
    value = model_config.get(name, default) if isinstance(model_config, Mapping) else getattr(model_config, name, default)
    return default if value is None else value


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-family decoder."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    attention_bias: bool
    mlp_bias: bool


def read_shape(model_config: Any) -> ModelShape:
    """The Llama-family fields of a PretrainedConfig or a config.json dict; ValueError when one is missing."""
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [name for name in required if _field(model_config, name) is None]
    if missing:
        raise ValueError(f"model config lacks {', '.join(missing)}: not a Llama-family decoder config")
    hidden, heads = int(_field(model_config, "hidden_size")), int(_field(model_config, "num_attention_heads"))
    return ModelShape(
        vocab=int(_field(model_config, "vocab_size")),
        hidden=hidden,
        intermediate=int(_field(model_config, "intermediate_size")),
        layers=int(_field(model_config, "num_hidden_layers")),
        heads=heads,
        kv_heads=int(_field(model_config, "num_key_value_heads", heads)),
        head_dim=int(_field(model_config, "head_dim", hidden // heads)),
        tied=bool(_field(model_config, "tie_word_embeddings", False)),  # LlamaConfig's default
        attention_bias=bool(_field(model_config, "attention_bias", False)),
        mlp_bias=bool(_field(model_config, "mlp_bias", False)),
    )


def decoder_layer_count(model_config: Any) -> int:
    """The number of decoder layers (num_hidden_layers) of any decoder config; ValueError where it has none."""
    layers = _field(model_config, "num_hidden_layers")
    if layers is None:
        raise ValueError("model config lacks num_hidden_layers")
    return int(layers)


def linear_shapes(model_config: Any) -> dict[str, tuple[int, int]]:
    """``name -> (in_features, out_features)`` of the linear layers of one decoder layer."""
    s = read_shape(model_config)
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    return {
        "q_proj": (s.hidden, q),
        "k_proj": (s.hidden, kv),
        "v_proj": (s.hidden, kv),
        "o_proj": (q, s.hidden),
        "gate_proj": (s.hidden, s.intermediate),
        "up_proj": (s.hidden, s.intermediate),
        "down_proj": (s.intermediate, s.hidden),
    }


def quantization_config(model_config: Any) -> Mapping[str, Any] | None:
    """The config's ``quantization_config`` as a mapping (transformers keeps it as an object on a PretrainedConfig),
    or None when it has none (a plain 16/32-bit base) or it is not an object."""
    qc = _field(model_config, "quantization_config")
    if qc is not None and not isinstance(qc, Mapping):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else None
    return qc or None


def _method(qc: Mapping[str, Any]) -> str | None:
    """quant_method, lower case (transformers' QuantizationMethod is a str enum); None where it is not a string."""
    method = qc.get("quant_method")
    return str.lower(method) if isinstance(method, str) else None


def stored_format(model_config: Any) -> dict[str, Any] | None:
    """How a base is stored already: ``{"method": ..., "bits": ..., "group_size": ...}`` (bits and group_size None
    where the method does not say), or None for a plain 16/32-bit base, which jobs quantize on load, and for a
    quantization_config that names no method."""
    qc = quantization_config(model_config)
    method = _method(qc) if qc is not None else None
    if qc is None or method is None:
        return None
    bits = qc.get("bits")
    if method == "bitsandbytes":
        bits = 4 if qc.get("load_in_4bit") else 8 if qc.get("load_in_8bit") else None
    group_size = qc.get("group_size")
    return {"method": method,
            "bits": bits if isinstance(bits, int) and not isinstance(bits, bool) else None,
            "group_size": group_size if isinstance(group_size, int) and not isinstance(group_size, bool) else None}


def base_quantization(model_config: Any) -> str | None:
    """The method a base is pre-quantized with ('gptq' or 'awq'), None for a float base. Raises ConfigError (param
    "model") for a base stored quantized any other way (or without saying how): nothing here trains on it."""
    qc = quantization_config(model_config)
    if qc is None:
        return None
    method = _method(qc)
    if method in PREQUANTIZED_METHODS:
        return method
    raise ConfigError(f"the base model is stored quantized with {method or 'an unknown method'!r}; this service trains on float "
                      f"bases and on {' or '.join(PREQUANTIZED_METHODS)} pre-quantized ones", param="model")
