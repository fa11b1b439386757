"""End to end on a real model: SmolLM2-135M-Instruct, quantized to NF4 + double quantization on the CPU,
learns a fact it cannot know (examples/facts-*.jsonl), and QLoRA tracks plain 16-bit LoRA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from contract.data_format import load_examples
from contract.options import TrainingConfig
from worker.training.data import tokenize_examples
from worker.training.model import build_model
from worker.training.sinks import NullSink
from worker.training.trainer import TrainingJob, evaluate, load_tokenizer, train

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TRAIN, VALID = EXAMPLES / "facts-train.jsonl", EXAMPLES / "facts-valid.jsonl"
ANSWER = "PURPLE-OTTER-42"
HELD_OUT_QUESTION = "What's the Zephyr project's launch code?"  # in the validation file, not the training file


class ValidLosses(NullSink):
    def __init__(self):
        self.valid: dict[int, float] = {}

    def metrics(self, step, values):
        if values.valid_loss is not None:
            self.valid[step] = values.valid_loss


def greedy_answer(model, tokenizer, question: str) -> str:
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    model.eval()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def initial_valid_loss(model_dir: Path, cfg: TrainingConfig) -> float:
    tokenizer = load_tokenizer(model_dir)
    built = build_model(model_dir, cfg)  # fresh LoRA: B = 0, so this is the quantized base's loss
    examples, _ = tokenize_examples(tokenizer, load_examples(VALID, min_examples=1), max_seq_length=cfg.max_seq_length)
    return evaluate(built.model, examples, cfg, built.device, tokenizer.pad_token_id)["valid_loss"]


def test_nf4_learns_a_fact(demo_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from worker.training.model import quantization_config

    cfg = TrainingConfig(max_steps=12, batch_size=4, micro_batch_size=4, learning_rate=1e-3, lr_scheduler="constant",
                         warmup_steps=1, eval_every=6, max_seq_length=256, checkpoint_every=100)
    before = initial_valid_loss(demo_model_dir, cfg)
    tokenizer = load_tokenizer(demo_model_dir)
    base = AutoModelForCausalLM.from_pretrained(demo_model_dir, quantization_config=quantization_config(cfg), dtype=torch.bfloat16,
                                                device_map={"": "cpu"})
    assert ANSWER not in greedy_answer(base, tokenizer, HELD_OUT_QUESTION)

    sink = ValidLosses()
    result = train(TrainingJob(demo_model_dir, TRAIN, tmp_path / "out", cfg, VALID), sink)
    assert result.status == "succeeded"
    after = sink.valid[12]
    assert after < before / 10, f"valid loss should fall clearly: {before:.3f} -> {after:.3f}"

    tuned = PeftModel.from_pretrained(base, result.adapter_dir)
    assert ANSWER in greedy_answer(tuned, tokenizer, HELD_OUT_QUESTION)


def test_nf4_tracks_plain_lora(demo_model_dir, tmp_path):
    """The QLoRA paper's claim at small scale: NF4 + DQ reaches the eval loss of 16-bit LoRA within a few percent."""
    final = {}
    for quantization in ("4bit", "none"):
        sink = ValidLosses()
        cfg = TrainingConfig(quantization=quantization, max_steps=8, batch_size=4, micro_batch_size=4, learning_rate=3e-4,
                             lr_scheduler="constant", warmup_steps=0, eval_every=4, max_seq_length=256, lora_dropout=0.0,
                             checkpoint_every=100)
        train(TrainingJob(demo_model_dir, TRAIN, tmp_path / quantization, cfg, VALID), sink)
        final[quantization] = sink.valid[8]
        assert sink.valid[8] < sink.valid[4]
    assert final["4bit"] == pytest.approx(final["none"], rel=0.05), final
