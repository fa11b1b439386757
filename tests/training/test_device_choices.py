"""decide_auto: every 'auto' option decided in one place, for a device's facts (no device needed to test it), and
what a run records of its choices."""

from __future__ import annotations

import pytest

from contract.device_choices import GIB, DeviceFacts, decide_auto, plan_checkpointing
from contract.memory import estimate_memory
from contract.options import TrainingConfig
from worker.training.tunables import LOSS_CHUNK_TOKENS

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8)
PLAN = dict(model_config=LLAMA3_8B, tokens_per_micro_batch=4096, loss_chunk_tokens=LOSS_CHUNK_TOKENS)


def test_a_gpu_plans_checkpointing_against_its_budget_and_the_cpu_turns_it_off():
    cfg = TrainingConfig()
    everything = estimate_memory(LLAMA3_8B, cfg, tokens_per_micro_batch=4096, layer_modes=["off"] * 32,
                                 loss_chunk_tokens=LOSS_CHUNK_TOKENS).total
    roomy = decide_auto(cfg, DeviceFacts("cuda", fast_bf16=True, memory_budget_bytes=everything), **PLAN)
    assert roomy.checkpoint_plan == ("off",) * 32 and roomy.memory_budget_gb == round(everything / GIB, 3)
    tight = decide_auto(cfg, DeviceFacts("cuda", fast_bf16=True, memory_budget_bytes=everything // 2), **PLAN)
    assert tight.checkpoint_plan == plan_checkpointing(LLAMA3_8B, cfg.model_copy(update={"compute_dtype": "bf16", "lean_activations": True}),
                                                       tokens_per_micro_batch=4096, budget_bytes=everything // 2,
                                                       loss_chunk_tokens=LOSS_CHUNK_TOKENS)
    assert 0 < tight.checkpoint_plan.count("off") < 32
    # memory_budget_gb wins over the device's budget
    given = decide_auto(TrainingConfig(memory_budget_gb=everything / GIB), DeviceFacts("cuda", fast_bf16=True, memory_budget_bytes=1), **PLAN)
    assert given.checkpoint_plan == ("off",) * 32
    cpu = decide_auto(cfg, DeviceFacts("cpu", fast_bf16=False), **PLAN)
    assert cpu.checkpoint_plan == ("off",) * 32 and cpu.memory_budget_gb is None
    assert decide_auto(TrainingConfig(gradient_checkpointing="on"), DeviceFacts("cuda", fast_bf16=True), **PLAN).checkpoint_plan == ("on",) * 32
    assert decide_auto(cfg, DeviceFacts("cpu", fast_bf16=False)).checkpoint_plan is None  # no model config: no plan


def test_an_architecture_the_estimate_does_not_model_is_fully_checkpointed():
    odd = {**LLAMA3_8B, "num_attention_heads": None}
    choices = decide_auto(TrainingConfig(), DeviceFacts("cuda", fast_bf16=True, memory_budget_bytes=80 * GIB), **{**PLAN, "model_config": odd})
    assert choices.checkpoint_plan == ("on",) * 32


def test_a_resumed_run_keeps_the_dtype_it_began_with_and_a_missing_fact_is_an_error():
    cpu = DeviceFacts("cpu", fast_bf16=False)
    assert decide_auto(TrainingConfig(), cpu, earlier={"compute_dtype": "bf16"}).compute_dtype == "bf16"
    assert decide_auto(TrainingConfig(compute_dtype="fp32"), cpu, earlier={"compute_dtype": "bf16"}).compute_dtype == "fp32"
    with pytest.raises(ValueError, match="bf16"):
        decide_auto(TrainingConfig(), DeviceFacts("cpu"))
    with pytest.raises(ValueError, match="memory budget"):
        decide_auto(TrainingConfig(), DeviceFacts("cuda", fast_bf16=True), model_config=LLAMA3_8B)


def test_a_run_records_every_choice(tiny_model_dir, tmp_path, monkeypatch):
    from tests.training.test_trainer import RecordingSink, write_chat_file
    from worker.training import model as model_module
    from worker.training.trainer import TrainingRequest, train

    monkeypatch.setattr(model_module, "cpu_bf16_is_fast", lambda: False)
    sink = RecordingSink()
    cfg = TrainingConfig(max_steps=1, batch_size=2, micro_batch_size=2, max_seq_length=64)
    train(TrainingRequest(tiny_model_dir, write_chat_file(tmp_path / "train.jsonl", 10), tmp_path / "out", cfg), sink)
    loaded = next(data for _level, message, data in sink.events if message.startswith("Model loaded"))
    assert {k: loaded[k] for k in ("compute_dtype", "attn_implementation", "lean_activations", "fused_kernels",
                                   "checkpoint_plan", "memory_budget_gb")} == {
        "compute_dtype": "fp32", "attn_implementation": "varlen", "lean_activations": False, "fused_kernels": False,
        "checkpoint_plan": ["off", "off"], "memory_budget_gb": None}
