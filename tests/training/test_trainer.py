"""The engine's mechanics on tiny random Llama models, through the real bitsandbytes NF4 path on the CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from contract.data_format import DataValidationError, load_examples
from contract.options import ConfigError, TrainingConfig
from worker.training.checkpoint import CheckpointError, verify_adapter
from worker.training.data import collate_packed, collate_padded, tokenize_examples
from worker.training.model import build_model
from worker.training.objectives.sft import SupervisedObjective, forward_loss
from worker.training.sinks import JsonlSink
from worker.training.trainer import TrainingRequest, train

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def write_chat_file(path: Path, n: int, seed: int = 0) -> Path:
    """n chat examples of varied length (so that packing and padding differ)."""
    import random

    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    with path.open("w") as f:
        for i in range(n):
            question = " ".join(rng.choice(words) for _ in range(rng.randint(2, 12)))
            answer = " ".join(rng.choice(words) for _ in range(rng.randint(1, 20)))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{i}: {question}?"},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    return path


class RecordingSink:
    def __init__(self):
        self.events, self.steps, self.checkpoints = [], [], []

    def start(self, total_steps):
        pass

    def event(self, level, message, data=None):
        self.events.append((level, message, data))

    def metrics(self, step, values):
        self.steps.append(values.to_dict())

    def checkpoint(self, step, path, metrics):
        self.checkpoints.append((step, Path(path), metrics.checkpoint_metrics()))


@pytest.fixture
def train_file(tmp_path):
    return write_chat_file(tmp_path / "train.jsonl", 16)


def test_training_writes_peft_checkpoints_and_metrics(tiny_model_dir, train_file, tmp_path):
    cfg = TrainingConfig(max_steps=4, batch_size=4, micro_batch_size=2, checkpoint_every=2, eval_every=2, learning_rate=1e-3)
    sink = RecordingSink()
    valid = write_chat_file(tmp_path / "valid.jsonl", 4, seed=1)
    result = train(TrainingRequest(tiny_model_dir, train_file, tmp_path / "out", cfg, valid), sink)

    assert result.status == "succeeded" and result.steps == 4
    assert [s["step"] for s in sink.steps] == [1, 2, 3, 4]
    for values in sink.steps:
        for key in ("train_loss", "train_mean_token_accuracy", "learning_rate", "grad_norm", "tokens_per_second", "peak_memory_bytes"):
            assert math.isfinite(values[key]), key
        assert values["peak_memory_bytes"] > 0 and values["tokens_per_second"] > 0
    assert "valid_loss" in sink.steps[1] and "valid_loss" in sink.steps[3] and "valid_loss" not in sink.steps[0]
    assert [c[0] for c in sink.checkpoints] == [2, 4]
    for _step, path, metrics in sink.checkpoints:
        assert (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()
        assert (path / "trainer_state.pt").is_file()
        assert verify_adapter(path) > 0
        assert set(metrics) >= {"step", "train_loss", "train_mean_token_accuracy", "valid_loss"}
    # the job's adapter loads with peft onto the base model
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, result.adapter_dir)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b), "training must have moved the adapters off their zero init"
    saved = json.loads((tmp_path / "out" / "result.json").read_text())
    assert saved["status"] == "succeeded" and saved["train_stats"]["n_examples"] == 16


def test_the_job_says_whether_fused_kernels_run_and_when_one_fell_back(tiny_model_dir, train_file, tmp_path, monkeypatch):
    from worker.training import lean_activations

    def model_loaded(sink):
        [(_level, message, data)] = [e for e in sink.events if e[1].startswith("Model loaded")]
        return message, data

    sink = RecordingSink()
    train(TrainingRequest(tiny_model_dir, train_file, tmp_path / "cpu", TrainingConfig(max_steps=1, batch_size=2, micro_batch_size=2)), sink)
    message, data = model_loaded(sink)
    auto = torch.cuda.is_available()  # auto: on with CUDA, off on the CPU
    assert f"fused kernels={'on' if auto else 'off'}" in message and data["fused_kernels"] is auto
    assert data["lean_activations"] is auto and not any(level == "warn" for level, *_ in sink.events)  # auto: on with CUDA

    monkeypatch.setattr(lean_activations, "fused_fallbacks", lambda: ["rms_backward"])  # as if Triton had refused one kernel
    sink = RecordingSink()
    cfg = TrainingConfig(max_steps=2, batch_size=2, micro_batch_size=2, fused_kernels="on")
    train(TrainingRequest(tiny_model_dir, train_file, tmp_path / "fused", cfg), sink)
    message, data = model_loaded(sink)
    assert "fused kernels=on" in message and data["fused_kernels"] is True
    [warning] = [e for e in sink.events if e[0] == "warn"]  # once, after the first step
    assert "rms_backward" in warning[1] and warning[2] == {"fused_kernels_fallbacks": ["rms_backward"]}


def test_base_is_nf4_with_double_quantization(tiny_model_dir):
    import bitsandbytes as bnb

    built = build_model(tiny_model_dir, TrainingConfig())
    layers = [m for m in built.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7  # every linear layer of both decoder layers; the head stays unquantized
    state = layers[0].weight.quant_state
    assert state.quant_type == "nf4" and state.nested, "NF4 with double quantization (nested absmax)"
    assert state.blocksize == 64
    assert layers[0].weight.dtype == torch.uint8
    assert all(not p.requires_grad for n, p in built.model.named_parameters() if "lora_" not in n)
    assert all(p.dtype == torch.float32 for n, p in built.model.named_parameters() if "lora_" in n)
    targets = {n.split(".")[-4] for n, _ in built.model.named_parameters() if "lora_A" in n}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize(
    "options, check",
    [
        ({"quant_type": "fp4", "double_quant": False}, lambda s: s.quant_type == "fp4" and not s.nested),
        ({"quantization": "none"}, None),
    ],
)
def test_quantization_options(tiny_model_dir, options, check):
    import bitsandbytes as bnb

    built = build_model(tiny_model_dir, TrainingConfig(**options))
    layers = [m for m in built.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    if check is None:
        assert layers == []
    else:
        assert layers and check(layers[0].weight.quant_state)


def test_8bit_trains(tiny_model_dir, train_file, tmp_path):
    import bitsandbytes as bnb

    built = build_model(tiny_model_dir, TrainingConfig(quantization="8bit"))
    assert len([m for m in built.model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]) == 2 * 7
    sink = RecordingSink()
    result = train(TrainingRequest(tiny_model_dir, train_file, tmp_path / "out", TrainingConfig(quantization="8bit", max_steps=2, batch_size=4,
                                                                                             micro_batch_size=4)), sink)
    assert result.status == "succeeded" and all(math.isfinite(s["train_loss"]) for s in sink.steps)


def test_lora_options(tiny_model_dir):
    built = build_model(tiny_model_dir, TrainingConfig(target_modules=["q_proj", "v_proj"], lora_r=4, use_rslora=True, use_dora=True))
    names = [n for n, p in built.model.named_parameters() if p.requires_grad]
    assert {n.split(".")[-4] for n in names if "lora_A" in n} == {"q_proj", "v_proj"}
    assert any("lora_magnitude_vector" in n for n in names), "DoRA adds a trainable magnitude vector"
    lora_a = next(p for n, p in built.model.named_parameters() if "lora_A" in n)
    assert lora_a.shape[0] == 4
    layer = built.model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(32 / math.sqrt(4)), "rsLoRA scales by alpha / sqrt(r)"


def test_unknown_target_module_fails_before_training(tiny_model_dir):
    with pytest.raises(ConfigError) as err:
        build_model(tiny_model_dir, TrainingConfig(target_modules=["q_proj", "wq"]))
    assert err.value.param == "target_modules" and "wq" in err.value.message


def test_bad_data_fails_before_the_model_loads(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    with pytest.raises(DataValidationError) as err:
        train(TrainingRequest(tiny_model_dir, bad, tmp_path / "out", TrainingConfig()))
    lines = {f.line for f in err.value.faults}
    assert {1, 2} <= lines
    assert not (tmp_path / "out").exists(), "nothing is written for a job whose data is invalid"


@pytest.mark.parametrize("attn", ["sdpa", "eager", pytest.param("flex_attention", marks=pytest.mark.gpu)])
def test_packed_and_padded_losses_agree(tiny_model_dir, train_file, tokenizer, attn):
    """Same examples, same model: a packed row (no attention across examples) gives the padded batch's loss,
    for each attention implementation (flex_attention on CUDA only: the engine refuses it on the CPU)."""
    if attn == "flex_attention" and not torch.cuda.is_available():
        pytest.skip("flex_attention runs on CUDA only")
    cfg = TrainingConfig(compute_dtype="fp32", lora_dropout=0.0, attn_implementation=attn)
    built = build_model(tiny_model_dir, cfg)
    torch.manual_seed(0)
    for name, param in built.model.named_parameters():  # non-zero adapters, so that they take part
        if "lora_B" in name:
            param.data.normal_(0, 0.1)
    examples, _ = tokenize_examples(tokenizer, load_examples(train_file)[:6], max_seq_length=64)
    assert len({len(e.input_ids) for e in examples}) > 1, "examples of different lengths, so padding matters"
    built.model.eval()
    with torch.no_grad():
        packed_sum, packed_n, packed_correct = forward_loss(built.model, collate_packed(examples), built.device)
        padded_sum, padded_n, padded_correct = forward_loss(built.model, collate_padded(examples, tokenizer.pad_token_id), built.device)
        separate = [forward_loss(built.model, collate_packed([e]), built.device) for e in examples]
    assert packed_n == padded_n == sum(s[1] for s in separate)
    assert float(packed_sum) == pytest.approx(float(padded_sum), rel=1e-5)
    assert float(packed_sum) == pytest.approx(sum(float(s[0]) for s in separate), rel=1e-5)
    assert packed_correct == padded_correct


def test_packed_and_padded_training_agree(tiny_model_dir, train_file, tmp_path):
    losses = {}
    for packing in (True, False):
        sink = RecordingSink()
        cfg = TrainingConfig(packing=packing, max_steps=3, batch_size=4, micro_batch_size=4, compute_dtype="fp32",
                             lora_dropout=0.0, optimizer="adamw_torch", learning_rate=1e-3)
        train(TrainingRequest(tiny_model_dir, train_file, tmp_path / f"out-{packing}", cfg), sink)
        losses[packing] = [s["train_loss"] for s in sink.steps]
        if not packing:
            assert sink.steps[0]["tokens"] < sink.steps[0]["target_tokens"] * 10  # useful tokens exclude padding
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_gradient_accumulation_averages_over_all_target_tokens(tiny_model_dir, train_file, tmp_path):
    """batch 4 as one micro-batch of 4, as 4 micro-batches of 1, or packed into rows of at most 128 tokens (two
    rows here) gives the same loss and the same update."""
    from safetensors.torch import load_file

    results = {}
    for name, grouping in {"4": dict(micro_batch_size=4), "1": dict(micro_batch_size=1), "tokens": dict(micro_batch_tokens=128)}.items():
        sink = RecordingSink()
        cfg = TrainingConfig(max_steps=2, batch_size=4, max_seq_length=128, compute_dtype="fp32", lora_dropout=0.0,
                             optimizer="adamw_torch", learning_rate=1e-3, checkpoint_every=1, **grouping)
        train(TrainingRequest(tiny_model_dir, train_file, tmp_path / f"out-{name}", cfg), sink)
        results[name] = ([s["train_loss"] for s in sink.steps], [s["grad_norm"] for s in sink.steps],
                         load_file(sink.checkpoints[-1][1] / "adapter_model.safetensors"), sink.steps)
    for other in ("1", "tokens"):
        assert results[other][0] == pytest.approx(results["4"][0], rel=1e-4)
        assert results[other][1] == pytest.approx(results["4"][1], rel=1e-3)
        for key, tensor in results["4"][2].items():
            torch.testing.assert_close(results[other][2][key], tensor, rtol=1e-3, atol=1e-5)
        assert [s["tokens"] for s in results[other][3]] == [s["tokens"] for s in results["4"][3]]


def test_micro_batch_tokens_packs_each_step_into_full_rows(train_file, tokenizer):
    """With micro_batch_tokens a step's examples become rows of at most that many tokens: none lost, none split."""
    from worker.training.data import collate, micro_batches

    examples, _ = tokenize_examples(tokenizer, load_examples(train_file)[:8], max_seq_length=128)
    lengths = sorted(len(e.input_ids) for e in examples)
    cfg = TrainingConfig(batch_size=8, max_seq_length=128, micro_batch_tokens=128)
    rows = list(micro_batches(examples, cfg, None, lambda row: collate(row, cfg, tokenizer.pad_token_id)))
    assert all(row["input_ids"].shape[0] == 1 and row["input_ids"].shape[1] <= 128 for row in rows)
    assert sum(row["input_ids"].numel() for row in rows) == sum(lengths)
    assert len(rows) < len(examples) and len(rows) >= math.ceil(sum(lengths) / 128)
    segments = sorted(int(n) for row in rows for n in torch.diff(torch.nonzero(torch.cat(
        [row["position_ids"][0], torch.zeros(1, dtype=torch.long)]) == 0).flatten()))
    assert segments == lengths  # every example whole, in exactly one row
    # Evaluation groups the same way unless eval_batch_size says otherwise.
    assert len(list(micro_batches(examples, cfg, 2, lambda row: collate(row, cfg, tokenizer.pad_token_id)))) == 4


