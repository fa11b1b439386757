"""lean_activations: each autograd function against autograd's own gradients, the dropout replay, and switching."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from contract.data_format import load_examples
from contract.options import TrainingConfig
from worker.training import lean_activations
from worker.training.data import collate_packed, tokenize_examples
from worker.training.model import build_model
from worker.training.objectives.sft import forward_loss

from .test_trainer import write_chat_file


def double(*shape, grad=True):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=grad)


def zeros_for(x, b, dtype=None):
    """A base layer's output of zeros: the branch's output is then what the branch adds."""
    return torch.zeros(*x.shape[:-1], b.shape[0], dtype=dtype or x.dtype, device=x.device)


def test_functions_pass_gradcheck():
    torch.manual_seed(0)
    x = double(3, 5, 8)
    assert torch.autograd.gradcheck(lean_activations.SwiGLUFunction.apply, (double(3, 7), double(3, 7)))
    a, b, result = double(4, 8), double(6, 4), double(3, 5, 6)
    assert torch.autograd.gradcheck(lambda r, x, a, b: lean_activations.LoraBranch.apply(r, x, a, b, 0.0, 0.5), (result, x, a, b))
    gate, up = double(3, 5, 8), double(3, 5, 8)  # down_proj's branch, fed by SwiGLU: it rebuilds the product
    assert torch.autograd.gradcheck(lambda r, g, u, a, b: lean_activations.LoraBranch.apply(r, lean_activations.SwiGLUFunction.apply(g, u), a, b, 0.0, 0.5),
                                    (result, gate, up, a, b))


def test_a_branch_fed_by_swiglu_keeps_gate_and_up_not_their_product():
    """down_proj's branch: with dropout, the same output and gradients as a branch that keeps the product itself."""
    torch.manual_seed(0)
    gate, up = torch.randn(2, 9, 24, requires_grad=True), torch.randn(2, 9, 24, requires_grad=True)
    a, b = torch.randn(4, 24, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    grad = torch.randn(2, 9, 6)
    hidden = lean_activations.SwiGLUFunction.apply(gate, up)
    kept = []
    torch.manual_seed(3)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = lean_activations.LoraBranch.apply(zeros_for(gate, b), hidden, a, b, 0.2, 2.0)
    assert any(t is gate for t in kept) and any(t is up for t in kept) and not any(t is hidden for t in kept)
    got = torch.autograd.grad(out, (gate, up, a, b), grad)
    torch.manual_seed(3)
    reference = lean_activations.LoraBranch.apply(zeros_for(gate, b), F.silu(gate) * up, a, b, 0.2, 2.0)
    expected = torch.autograd.grad(reference, (gate, up, a, b), grad)
    assert torch.equal(out, reference)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


def test_rmsnorm_gradients_equal_autograds_in_fp32():
    """The norm computes in fp32 whatever its input (as transformers' does), so gradcheck's float64 cannot see
    it; against autograd through transformers' norm in fp32, input and weight gradients agree."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(48, eps=1e-6)
    norm.weight.data.normal_(1, 0.2)
    x = torch.randn(3, 7, 48, requires_grad=True)
    grad = torch.randn(3, 7, 48)
    expected = torch.autograd.grad(norm(x), (x, norm.weight), grad)
    got = torch.autograd.grad(lean_activations.RMSNormFunction.apply(x, norm.weight, 1e-6), (x, norm.weight), grad)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_rmsnorm_matches_transformers_in_bf16():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(64, eps=1e-5).to(torch.bfloat16)
    norm.weight.data.normal_(1, 0.1)
    x = torch.randn(2, 10, 64, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(2, 10, 64, dtype=torch.bfloat16)
    (expected_x,) = torch.autograd.grad(norm(x), x, grad)
    out = lean_activations.RMSNormFunction.apply(x, norm.weight, norm.variance_epsilon)
    (got_x,) = torch.autograd.grad(out, x, grad)
    assert torch.equal(out, norm(x))
    torch.testing.assert_close(got_x, expected_x, rtol=1e-2, atol=1e-2)  # fp32 math in another order, bf16 result


def test_swiglu_is_bitwise_autograds():
    gate = torch.randn(4, 32, dtype=torch.bfloat16, requires_grad=True)
    up = torch.randn(4, 32, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(4, 32, dtype=torch.bfloat16)
    expected = torch.autograd.grad(F.silu(gate) * up, (gate, up), grad)
    got = torch.autograd.grad(lean_activations.SwiGLUFunction.apply(gate, up), (gate, up), grad)
    assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))


def test_lora_branch_replays_the_forwards_dropout_mask():
    """Backward rebuilds the mask from the saved generator state: the gradients are those of the same mask kept,
    and the random stream after the step is where nn.Dropout would have left it."""
    torch.manual_seed(0)
    x = torch.randn(2, 50, 32, requires_grad=True)
    a = torch.randn(8, 32, requires_grad=True)
    b = torch.randn(16, 8, requires_grad=True)
    grad = torch.randn(2, 50, 16)

    torch.manual_seed(7)
    dropout = torch.nn.Dropout(0.3)
    reference = F.linear(F.linear(dropout(x), a), b) * 0.25
    after_reference = torch.rand(1)
    expected = torch.autograd.grad(reference, (x, a, b), grad)

    torch.manual_seed(7)
    out = lean_activations.LoraBranch.apply(zeros_for(x, b), x, a, b, 0.3, 0.25)
    torch.rand(5)  # the generator moves on before backward; the replay must not care
    got = torch.autograd.grad(out, (x, a, b), grad)
    torch.testing.assert_close(out, reference)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)
    torch.manual_seed(7)
    lean_activations.LoraBranch.apply(zeros_for(x, b), x, a, b, 0.3, 0.25)
    assert torch.equal(torch.rand(1), after_reference)  # the same amount of randomness was drawn


def test_apply_switches_a_built_model_both_ways(tiny_model_dir):
    built = build_model(tiny_model_dir, TrainingConfig(lean_activations=False))
    model = built.model
    assert lean_activations.apply(model, True) == {"norms": 5, "mlps": 2, "lora": 14}  # 2 per layer + the final norm; 7 LoRA a layer
    assert lean_activations.not_lean(model) == []
    kinds = {type(m).__name__: m for m in model.modules()}
    assert kinds["LlamaRMSNorm"].forward.__func__ is lean_activations.rmsnorm_forward
    assert "lean_kernels" not in kinds["LlamaRMSNorm"].__dict__  # the eager math
    lean_activations.apply(model, True, fused_kernels=True)
    assert kinds["LlamaRMSNorm"].lean_kernels is lean_activations.compiled_kernels() and kinds["LlamaMLP"].lean_kernels is lean_activations.compiled_kernels()
    assert lean_activations.apply(model, False) == {"norms": 0, "mlps": 0, "lora": 0}
    assert len(lean_activations.not_lean(model)) == 5 + 2
    for kind in ("LlamaRMSNorm", "LlamaMLP"):
        assert "forward" not in kinds[kind].__dict__ and "lean_kernels" not in kinds[kind].__dict__


@pytest.mark.parametrize("family", sorted(lean_activations.NORM_CLASSES))
def test_each_known_class_computes_what_its_lean_forward_computes(family):
    """Lean activations replace the forward of these transformers classes, matched by class: each must still compute
    Llama's norm and SwiGLU MLP. A transformers release that renames or changes one fails here, not silently."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(family, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                                  num_hidden_layers=1, vocab_size=64, hidden_act="silu")
    norm_class = lean_activations._transformers_class(family, lean_activations.NORM_CLASSES[family])
    mlp_class = lean_activations._transformers_class(family, lean_activations.MLP_CLASSES[family])
    assert lean_activations.known_classes()[norm_class] == "norms" and lean_activations.known_classes()[mlp_class] == "mlps"
    torch.manual_seed(0)
    norm, mlp = norm_class(32, eps=1e-6), mlp_class(config)
    norm.weight.data.normal_(1, 0.2)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(lean_activations.rmsnorm_forward(norm, x), norm(x))
    torch.testing.assert_close(lean_activations.mlp_forward(mlp, x), mlp(x))


def test_a_layer_the_plan_counted_lean_but_is_not_is_a_warning(tiny_model_dir, tmp_path, monkeypatch):
    """A class lean activations do not know (here: as if LlamaMLP were no longer in the table) keeps its forward; the job
    says so in a warning event that names the modules, instead of training slower than planned in silence."""
    from tests.training.test_trainer import RecordingSink
    from worker.training.trainer import TrainingRequest, train

    only_norms = {cls: kind for cls, kind in lean_activations.known_classes().items() if kind == "norms"}
    monkeypatch.setattr(lean_activations, "known_classes", lambda: only_norms)
    sink = RecordingSink()
    cfg = TrainingConfig(max_steps=1, batch_size=4, micro_batch_size=4, lean_activations=True)
    train(TrainingRequest(tiny_model_dir, write_chat_file(tmp_path / "train.jsonl", 12), tmp_path / "out", cfg), sink)
    warnings = [(message, data) for level, message, data in sink.events if level == "warn" and data and "not_lean" in data]
    assert len(warnings) == 1
    message, data = warnings[0]
    assert data["not_lean"] == [f"base_model.model.model.layers.{i}.mlp (LlamaMLP)" for i in range(2)]
    assert "lean_activations: 2 modules" in message and "layers.0.mlp (LlamaMLP)" in message


def test_lean_bf16_training_step_matches_peft(tiny_model_dir, tmp_path, tokenizer):
    """bf16 autocast without dropout (the CPU runs peft's dropout in fp32, ours in bf16: a different random
    stream): the loss and the LoRA gradients agree to bf16 precision."""
    rows = load_examples(write_chat_file(tmp_path / "train.jsonl", 12))
    examples, _ = tokenize_examples(tokenizer, rows[:6], max_seq_length=64)
    results = []
    for enabled in (False, True):
        torch.manual_seed(0)
        built = build_model(tiny_model_dir, TrainingConfig(lora_dropout=0.0, lean_activations=enabled, gradient_checkpointing="off"))
        torch.manual_seed(1)
        for name, param in built.model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.1)
        built.model.train()
        loss, n, _ = forward_loss(built.model, collate_packed(examples), built.device, torch.bfloat16, True)
        loss.backward()
        results.append((float(loss) / n, {k: p.grad for k, p in built.model.named_parameters() if p.requires_grad}))
    assert results[1][0] == pytest.approx(results[0][0], rel=2e-3)
    for name, grad in results[0][1].items():
        assert torch.nn.functional.cosine_similarity(results[1][1][name].flatten(), grad.flatten(), dim=0) > 0.99, name


