"""quantization='hqq': a tiny random Llama quantized by hqq in the test, trained through the engine, its adapter saved
and reloaded, and the LoRA gradients through the HQQ base checked against a float copy holding the dequantized
weights, before and after an evaluation pass (the failure mode found in gptqmodel's CPU kernels)."""

from __future__ import annotations

import math

import pytest
import torch
from hqq.core.quantize import HQQBackend, HQQLinear  # the .[hqq] extra, which make venv installs

from contract.data_format import load_examples
from contract.options import ConfigError, TrainingConfig
from tests.training.gradient_check import lora_gradients, worst_relative_error
from tests.training.test_trainer import RecordingSink, write_chat_file
from worker.training.data import tokenize_examples
from worker.training.model import build_model
from worker.training.objectives.sft import SupervisedObjective
from worker.training.trainer import TrainingRequest, evaluate, train

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def hqq_cfg(**overrides) -> TrainingConfig:
    values = dict(quantization="hqq", compute_dtype="fp32", max_steps=2, batch_size=4, micro_batch_size=2, learning_rate=1e-2,
                  warmup_steps=0)
    values.update(overrides)
    return TrainingConfig(**values)


# --- the gradient check: hqq's own dequantized reference, the shared measure (tests/training/gradient_check.py) ---

def dequantized_reference(quantized: torch.nn.Module, base_model_dir) -> torch.nn.Module:
    """A float32 copy of the base whose linear layers hold the hqq layers' dequantized weights, with the quantized
    model's LoRA adapters (same config, same values)."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    base = quantized.get_base_model()
    for name, module in base.named_modules():
        if isinstance(module, HQQLinear):
            target = reference.get_submodule(name.replace(".base_layer", ""))
            target.weight.data.copy_(module.dequantize().float().reshape(target.weight.shape))
    for param in reference.parameters():
        param.requires_grad_(False)
    reference.config.use_cache = False
    reference = get_peft_model(reference, quantized.peft_config["default"])
    set_peft_model_state_dict(reference, get_peft_model_state_dict(quantized))
    reference.train()
    return reference


def assert_lora_gradients_match(quantized, reference, batch, tolerance: float = 1e-4) -> None:
    """Every LoRA gradient of `quantized` within `tolerance` (relative norm) of the float reference's."""
    got = lora_gradients(quantized, batch)
    assert got
    error, worst = worst_relative_error(got, lora_gradients(reference, batch))
    assert error <= tolerance, f"LoRA gradient of {worst} off by {error:.1%} against the dequantized reference"