@pytest.mark.parametrize("optimizer", ["paged_adamw_8bit", "adamw_torch"])
def test_resume_continues_exactly(tiny_model_dir, train_file, tmp_path, optimizer):
    """2N steps straight == N steps, then a fresh process-like run resumed from the checkpoint for N more."""
    n = 3
    cfg = TrainingConfig(max_steps=2 * n, batch_size=4, micro_batch_size=2, checkpoint_every=n, lora_dropout=0.1,
                         optimizer=optimizer, learning_rate=1e-3, lr_scheduler="cosine", warmup_steps=1, n_epochs=1)
    straight = RecordingSink()
    train(TrainingRequest(tiny_model_dir, train_file, tmp_path / "straight", cfg), straight)

    first = RecordingSink()
    stop_after = {"calls": 0}

    def stop_after_checkpoint():  # stop once the step-N checkpoint exists
        stop_after["calls"] += 1
        return bool(first.checkpoints)

    interrupted = train(TrainingRequest(tiny_model_dir, train_file, tmp_path / "resumed", cfg), first, should_stop=stop_after_checkpoint)
    assert interrupted.status == "stopped" and interrupted.steps == n
    # scramble the global RNG as a new process would have it
    torch.manual_seed(12345)
    second = RecordingSink()
    result = train(TrainingRequest(tiny_model_dir, train_file, tmp_path / "resumed", cfg), second, resume_from=first.checkpoints[0][1])
    assert result.status == "succeeded" and result.steps == 2 * n
    straight_losses = [s["train_loss"] for s in straight.steps]
    resumed_losses = [s["train_loss"] for s in first.steps] + [s["train_loss"] for s in second.steps]
    assert [s["step"] for s in second.steps] == [n + 1, n + 2, n + 3]
    assert resumed_losses == pytest.approx(straight_losses, rel=1e-6, abs=1e-7)
    assert [s["learning_rate"] for s in second.steps] == pytest.approx([s["learning_rate"] for s in straight.steps[n:]])