def graph_nodes(tensor):
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


def test_a_4bit_base_runs_inside_the_branch_with_the_same_gradients(tiny_model_dir, tmp_path, tokenizer, monkeypatch):
    """With an NF4 base the branch runs the base layer itself (no bitsandbytes autograd node, no separate sum of
    the two input gradients); loss and every LoRA gradient equal those of the base run outside the branch."""
    rows = load_examples(write_chat_file(tmp_path / "train.jsonl", 12))
    examples, _ = tokenize_examples(tokenizer, rows[:6], max_seq_length=64)
    results = []
    for owned in (True, False):
        if not owned:
            monkeypatch.setattr(lean_activations, "_owns_base", lambda base: False)
        torch.manual_seed(0)
        built = build_model(tiny_model_dir, TrainingConfig(compute_dtype="fp32", lora_dropout=0.1, gradient_checkpointing="off", lean_activations=True))
        torch.manual_seed(1)
        for name, param in built.model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.1)
        built.model.train()
        torch.manual_seed(2)
        loss, n, _ = forward_loss(built.model, collate_packed(examples), built.device, None, True)
        nodes = graph_nodes(loss)
        assert "LoraBranchBackward" in nodes and ("MatMul4BitBackward" in nodes) is not owned, nodes
        loss.backward()
        results.append((float(loss.detach()), {k: p.grad for k, p in built.model.named_parameters() if p.requires_grad}))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for name, grad in results[1][1].items():
        torch.testing.assert_close(results[0][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_branch_fed_by_a_lean_norm_keeps_the_norms_input_not_its_output():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, requires_grad=True)
    weight = torch.randn(16)
    a, b = torch.randn(4, 16, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    grad = torch.randn(2, 5, 8)
    kept = []
    normed = lean_activations.RMSNormFunction.apply(x, weight, 1e-6)
    torch.manual_seed(1)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = lean_activations.LoraBranch.apply(zeros_for(x, b), normed, a, b, 0.1, 1.0)
    assert any(t is x for t in kept) and not any(t is normed for t in kept)
    got = torch.autograd.grad(out, (x, a, b), grad, retain_graph=True)

    copy = normed.clone()  # not a registered norm output: the branch keeps the tensor itself
    torch.manual_seed(1)
    expected = torch.autograd.grad(lean_activations.LoraBranch.apply(zeros_for(x, b), copy, a, b, 0.1, 1.0), (x, a, b), grad)
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g, e)


def test_branch_adds_itself_to_the_base_output_in_one_matmul():
    """The sum with the base layer's output happens in the LoRA matmul (addmm), the scaling in B: the same
    values as peft's ``result + lora_B(lora_A(x)) * scaling``, and the base output's gradient is the incoming one."""
    torch.manual_seed(0)
    x, result = torch.randn(2, 7, 12, requires_grad=True), torch.randn(2, 7, 10, requires_grad=True)
    a, b = torch.randn(4, 12, requires_grad=True), torch.randn(10, 4, requires_grad=True)
    grad = torch.randn(2, 7, 10)
    reference = result + F.linear(F.linear(x, a), b) * 0.75
    expected = torch.autograd.grad(reference, (result, x, a, b), grad)
    out = lean_activations.LoraBranch.apply(result, x, a, b, 0.0, 0.75)
    got = torch.autograd.grad(out, (result, x, a, b), grad)
    torch.testing.assert_close(out, reference)
    assert torch.equal(got[0], grad)
    for g, e in zip(got[1:], expected[1:], strict=True):
        torch.testing.assert_close(g, e)


def test_branches_fed_by_one_norm_rebuild_its_output_once():
    """q, k and v (or gate and up) read one norm output: backward rebuilds it once for the three, with the
    gradients of three separate rebuilds, and holds nothing once the last branch is done."""
    import dataclasses

    torch.manual_seed(0)
    x = torch.randn(2, 6, 16, requires_grad=True)
    weight = torch.randn(16)
    adapters = [(torch.randn(4, 16, requires_grad=True), torch.randn(n, 4, requires_grad=True)) for n in (16, 8, 8)]
    grads = [torch.randn(2, 6, n) for n in (16, 8, 8)]
    params = [x] + [t for pair in adapters for t in pair]
    rebuilds = []
    counting = dataclasses.replace(lean_activations.EAGER, normed=lambda *args: rebuilds.append(1) or lean_activations.EAGER.normed(*args))

    def run(shared):
        normed = lean_activations.RMSNormFunction.apply(x, weight, 1e-6, counting)
        torch.manual_seed(1)
        outs = [lean_activations.LoraBranch.apply(zeros_for(x, b), normed if shared else normed.clone(), a, b, 0.1, 2.0) for a, b in adapters]
        return normed, torch.autograd.grad(outs, params, grads)

    normed, got = run(shared=True)
    assert len(rebuilds) == 1
    source, _kept = lean_activations._source_of(normed)
    assert source.tensor is None and source.users == 0
    _normed, expected = run(shared=False)  # clones: each branch keeps its own input, nothing rebuilt
    assert len(rebuilds) == 1
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g, e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_kernels_match_the_eager_math(dtype):
    """torch.compile's kernels (C++ on the CPU, Triton on CUDA) compute what the eager math does, to the rounding of the
    dtype (they keep fp32 between operations where eager rounds), and the compiled rebuild of a norm output is
    bitwise the compiled forward's output (the rebuilt LoRA input is the one the forward used)."""
    fused, eager = lean_activations.compiled_kernels(), lean_activations.EAGER
    torch.manual_seed(0)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # Triton kernels on a GPU machine
    for tokens in (37, 64):  # dynamic shapes: one compilation for both
        x, grad = torch.randn(1, tokens, 96, dtype=dtype, device=device), torch.randn(1, tokens, 96, dtype=dtype, device=device)
        weight = (1 + 0.1 * torch.randn(96, device=device)).to(dtype)
        out, rstd = fused.rms_forward(x, weight, 1e-5)
        expected_out, expected_rstd = eager.rms_forward(x, weight, 1e-5)
        torch.testing.assert_close(out, expected_out, **tol)
        torch.testing.assert_close(rstd, expected_rstd, rtol=1e-5, atol=1e-6)
        assert torch.equal(fused.normed(x, weight, rstd), out)
        torch.testing.assert_close(fused.rms_backward(grad, x, weight, rstd), eager.rms_backward(grad, x, weight, rstd), **tol)
        gate, up, grad_h = (torch.randn(1, tokens, 160, dtype=dtype, device=device) for _ in range(3))
        torch.testing.assert_close(fused.swiglu(gate, up), eager.swiglu(gate, up), **tol)
        for g, e in zip(fused.swiglu_backward(grad_h, gate, up), eager.swiglu_backward(grad_h, gate, up), strict=True):
            torch.testing.assert_close(g, e, **tol)
    assert lean_activations.fused_fallbacks() == []


def test_a_kernel_that_does_not_compile_runs_eagerly(caplog):
    def data_dependent(x):  # a Python branch on a tensor's value: fullgraph compilation refuses it
        return x * 2 if float(x.sum()) > 0 else x * 3

    kernel = lean_activations._Compiled(data_dependent)
    x = torch.ones(4)
    with caplog.at_level("WARNING", logger="worker.training.lean_activations"):
        assert torch.equal(kernel(x), x * 2)
    assert kernel.failed and "compiling data_dependent failed" in caplog.text
    assert torch.equal(kernel(-x), -x * 3)  # eager from then on


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's fused dropout kernel (a GPU run checks it)")
def test_mask_replay_on_cuda_in_bf16_with_a_rebuilt_input():
    """On CUDA the mask comes from the fused dropout kernel (philox); a rebuilt input is a new tensor. The replay
    must still give nn.Dropout's mask: compare with peft's path (dropout output kept) on the same generator state."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    x = torch.randn(1, 300, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(64, device=device, dtype=torch.bfloat16)
    a = torch.randn(8, 64, device=device, requires_grad=True)
    b = torch.randn(32, 8, device=device, requires_grad=True)
    grad = torch.randn(1, 300, 32, device=device, dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        normed = lean_activations.RMSNormFunction.apply(x, weight, 1e-6)
        torch.cuda.manual_seed(5)
        out = lean_activations.LoraBranch.apply(zeros_for(normed, b, torch.bfloat16), normed, a, b, 0.1, 2.0)
        got = torch.autograd.grad(out, (x, a, b), grad, retain_graph=True)
        torch.cuda.manual_seed(5)
        reference = F.linear(F.linear(torch.nn.Dropout(0.1)(normed), a), b) * 2.0
        expected = torch.autograd.grad(reference, (x, a, b), grad)
    torch.testing.assert_close(out, reference, rtol=1e-2, atol=1e-2)  # the sum fused into the matmul: one rounding
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=2e-2, atol=2e-2)
