"""Method dpo through the engine's recipe (`trainer.train`) on a tiny 4-bit Llama: the reference pass, the reward
metrics per step and on validation, exact resume with the stored reference, and the options it refuses."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from contract.options import ConfigError, TrainingConfig
from tests.training.test_trainer import RecordingSink
from worker.training.trainer import TrainingRequest, train

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
REWARD_KEYS = ("rewards_chosen", "rewards_rejected", "rewards_margins", "rewards_accuracies", "logps_chosen", "logps_rejected")


def write_pairs(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 10)))
            good = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))
            f.write(json.dumps({"input": {"messages": [{"role": "user", "content": f"{i}: {question}?"}]},
                                "preferred_output": [{"role": "assistant", "content": f"Sure! {good}"}],
                                "non_preferred_output": [{"role": "assistant", "content": good}]}) + "\n")
    return path


def dpo_config(**overrides) -> TrainingConfig:
    values = dict(method="dpo", max_steps=4, batch_size=4, micro_batch_size=2, learning_rate=1e-3, n_epochs=1,
                  checkpoint_every=2, lora_dropout=0.1, beta=0.1)
    return TrainingConfig(**{**values, **overrides})


def test_a_dpo_job_reports_rewards_per_step_and_on_validation(tiny_model_dir, tmp_path):
    train_file, valid_file = write_pairs(tmp_path / "t.jsonl", 12), write_pairs(tmp_path / "v.jsonl", 3, seed=1)
    sink = RecordingSink()
    result = train(TrainingRequest(tiny_model_dir, train_file, tmp_path / "out", dpo_config(eval_every=2), valid_file), sink)
    assert result.status == "succeeded" and result.steps == 4
    first = sink.steps[0]
    # Before its first update the policy is the reference: every reward is 0 and the sigmoid loss is log 2.
    assert first["train_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["train_rewards_margins"] == pytest.approx(0, abs=1e-5) and first["train_rewards_accuracies"] == 0
    for step in sink.steps:
        assert all(f"train_{key}" in step for key in REWARD_KEYS)
        assert step["train_logps_chosen"] < 0 and step["train_logps_rejected"] < 0
    evaluated = [s for s in sink.steps if "valid_loss" in s]
    assert [s["step"] for s in evaluated] == [2, 4]
    assert all(f"valid_{key}" in s for key in REWARD_KEYS for s in evaluated)
    assert any(m.startswith("Reference log-probs computed") for _l, m, _d in sink.events)
    # The checkpoint carries the reference log-probs of both files.
    state = torch.load(sink.checkpoints[0][1] / "trainer_state.pt", weights_only=True)
    assert state["objective"]["reference_training"].shape == (12, 2)
    assert state["objective"]["reference_validation"].shape == (3, 2)


def test_resume_of_a_dpo_job_is_exact(tiny_model_dir, tmp_path):
    train_file = write_pairs(tmp_path / "t.jsonl", 10)
    cfg = dpo_config(batch_size=2, micro_batch_size=1, rpo_alpha=0.5)
    straight = RecordingSink()
    train(TrainingRequest(tiny_model_dir, train_file, tmp_path / "straight", cfg), straight)
    first = RecordingSink()
    interrupted = train(TrainingRequest(tiny_model_dir, train_file, tmp_path / "resumed", cfg), first, should_stop=lambda: bool(first.checkpoints))
    assert interrupted.status == "stopped" and interrupted.steps == 2
    torch.manual_seed(12345)
    second = RecordingSink()
    result = train(TrainingRequest(tiny_model_dir, train_file, tmp_path / "resumed", cfg), second, resume_from=first.checkpoints[0][1])
    assert result.status == "succeeded" and [s["step"] for s in second.steps] == [3, 4]
    assert not any(m.startswith("Reference log-probs computed") for _l, m, _d in second.events)
    for key in ("train_loss", "train_rewards_margins", "train_logps_chosen"):
        assert [s[key] for s in first.steps + second.steps] == pytest.approx([s[key] for s in straight.steps], rel=1e-6, abs=1e-7)
    assert straight.steps[-1]["train_loss"] != pytest.approx(straight.steps[0]["train_loss"], abs=1e-4)  # it trained


def test_a_dpo_job_refuses_a_supervised_file_and_a_trained_head(tiny_model_dir, tmp_path):
    from contract.data_format import DataValidationError
    from tests.training.test_trainer import write_chat_file

    chat = write_chat_file(tmp_path / "chat.jsonl", 12)
    with pytest.raises(DataValidationError, match="needs preference pairs"):
        train(TrainingRequest(tiny_model_dir, chat, tmp_path / "a", dpo_config()))
    with pytest.raises(ConfigError, match="frozen output head") as err:
        TrainingConfig.from_dict({"method": "dpo", "target_modules": ["q_proj", "lm_head"]})
    assert err.value.param == "target_modules"


def test_the_memory_estimate_of_a_dpo_job_counts_both_answers_of_each_pair():
    from functools import partial

    from contract.memory import estimate_memory as estimate
    from tests.api.helpers import TINY_LLAMA_CONFIG as TINY_CONFIG
    from worker.training.tunables import LOSS_CHUNK_TOKENS

    estimate_memory = partial(estimate, loss_chunk_tokens=LOSS_CHUNK_TOKENS)

    supervised = TrainingConfig(micro_batch_size=2, max_seq_length=512)
    dpo = TrainingConfig(method="dpo", micro_batch_size=2, max_seq_length=512)
    assert estimate_memory(TINY_CONFIG, dpo).total == estimate_memory(TINY_CONFIG, supervised, tokens_per_micro_batch=2 * 2 * 512).total
    assert estimate_memory(TINY_CONFIG, dpo).total > estimate_memory(TINY_CONFIG, supervised).total


def test_the_memory_estimate_counts_a_reference_pass_larger_than_a_training_pass():
    """The reference pass (and evaluation) runs eval_batch_size pairs without gradients: when that holds more tokens
    than a training pass, the estimate's peak is that pass's; otherwise the training pass bounds it."""
    from contract.memory import estimate_memory
    from tests.api.helpers import TINY_LLAMA_CONFIG as TINY_CONFIG
    from worker.training.tunables import LOSS_CHUNK_TOKENS

    def estimate(**options):
        return estimate_memory(TINY_CONFIG, TrainingConfig(method="dpo", micro_batch_size=1, max_seq_length=512, **options),
                               loss_chunk_tokens=LOSS_CHUNK_TOKENS)

    plain, same, large = estimate(), estimate(eval_batch_size=1), estimate(eval_batch_size=64)
    assert plain.no_grad_pass == same.no_grad_pass == 0 and plain.total == same.total
    assert large.no_grad_tokens == 64 * 2 * 512 and large.no_grad_pass > large.training_pass
    assert large.total == large.base_weights + large.lora_params + large.optimizer_state + large.no_grad_pass + large.overhead
    assert large.training_pass == plain.training_pass  # the training pass itself is unchanged
    # Evaluation of a supervised job with a large eval_batch_size is counted the same way.
    supervised = estimate_memory(TINY_CONFIG, TrainingConfig(micro_batch_size=1, max_seq_length=512, eval_batch_size=64),
                                 loss_chunk_tokens=LOSS_CHUNK_TOKENS)
    assert supervised.no_grad_tokens == 64 * 512 and supervised.total > estimate_memory(
        TINY_CONFIG, TrainingConfig(micro_batch_size=1, max_seq_length=512), loss_chunk_tokens=LOSS_CHUNK_TOKENS).total


def test_the_reference_pass_groups_pairs_as_training_does_with_micro_batch_tokens(tiny_model_dir, tmp_path, monkeypatch):
    """With micro_batch_tokens a reference pass holds no more tokens than a training pass (it used to take
    micro_batch_size pairs whatever their length), so the memory estimate's training pass bounds it."""
    from worker.training.objectives import dpo

    passes: list[tuple[bool, int]] = []
    real = dpo.sequence_log_probs

    def counting(model, batch, *args, **kwargs):
        passes.append((torch.is_grad_enabled(), int(batch["attention_mask"].sum())))
        return real(model, batch, *args, **kwargs)

    monkeypatch.setattr(dpo, "sequence_log_probs", counting)
    train_file = write_pairs(tmp_path / "t.jsonl", 10)
    cfg = TrainingConfig(method="dpo", max_steps=1, batch_size=4, micro_batch_tokens=128, max_seq_length=128, learning_rate=1e-3)
    sink = RecordingSink()
    train(TrainingRequest(tiny_model_dir, train_file, tmp_path / "out", cfg), sink)
    reference = [n for grad, n in passes if not grad]
    assert sum(1 for grad, _ in passes if grad) >= 1 and len(reference) >= 3
    assert max(reference) <= 128, reference
    assert sink.steps[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-5)  # the stored reference is the policy at init