def test_resume_refuses_changed_options(tiny_model_dir, train_file, tmp_path):
    cfg = TrainingConfig(max_steps=2, batch_size=4, micro_batch_size=4, checkpoint_every=1)
    sink = RecordingSink()
    train(TrainingRequest(tiny_model_dir, train_file, tmp_path / "a", cfg), sink)
    changed = TrainingConfig(max_steps=2, batch_size=4, micro_batch_size=4, checkpoint_every=1, lora_r=8)
    with pytest.raises(ConfigError) as err:
        train(TrainingRequest(tiny_model_dir, train_file, tmp_path / "b", changed), resume_from=sink.checkpoints[0][1])
    assert err.value.param == "lora_r"


def test_a_checkpoint_older_than_an_option_resumes_with_its_default():
    """A checkpoint written before `method` existed was a supervised run: it resumes as one, and still refuses changes."""
    from worker.training.model import resolve_for_device
    from worker.training.trainer import _resumable_config

    cfg = TrainingConfig(compute_dtype="fp32")
    older = {k: v for k, v in resolve_for_device(cfg, torch.device("cpu")).resolved().items() if k != "method"}
    assert _resumable_config(cfg, older, torch.device("cpu")) == resolve_for_device(cfg, torch.device("cpu"))
    with pytest.raises(ConfigError) as err:
        _resumable_config(cfg, {**older, "lora_r": 8}, torch.device("cpu"))
    assert err.value.param == "lora_r"


