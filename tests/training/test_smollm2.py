"""On a real model: SmolLM2-135M-Instruct, quantized to NF4 + double quantization on the CPU, tracks plain 16-bit
LoRA. That it learns a fact it cannot know (examples/facts-*.jsonl) is tested through the whole service, training
and then chatting, in tests/e2e/test_chat_smollm2.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from contract.options import TrainingConfig
from worker.training.sinks import NullSink
from worker.training.trainer import TrainingRequest, train

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TRAIN, VALID = EXAMPLES / "facts-train.jsonl", EXAMPLES / "facts-valid.jsonl"


class ValidLosses(NullSink):
    def __init__(self):
        self.valid: dict[int, float] = {}

    def metrics(self, step, values):
        if values.valid_loss is not None:
            self.valid[step] = values.valid_loss


# make test-bench: two SmolLM2 runs take a minute and a half of make test's 15; NF4 against plain LoRA on tiny models
# stays in make test (tests/training/).
@pytest.mark.bench
def test_nf4_tracks_plain_lora(demo_model_dir, tmp_path):
    """The QLoRA paper's claim at small scale: NF4 + DQ reaches the eval loss of 16-bit LoRA within a few percent."""
    final = {}
    for quantization in ("4bit", "none"):
        sink = ValidLosses()
        cfg = TrainingConfig(quantization=quantization, max_steps=8, batch_size=4, micro_batch_size=4, learning_rate=3e-4,
                             lr_scheduler="constant", warmup_steps=0, eval_every=4, max_seq_length=256, lora_dropout=0.0,
                             checkpoint_every=100)
        train(TrainingRequest(demo_model_dir, TRAIN, tmp_path / quantization, cfg, VALID), sink)
        final[quantization] = sink.valid[8]
        assert sink.valid[8] < sink.valid[4]
    assert final["4bit"] == pytest.approx(final["none"], rel=0.05), final