def evaluation_pass(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
    """What the trainer's evaluation (and any generate) does: a no-grad forward in eval mode."""
    model.eval()
    with torch.no_grad():
        model(**batch, use_cache=False)
    model.train()


@pytest.fixture(scope="module")
def batch(tokenizer, tmp_path_factory):
    path = write_chat_file(tmp_path_factory.mktemp("hqq-data") / "grad.jsonl", 2, seed=3)
    examples, _ = tokenize_examples(tokenizer, load_examples(path, min_examples=1), max_seq_length=48)
    ids = torch.tensor([examples[0].input_ids[:24]])
    return {"input_ids": ids, "labels": ids.clone()}


@pytest.fixture(scope="module")
def hqq_pair(tiny_model_dir):
    """The tiny base quantized by hqq (4-bit, groups of 64) with LoRA, and its dequantized float reference. Shared by
    the gradient tests (quantizing costs seconds); each leaves the model as it found it."""
    torch.manual_seed(0)
    built = build_model(tiny_model_dir, hqq_cfg(lora_dropout=0.0))
    for name, param in built.model.named_parameters():  # non-zero B, so that every adapter passes gradient back
        if "lora_B" in name:
            param.data.normal_(0, 0.05)
    return built, dequantized_reference(built.model, tiny_model_dir)


@pytest.mark.parametrize("lean_activations", [False, True], ids=["peft", "lean"])
def test_lora_gradients_on_hqq_match_the_dequantized_model_before_and_after_an_evaluation(hqq_pair, batch, lean_activations):
    from worker.training import lean_activations

    built, reference = hqq_pair
    layers = [m for m in built.model.modules() if isinstance(m, HQQLinear)]
    assert len(layers) == 2 * 7 and layers[0].meta["nbits"] == 4 and layers[0].meta["group_size"] == 64
    assert HQQLinear.backend == HQQBackend.PYTORCH, "the trainable forward with hqq's explicit backward"
    targets = {n.split(".")[-4] for n, _ in built.model.named_parameters() if "lora_A" in n}
    assert targets == set(LINEARS), "'all-linear' reaches every hqq layer"
    counts = lean_activations.apply(built.model, lean_activations)  # the lean LoRA branch is the GPU default
    try:
        assert counts["lora"] == (2 * 7 if lean_activations else 0)
        assert_lora_gradients_match(built.model, reference, batch)
        evaluation_pass(built.model, batch)
        assert_lora_gradients_match(built.model, reference, batch)
    finally:
        lean_activations.apply(built.model, False)


def test_the_gradient_check_catches_a_backend_that_locks_into_inference_after_a_no_grad_forward(hqq_pair, batch, monkeypatch):
    """No hqq backend that runs on the CPU is broken this way (module docstring of worker/training/hqq.py), so the
    broken one is made here: like gptqmodel's CPU kernels, after any no-grad forward it stops passing gradient
    back through the frozen weight. The check passes before the evaluation pass and fails after it."""
    built, reference = hqq_pair
    locked: set[int] = set()

    def sticky_inference_forward(self, x):
        if not torch.is_grad_enabled():
            locked.add(id(self))
        if id(self) in locked:
            return torch.matmul(x.detach(), self.dequantize().t())  # the loss looks normal; the input gradient is lost
        return self.forward_pytorch_backprop(x)

    monkeypatch.setattr(HQQLinear, "forward", sticky_inference_forward)
    assert_lora_gradients_match(built.model, reference, batch)
    evaluation_pass(built.model, batch)
    with pytest.raises(AssertionError, match="off by"):
        assert_lora_gradients_match(built.model, reference, batch)


def test_the_memory_estimate_gives_the_real_size_of_the_hqq_weights(hqq_pair):
    from contract.memory import bits_per_weight
    from worker.training.hqq import quantized_weight_bytes

    built, _ = hqq_pair
    weights = sum(math.prod(m.meta["shape"]) for m in built.model.modules() if isinstance(m, HQQLinear))
    estimate = weights * bits_per_weight("hqq", compute_dtype="fp32", hqq_bits=4, hqq_group_size=64) / 8
    assert estimate == pytest.approx(quantized_weight_bytes(built.model), rel=0.01)


# --- through the engine ---------------------------------------------------------------------------------

def test_hqq_trains_through_the_engine_and_its_adapter_reloads(tiny_model_dir, tmp_path):
    from peft import PeftModel

    from contract.memory import bits_per_weight
    from worker.training import hqq
    from worker.training.model import read_model_config

    train_file = write_chat_file(tmp_path / "train.jsonl", 10)
    valid_file = write_chat_file(tmp_path / "valid.jsonl", 2, seed=1)
    cfg = hqq_cfg(hqq_bits=3, hqq_group_size=32)
    sink = RecordingSink()
    result = train(TrainingRequest(tiny_model_dir, train_file, tmp_path / "out", cfg, valid_file), sink)
    assert result.status == "succeeded" and result.steps == 2
    assert all(math.isfinite(s["train_loss"]) for s in sink.steps)
    [(_, message, _)] = [e for e in sink.events if e[1].startswith("Model loaded")]
    assert "quantization=hqq" in message

    # The saved adapter on a freshly quantized base gives the trained model's validation loss (hqq's quantization
    # is deterministic, and the adapter names every hqq layer).
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    valid, _ = tokenize_examples(tokenizer, load_examples(valid_file, min_examples=1), max_seq_length=cfg.max_seq_length)
    base = hqq.load_base(tiny_model_dir, read_model_config(tiny_model_dir), cfg, torch.device("cpu"), torch.float32, "sdpa")
    reloaded = PeftModel.from_pretrained(base, result.adapter_dir)
    layer = reloaded.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, HQQLinear) and layer.base_layer.meta["nbits"] == 3
    weights = sum(math.prod(m.meta["shape"]) for m in base.modules() if isinstance(m, HQQLinear))
    assert weights * bits_per_weight("hqq", compute_dtype="fp32", hqq_bits=3, hqq_group_size=32) / 8 == \
        pytest.approx(hqq.quantized_weight_bytes(base), rel=0.02), "3-bit: ten weights per int32 word"
    reloaded_loss = evaluate(reloaded, SupervisedObjective(cfg), valid, cfg, torch.device("cpu"), tokenizer.pad_token_id)["valid_loss"]
    assert reloaded_loss == pytest.approx(result.final_valid_loss, rel=1e-5)

    # The inference server serves such an adapter on the 16-bit base (or NF4): it loads there (same module names),
    # and differs only by the base's quantization error.
    from transformers import AutoModelForCausalLM

    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), result.adapter_dir)
    plain_loss = evaluate(plain, SupervisedObjective(cfg), valid, cfg, torch.device("cpu"), tokenizer.pad_token_id)["valid_loss"]
    assert plain_loss == pytest.approx(result.final_valid_loss, rel=0.05) and plain_loss != reloaded_loss