def test_stop_flag_ends_within_one_step(tiny_model_dir, train_file, tmp_path):
    sink = RecordingSink()
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return len(sink.steps) >= 2

    result = train(TrainingRequest(tiny_model_dir, train_file, tmp_path / "out", TrainingConfig(max_steps=50, batch_size=4, micro_batch_size=2)),
                   sink, should_stop=stop)
    assert result.status == "stopped"
    assert result.steps == 2 and len(sink.steps) == 2
    assert result.adapter_dir is None and not (tmp_path / "out" / "adapter").exists()


def test_truncated_adapter_is_detected(tiny_model_dir, train_file, tmp_path):
    sink = RecordingSink()
    train(TrainingRequest(tiny_model_dir, train_file, tmp_path / "out", TrainingConfig(max_steps=1, batch_size=4, micro_batch_size=4)), sink)
    path = sink.checkpoints[-1][1]
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        verify_adapter(path)
    (path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="missing or empty"):
        verify_adapter(path)


def test_epochs_and_checkpoint_per_epoch(tiny_model_dir, train_file, tmp_path):
    sink = RecordingSink()
    cfg = TrainingConfig(n_epochs=2, batch_size=8, micro_batch_size=4, keep_checkpoints=1)
    result = train(TrainingRequest(tiny_model_dir, train_file, tmp_path / "out", cfg), sink)
    assert result.steps == 4  # 16 examples / 8 per step * 2 epochs
    assert [c[0] for c in sink.checkpoints] == [2, 4]
    assert [p.name for p in (tmp_path / "out" / "checkpoints").iterdir()] == ["step-000004"]  # keep_checkpoints=1


