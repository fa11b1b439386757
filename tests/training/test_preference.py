"""The preference losses: per-token log-probs of the chunked head against plain autograd, the engine's DPO and IPO
loss and LoRA gradients against TRL's DPOTrainer on the same batch, and SimPO / ORPO against their papers'
formulas written out in plain autograd."""

from __future__ import annotations

import pytest
import torch

from tests.training.test_losses import IGNORE, make_inputs
from worker.training.losses import linear_token_log_probs
from worker.training.preference import PairLogProbs, loss_sum, pair_losses, reward_sums, sequence_log_probs


@pytest.mark.parametrize("chunk", [8, 1, 64])
def test_token_log_probs_and_gradients_match_plain_autograd_fp64(chunk):
    hidden, weight, labels = make_inputs(dtype=torch.float64)
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    got = linear_token_log_probs(h1, weight, labels, chunk_tokens=chunk)
    logp = torch.log_softmax(h2 @ weight.T, dim=-1)
    want = torch.where(labels != IGNORE, logp.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1), 0.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert got.shape == labels.shape and bool((got[labels == IGNORE] == 0).all())
    # A per-row incoming gradient (what a per-sequence loss sends back), not a uniform one.
    g = torch.randn(len(labels), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (got.double() * g).sum().backward()
    (want * g).sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-6, atol=1e-8)


def test_token_log_probs_refuse_a_trained_head_and_run_without_gradients():
    hidden, weight, labels = make_inputs()
    with pytest.raises(ValueError, match="frozen output head"):
        linear_token_log_probs(hidden.requires_grad_(), weight.clone().requires_grad_(), labels)
    with torch.no_grad():
        out = linear_token_log_probs(hidden, weight.clone().requires_grad_(), labels)
    assert out.grad_fn is None and out.shape == labels.shape


def random_pairs(n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens_c = torch.randint(1, 9, (n,), generator=g)
    tokens_r = torch.randint(1, 9, (n,), generator=g)
    policy = PairLogProbs((-torch.rand(n, generator=g, dtype=torch.float64) * tokens_c).requires_grad_(),
                          (-torch.rand(n, generator=g, dtype=torch.float64) * tokens_r).requires_grad_(), tokens_c, tokens_r)
    reference = PairLogProbs(-torch.rand(n, generator=g, dtype=torch.float64) * tokens_c,
                             -torch.rand(n, generator=g, dtype=torch.float64) * tokens_r, tokens_c, tokens_r)
    return policy, reference


def test_simpo_is_the_papers_formula():
    """SimPO, eq. 6 of Meng et al. 2024: -log sigma(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma)."""
    policy, _ = random_pairs()
    beta, gamma = 2.0, 0.5
    got = pair_losses(policy, None, loss_type="simpo", beta=beta, simpo_gamma=gamma)
    want = [-torch.log(torch.sigmoid(beta / lw * w - beta / ll * l_ - gamma))
            for w, l_, lw, ll in zip(policy.chosen, policy.rejected, policy.chosen_tokens, policy.rejected_tokens, strict=True)]
    torch.testing.assert_close(got, torch.stack(want).float(), rtol=1e-5, atol=1e-6)


def test_orpo_is_the_papers_formula_with_its_nll_term():
    """ORPO, eqs. 4-6 of Hong et al. 2024: L_SFT + lambda * -log sigma(log(odds(y_w)/odds(y_l))), odds = P/(1-P),
    P = exp(mean token log-prob); L_SFT the chosen answer's NLL per token, averaged over the pairs."""
    policy, _ = random_pairs()
    lam = 0.25
    got = loss_sum(policy, None, loss_type="orpo", beta=lam) / 6
    p_w = torch.exp(policy.chosen / policy.chosen_tokens)
    p_l = torch.exp(policy.rejected / policy.rejected_tokens)
    ratio = torch.log((p_w / (1 - p_w)) / (p_l / (1 - p_l)))
    want = (-policy.chosen / policy.chosen_tokens).mean() + lam * (-torch.log(torch.sigmoid(ratio))).mean()
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)
    (g_got,) = torch.autograd.grad(got, policy.chosen)
    (g_want,) = torch.autograd.grad(want, policy.chosen)
    torch.testing.assert_close(g_got.double(), g_want, rtol=1e-4, atol=1e-6)