def test_hqq_keeps_the_rotary_frequencies_in_fp32():
    """hqq casts what it does not quantize to the compute dtype; RoPE's inverse frequencies stay fp32, as on every
    other route."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from worker.training import hqq

    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2)).to(torch.bfloat16)
    model.model.rotary_emb.inv_freq = model.model.rotary_emb.inv_freq.float()  # as from_pretrained leaves it
    hqq.quantize(model, hqq_cfg(), torch.device("cpu"), torch.bfloat16)
    assert isinstance(model.model.layers[0].mlp.up_proj, HQQLinear) and model.model.norm.weight.dtype == torch.bfloat16
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_hqq_options_are_checked(tiny_model_dir):
    with pytest.raises(ConfigError) as err:
        TrainingConfig.from_dict({"hqq_bits": 3})
    assert err.value.param == "hqq_bits" and "quantization='hqq'" in err.value.message
    with pytest.raises(ConfigError) as err:
        TrainingConfig.from_dict({"quantization": "8bit", "hqq_group_size": 128})
    assert err.value.param == "hqq_group_size"
    with pytest.raises(ConfigError) as err:
        TrainingConfig.from_dict({"quantization": "hqq", "hqq_bits": 5})
    assert err.value.param == "hqq_bits"
    # 48 does not divide the tiny model's widths (64, 128): refused before any weight is read
    with pytest.raises(ConfigError) as err:
        build_model(tiny_model_dir, hqq_cfg(hqq_group_size=48))
    assert err.value.param == "hqq_group_size" and "48" in err.value.message


def test_a_worker_without_the_hqq_extra_refuses_the_job_before_loading(monkeypatch):
    import importlib.util

    from worker.training.model import check_runtime

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "hqq" else find_spec(name, *a))
    with pytest.raises(ConfigError) as err:
        check_runtime(hqq_cfg(), "cpu")
    assert err.value.param == "quantization" and "DISABLE_CUDA=1" in err.value.message
    check_runtime(hqq_cfg(quantization="4bit", hqq_bits=4), "cpu")  # the other routes do not need it


def test_eetq_is_refused_with_the_reason_and_the_alternatives():
    with pytest.raises(ConfigError) as err:
        TrainingConfig.from_dict({"quantization": "eetq"})
    assert err.value.param == "quantization" and err.value.code == "unsupported_value"
    assert "model hub" in err.value.message and "'8bit'" in err.value.message and "'hqq'" in err.value.message
