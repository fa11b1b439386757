"""The base model's config.json: one reader (API, engine, engine CLI) and one quantization_config parser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from api.model_dirs import base_config
from contract.base_model import base_quantization, read_config_json, stored_format
from contract.errors import ConfigError
from worker.training.model import read_model_config


def test_a_missing_or_broken_config_is_a_model_error(tmp_path: Path):
    with pytest.raises(ConfigError) as err:
        read_config_json(tmp_path)
    assert (err.value.param, err.value.code) == ("model", "model_not_found")
    for text in ("{broken", "[1, 2]"):
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(ConfigError) as err:
            read_config_json(tmp_path)
        assert err.value.param == "model"
        assert base_config(tmp_path) is None  # the API plans without it; the engine reports the fault
        with pytest.raises(ConfigError):
            read_model_config(tmp_path)


def test_the_engine_and_the_api_read_the_same_config(tiny_model_dir):
    as_dict = read_config_json(tiny_model_dir)
    assert base_config(Path(tiny_model_dir)) == as_dict == json.loads((Path(tiny_model_dir) / "config.json").read_text())
    assert read_model_config(tiny_model_dir).num_hidden_layers == as_dict["num_hidden_layers"]


def test_one_parser_reads_a_dict_and_a_transformers_config():
    from transformers import GPTQConfig, LlamaConfig

    quantized = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    assert stored_format({"quantization_config": quantized}) == {"method": "gptq", "bits": 4, "group_size": 128}
    assert base_quantization({"quantization_config": quantized}) == "gptq"
    config = LlamaConfig(quantization_config=GPTQConfig(bits=4, group_size=128))
    assert stored_format(config)["method"] == "gptq" and base_quantization(config) == "gptq"
    assert base_quantization({}) is None and base_quantization(LlamaConfig()) is None
    with pytest.raises(ConfigError) as err:
        base_quantization({"quantization_config": {"quant_method": "fp8"}})
    assert err.value.param == "model"
