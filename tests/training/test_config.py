"""Options: defaults follow the QLoRA paper; bad values and bad combinations fail before any work."""

import pytest

from contract.device_choices import DeviceFacts, decide_auto
from contract.options import ConfigError, TrainingConfig
from worker.training.model import check_runtime
from worker.training.optim import lr_factor, warmup_steps

CPU, CUDA = DeviceFacts("cpu", fast_bf16=False), DeviceFacts("cuda", fast_bf16=True)


def test_defaults_are_the_qlora_recipe():
    cfg = TrainingConfig()
    assert (cfg.quantization, cfg.quant_type, cfg.double_quant, cfg.compute_dtype) == ("4bit", "nf4", True, "auto")
    assert cfg.target_modules == "all-linear"
    assert cfg.optimizer == "paged_adamw_8bit"
    assert cfg.packing is True and cfg.train_on_inputs is False
    assert cfg.gradient_accumulation_steps == cfg.batch_size // cfg.micro_batch_size


@pytest.mark.parametrize(
    "values, param",
    [
        ({"lora_rank": 8}, "lora_rank"),  # unknown key
        ({"lora_r": 0}, "lora_r"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"quant_type": "int4"}, "quant_type"),
        ({"optimizer": "sgd"}, "optimizer"),
        ({"learning_rate": -1}, "learning_rate"),
        ({"max_seq_length": 4}, "max_seq_length"),
        ({"batch_size": 6, "micro_batch_size": 4}, "micro_batch_size"),
        ({"quantization": "none", "double_quant": False}, "double_quant"),
        ({"quantization": "8bit", "quant_type": "fp4"}, "quant_type"),
        ({"warmup_steps": 5, "warmup_ratio": 0.1}, "warmup_steps"),
        ({"warmup_steps": 50, "max_steps": 10}, "warmup_steps"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": ["q_proj", "x y"]}, "target_modules"),
        ({"use_dora": True, "quantization": "8bit"}, "use_dora"),
        ({"gradient_checkpointing": "sometimes"}, "gradient_checkpointing"),
        ({"micro_batch_tokens": 4096, "micro_batch_size": 2}, "micro_batch_tokens"),
        ({"micro_batch_tokens": 4096, "packing": False}, "micro_batch_tokens"),
        ({"micro_batch_tokens": 1024, "max_seq_length": 2048}, "micro_batch_tokens"),
        ({"micro_batch_tokens": 8}, "micro_batch_tokens"),
        ({"fused_kernels": "on", "lean_activations": False}, "fused_kernels"),
        ({"fused_kernels": "yes"}, "fused_kernels"),
    ],
)
def test_invalid_options_name_the_option(values, param):
    with pytest.raises(ConfigError) as err:
        TrainingConfig.from_dict(values)
    assert err.value.param == param, err.value.message
    assert param in err.value.message or err.value.param == param


def test_unknown_option_has_its_own_code():
    with pytest.raises(ConfigError) as err:
        TrainingConfig.from_dict({"lora_rank": 8})
    assert err.value.code == "unknown_hyperparameter"


def test_device_checks():
    with pytest.raises(ConfigError) as err:
        check_runtime(TrainingConfig(attn_implementation="flash_attention_2"), "cpu")
    assert err.value.param == "attn_implementation"
    with pytest.raises(ConfigError) as err:
        check_runtime(TrainingConfig(compute_dtype="fp16"), "cpu")
    assert err.value.param == "compute_dtype"
    with pytest.raises(ConfigError) as err:  # torch's CPU kernel gives varying or NaN losses on AVX2 CPUs
        check_runtime(TrainingConfig(attn_implementation="flex_attention"), "cpu")
    assert err.value.param == "attn_implementation" and "CUDA" in err.value.message
    check_runtime(TrainingConfig(), "cpu")  # the default runs on the CPU


def test_lean_activations_auto_means_cuda_or_fused_kernels():
    """A GPU memory saving that costs time on the CPU (bench/cpu.py): auto runs it with CUDA only."""
    assert TrainingConfig().lean_activations == "auto"
    assert decide_auto(TrainingConfig(), CUDA).lean_activations and not decide_auto(TrainingConfig(), CPU).lean_activations
    assert decide_auto(TrainingConfig(fused_kernels="on"), CPU).lean_activations  # the compiled kernels are lean's math
    assert decide_auto(TrainingConfig(lean_activations=True), CPU).lean_activations
    assert not decide_auto(TrainingConfig(lean_activations=False), CUDA).lean_activations


def test_fused_kernels_auto_means_cuda_with_lean_activations():
    assert decide_auto(TrainingConfig(), CUDA).fused_kernels and not decide_auto(TrainingConfig(), CPU).fused_kernels
    assert not decide_auto(TrainingConfig(lean_activations=False), CUDA).fused_kernels  # auto: nothing to fuse
    assert decide_auto(TrainingConfig(fused_kernels="on"), CPU).fused_kernels
    assert not decide_auto(TrainingConfig(fused_kernels="off"), CUDA).fused_kernels


def test_schedules():
    assert warmup_steps(TrainingConfig(warmup_ratio=0.1), 100) == 10
    assert warmup_steps(TrainingConfig(warmup_steps=3), 100) == 3
    # warm-up rises linearly and never sits at 0
    assert lr_factor(0, total_steps=100, warmup=4, kind="cosine") == pytest.approx(0.2)
    assert lr_factor(3, total_steps=100, warmup=4, kind="cosine") == pytest.approx(0.8)
    assert lr_factor(4, total_steps=100, warmup=4, kind="cosine") == pytest.approx(1.0)
    assert lr_factor(52, total_steps=100, warmup=4, kind="cosine") == pytest.approx(0.5)
    assert lr_factor(52, total_steps=100, warmup=4, kind="linear") == pytest.approx(0.5)
    assert lr_factor(99, total_steps=100, warmup=4, kind="constant") == 1.0
    assert lr_factor(100, total_steps=100, warmup=4, kind="cosine") == pytest.approx(0.0)


def test_micro_batch_tokens_sets_the_tokens_per_pass():
    assert TrainingConfig().max_tokens_per_micro_batch == 4 * 2048
    cfg = TrainingConfig(micro_batch_tokens=4096, batch_size=6)  # no divisibility rule: rows are made per step
    assert cfg.max_tokens_per_micro_batch == 4096 and cfg.gradient_accumulation_steps == 6
    assert TrainingConfig.from_dict(cfg.resolved()) == cfg


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_numbers_are_refused(value):
    with pytest.raises(ConfigError) as err:
        TrainingConfig.from_dict({"max_grad_norm": value})
    assert err.value.param == "max_grad_norm"
