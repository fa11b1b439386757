"""OpenAI's hyperparameters -> the engine's config (no database: the translation alone)."""

from __future__ import annotations

import json

import pytest

from contract.hyperparameters import resolve
from contract.options import DPO_OPTIONS, ConfigError, TrainingConfig


def test_auto_resolves_to_numbers():
    cfg, echoed = resolve({"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}, seed=7)
    assert (cfg.n_epochs, cfg.batch_size, cfg.learning_rate, cfg.seed) == (3, 8, 2e-4, 7)
    assert (echoed["n_epochs"], echoed["batch_size"], echoed["learning_rate_multiplier"]) == (3, 8, 1.0)
    assert list(echoed)[:3] == ["n_epochs", "batch_size", "learning_rate_multiplier"]
    # Every engine option but the method, which the job's `method.type` shows (contract.hyperparameters.method_object),
    # and the options of method dpo, which a supervised job does not have.
    assert set(echoed) == set(TrainingConfig.model_fields) - {"method", *DPO_OPTIONS} | {"learning_rate_multiplier"}
    assert set(resolve({}, seed=7, method="dpo")[1]) == set(TrainingConfig.model_fields) - {"method"} | {"learning_rate_multiplier"}
    assert resolve({}, seed=7)[1] == echoed


def test_the_method_is_the_configs_and_not_a_hyperparameter():
    cfg, echoed = resolve({}, seed=0, method="supervised")
    assert cfg.method == "supervised" and cfg.resolved()["method"] == "supervised" and "method" not in echoed
    with pytest.raises(ConfigError) as info:
        resolve({"method": "supervised"}, seed=0)
    assert info.value.param == "method" and "method.type" in info.value.message
    with pytest.raises(ConfigError) as info:
        resolve({}, seed=0, method="reinforcement")
    assert info.value.param == "method"


@pytest.mark.parametrize(("batch_size", "micro"), [(8, 4), (12, 4), (6, 3), (2, 2), (1, 1), (5, 1), (9, 3), (256, 4)])
def test_micro_batch_follows_batch_size(batch_size, micro):
    cfg, _ = resolve({"batch_size": batch_size}, seed=0)
    assert (cfg.batch_size, cfg.micro_batch_size) == (batch_size, micro)


def test_given_micro_batch_is_kept():
    assert resolve({"batch_size": 8, "micro_batch_size": 8}, seed=0)[0].micro_batch_size == 8


def test_learning_rate_and_multiplier():
    cfg, echoed = resolve({"learning_rate_multiplier": 0.5}, seed=0)
    assert cfg.learning_rate == pytest.approx(1e-4) and echoed["learning_rate_multiplier"] == 0.5
    cfg, echoed = resolve({"learning_rate": 1e-3}, seed=0)
    assert cfg.learning_rate == 1e-3 and echoed["learning_rate_multiplier"] == pytest.approx(5.0)
    cfg, _ = resolve({"learning_rate": 1e-3, "learning_rate_multiplier": "auto"}, seed=0)
    assert cfg.learning_rate == 1e-3


@pytest.mark.parametrize(
    ("given", "param", "code"),
    [
        ({"n_epochs": 0}, "n_epochs", "invalid_hyperparameter"),
        ({"n_epochs": True}, "n_epochs", "invalid_hyperparameter"),
        ({"n_epochs": 2.5}, "n_epochs", "invalid_hyperparameter"),
        ({"batch_size": "8"}, "batch_size", "invalid_hyperparameter"),
        ({"learning_rate_multiplier": 0}, "learning_rate_multiplier", "invalid_hyperparameter"),
        ({"learning_rate_multiplier": "high"}, "learning_rate_multiplier", "invalid_hyperparameter"),
        ({"learning_rate_multiplier": float("nan")}, "learning_rate_multiplier", "invalid_hyperparameter"),
        ({"lora_rank": 4}, "lora_rank", "unknown_hyperparameter"),
        ({"quantization": "8bit", "quant_type": "nf4"}, "quant_type", "invalid_hyperparameter"),
        ({"fused_kernels": "yes"}, "fused_kernels", "invalid_hyperparameter"),
        ({"fused_kernels": "on", "lean_activations": False}, "fused_kernels", "invalid_hyperparameter"),
    ],
)
def test_errors_name_the_key(given, param, code):
    with pytest.raises(ConfigError) as info:
        resolve(given, seed=0)
    assert (info.value.param, info.value.code) == (param, code)


@pytest.mark.parametrize("given", [
    {},
    {"quantization": "8bit"},
    {"quantization": "none", "lora_r": 8},
    {"warmup_steps": 5},
    {"batch_size": 6},
    {"batch_size": 6, "micro_batch_tokens": 4096},
    {"micro_batch_size": 2, "n_epochs": 1, "learning_rate_multiplier": 0.5},
    {"gradient_checkpointing": "auto", "memory_budget_gb": 20},
    {"fused_kernels": "on"},
    {"lean_activations": False, "fused_kernels": "off"},
])
def test_the_worker_rebuilds_exactly_what_the_api_accepted(given):
    """The job row holds the resolved config (every option); the worker rebuilds the config from it with the
    model's own validation. Combination checks test values, so options that are only listed there (quant_type
    with 8-bit, warmup_ratio with warmup_steps) pass."""
    cfg, _ = resolve(given, seed=3)
    stored = json.loads(json.dumps(cfg.resolved()))
    assert TrainingConfig.from_dict(stored) == cfg


def test_micro_batch_tokens_replaces_micro_batch_size():
    cfg, echoed = resolve({"batch_size": 6, "micro_batch_tokens": 4096}, seed=0)
    assert cfg.micro_batch_tokens == 4096 and "micro_batch_size" not in cfg.model_fields_set
    with pytest.raises(ConfigError) as info:
        resolve({"micro_batch_size": 2, "micro_batch_tokens": 4096}, seed=0)
    assert info.value.param == "micro_batch_tokens"


def test_one_set_of_bounds_for_the_api_and_the_engine():
    """OpenAI's bounds (n_epochs 1..50, batch_size 1..256) are the engine options' own: the typed model carries them,
    the OpenAPI schema shows them, and the engine (its CLI builds TrainingConfig directly) refuses past them too."""
    from contract.hyperparameters import Hyperparameters

    assert resolve({"n_epochs": 50, "batch_size": 256}, seed=0)[0].n_epochs == 50
    assert resolve({"n_epochs": None, "batch_size": None}, seed=0)[0].batch_size == 8  # null is 'auto'
    for name, too_many in (("n_epochs", 51), ("batch_size", 257)):
        with pytest.raises(ConfigError) as info:
            resolve({name: too_many}, seed=0)
        assert info.value.param == name and f"to {too_many - 1}" in info.value.message
        with pytest.raises(ConfigError) as info:
            TrainingConfig.from_dict({name: too_many})
        assert info.value.param == name
    schema = Hyperparameters.model_json_schema()["properties"]
    assert {"maximum": 50, "minimum": 1, "type": "integer"} in schema["n_epochs"]["anyOf"]
    assert {"maximum": 256, "minimum": 1, "type": "integer"} in schema["batch_size"]["anyOf"]