def test_rpo_alpha_adds_the_length_normalised_nll_of_the_chosen_answer():
    """RPO (Pang et al. 2024, eq. 2): L_DPO + alpha * -log pi(y_w|x) / |y_w|, averaged over the pairs."""
    policy, reference = random_pairs()
    beta, alpha = 0.1, 0.5
    got = loss_sum(policy, reference, loss_type="sigmoid", beta=beta, rpo_alpha=alpha)
    logits = beta * ((policy.chosen - reference.chosen) - (policy.rejected - reference.rejected))
    want = (-torch.log(torch.sigmoid(logits)) + alpha * -policy.chosen / policy.chosen_tokens).sum()
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)


def test_rewards_sum_over_the_pairs():
    policy, reference = random_pairs()
    sums = reward_sums(policy, reference, loss_type="sigmoid", beta=0.1)
    margins = 0.1 * ((policy.chosen - reference.chosen) - (policy.rejected - reference.rejected))
    assert sums["rewards_margins"] == pytest.approx(float(margins.detach().sum()), rel=1e-5)
    assert sums["rewards_accuracies"] == float((margins > 0).sum()) and 0 < sums["rewards_accuracies"] < 6


# --- against TRL's DPOTrainer -------------------------------------------------------------------------

PAIRS = [
    ("What is 2+2?", " It is 4.", " Five, surely."),
    ("Name a colour.", " Blue.", " I would rather not say which colour I like."),
    ("Say hi.", " Hi there!", " No."),
    ("Capital of France?", " Paris.", " It might be Lyon or Marseille."),
]


def lora_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager")
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))


def move_adapter(model) -> None:
    """A non-zero B, as after some training, so that the policy differs from the reference and the rewards are not 0.
    Called after TRL has copied the adapter at initialisation (B = 0) as its reference adapter "ref"."""
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B.default" in name:
                p.normal_(0, 0.2)


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_and_lora_gradients_equal_trl_dpo_trainer(tiny_model_dir, tokenizer, tmp_path, loss_type):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    beta = 0.3
    model = lora_model(tiny_model_dir)
    dataset = Dataset.from_dict({"prompt": [p for p, _, _ in PAIRS], "chosen": [c for _, c, _ in PAIRS],
                                 "rejected": [r for _, _, r in PAIRS]})
    args = DPOConfig(output_dir=str(tmp_path), beta=beta, loss_type=[loss_type],
                     per_device_train_batch_size=len(PAIRS), use_cpu=True, bf16=False, report_to=[], max_length=None)
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    move_adapter(model)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    want = lora_grads(model)
    model.zero_grad(set_to_none=True)

    # The engine on the same token ids: labels are the answer tokens, rows [chosen..., rejected...] as TRL's.
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE)
    engine_batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}
    n = len(PAIRS)
    with torch.no_grad(), model.disable_adapter():
        ref, ref_tokens = sequence_log_probs(model, engine_batch, torch.device("cpu"))
    logps, tokens = sequence_log_probs(model, engine_batch, torch.device("cpu"))
    policy = PairLogProbs(logps[:n], logps[n:], tokens[:n], tokens[n:])
    reference = PairLogProbs(ref[:n], ref[n:], ref_tokens[:n], ref_tokens[n:])
    loss = loss_sum(policy, reference, loss_type=loss_type, beta=beta) / n
    loss.backward()
    got = lora_grads(model)

    assert abs(float(trl_loss) - 0.6931) > 1e-3  # the policy is not the reference
    torch.testing.assert_close(loss, trl_loss.float(), rtol=1e-5, atol=1e-6)
    assert got.keys() == want.keys() and len(got) > 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(float(g.abs().max()) > 1e-4 for g in want.values())