def test_jsonl_sink_records_everything(tiny_model_dir, train_file, tmp_path):
    log = tmp_path / "metrics.jsonl"
    train(TrainingRequest(tiny_model_dir, train_file, tmp_path / "out", TrainingConfig(max_steps=2, batch_size=4, micro_batch_size=4)),
          JsonlSink(log))
    records = [json.loads(line) for line in log.read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    assert kinds.count("metrics") == 2 and kinds.count("checkpoint") == 1 and "event" in kinds


def test_gradients_after_an_evaluation_match_a_dequantized_reference(tiny_model_dir, train_file, tokenizer):
    """Evaluation (eval mode, no grad) must not change how gradients flow through the 4-bit base.

    Reference: the same adapters on a copy of the model whose 4-bit layers are replaced by plain linear
    layers holding the dequantized weights. Regression test for bitsandbytes' CPU inference repacking."""
    import copy

    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from worker.training.trainer import evaluate

    cfg = TrainingConfig(compute_dtype="fp32", lora_dropout=0.0)
    built = build_model(tiny_model_dir, cfg)
    torch.manual_seed(0)
    for name, param in built.model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.1)
    examples, _ = tokenize_examples(tokenizer, load_examples(train_file)[:4], max_seq_length=64)
    batch = collate_packed(examples)
    reference = copy.deepcopy(built.model)
    for module in reference.modules():
        for child_name, child in list(module.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                dense = torch.nn.Linear(child.in_features, child.out_features, bias=False)
                dense.weight.data = bnbf.dequantize_4bit(child.weight.data, child.weight.quant_state).float()
                dense.weight.requires_grad_(False)
                setattr(module, child_name, dense)

    evaluate(built.model, SupervisedObjective(cfg), examples, cfg, built.device, tokenizer.pad_token_id)  # the step that used to break training
    grads = {}
    for label, model in (("nf4", built.model), ("reference", reference)):
        model.train()
        model.zero_grad()
        loss, n, _ = forward_loss(model, batch, built.device)
        (loss / n).backward()
        grads[label] = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    assert grads["nf4"].keys() == grads["reference"].keys()
    first_layer_q = next(k for k in grads["nf4"] if "layers.0.self_attn.q_proj.lora_A" in k)
    torch.testing.assert_close(grads["nf4"][first_layer_q], grads["reference"][first_layer_q], rtol=1e-3, atol=1e-6)
    for key in grads["nf4"]:
        torch.testing.assert_close(grads["nf4"][key], grads["reference"][key], rtol=1e-3, atol=1e-6)


def test_a_non_finite_loss_stops_the_job_before_the_optimizer_applies_it(tiny_model_dir, train_file, tmp_path):
    """A base whose embeddings hold NaN gives a NaN loss: the run ends with a clear error, writes no checkpoint and
    reports no step."""
    import shutil

    from safetensors.torch import load_file, save_file

    from worker.training.trainer import NonFiniteLossError

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = load_file(broken / "model.safetensors")
    name = next(k for k in weights if "embed_tokens" in k)
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})

    sink = RecordingSink()
    cfg = TrainingConfig(max_steps=2, batch_size=4, micro_batch_size=2, checkpoint_every=1)
    with pytest.raises(NonFiniteLossError, match="step 1 is not a finite number"):
        train(TrainingRequest(broken, train_file, tmp_path / "out", cfg), sink)
    assert sink.steps == [] and sink.checkpoints == []
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_resume_from_the_final_checkpoint_finishes_cleanly(tiny_model_dir, train_file, tmp_path):
    """A run resumed from its last checkpoint (the worker died before the job was marked done) trains nothing,
    publishes that checkpoint as the adapter and reports it again neither as a checkpoint nor as a step."""
    from safetensors.torch import load_file

    cfg = TrainingConfig(max_steps=2, batch_size=4, micro_batch_size=4, checkpoint_every=1)
    first = RecordingSink()
    done = train(TrainingRequest(tiny_model_dir, train_file, tmp_path / "a", cfg), first)
    final = first.checkpoints[-1][1]
    second = RecordingSink()
    result = train(TrainingRequest(tiny_model_dir, train_file, tmp_path / "b", cfg), second, resume_from=final)
    assert result.status == "succeeded" and result.steps == 2
    assert second.steps == [] and second.checkpoints == []
    assert result.final_train_loss == pytest.approx(done.final_train_loss)
    adapter = load_file(result.adapter_dir / "adapter_model.safetensors")
    expected = load_file(final / "adapter_model.safetensors")
    assert adapter.keys() == expected.keys() and all(torch.equal(adapter[k], expected[k]) for k in adapter)
    assert any(m.startswith("Training finished: 2 steps") for _l, m, _d in second.events)


def test_trainer_state_is_loaded_without_running_pickled_code(tiny_model_dir, train_file, tmp_path):
    """Whoever can write a checkpoint object must not run code on the worker that resumes from it."""
    import os

    from worker.training.checkpoint import CheckpointError, load_trainer_state

    cfg = TrainingConfig(max_steps=2, batch_size=4, micro_batch_size=4, checkpoint_every=1)
    sink = RecordingSink()
    train(TrainingRequest(tiny_model_dir, train_file, tmp_path / "a", cfg), sink)
    checkpoint = sink.checkpoints[0][1]
    assert set(load_trainer_state(checkpoint)) == {"optimizer", "scheduler", "rng", "position"}  # ours loads

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"optimizer": Payload()}, checkpoint / "trainer_state.pt")
    with pytest.raises(CheckpointError, match="not loaded"):
        load_trainer_state(checkpoint)
    with pytest.raises(CheckpointError):
        train(TrainingRequest(tiny_model_dir, train_file, tmp_path / "b", cfg), resume_from=checkpoint)
    assert not marker.exists()
