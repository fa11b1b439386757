"""The GPU performance bench runs on the CPU with tiny shapes, so that the script cannot rot between GPU runs."""

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench  # make test-bench

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))


def test_perf_bench_runs_on_cpu(tmp_path, monkeypatch):
    import gc
    import weakref

    import perf

    built = []  # weak references to every base the bench builds

    def build_base(shape, device, real=perf.build_base):
        gc.collect()
        # Each model must be gone before the next is built: on the H200 the 8B base stayed alive (a closure's
        # default argument) and its 5.31 GiB were counted in the 70B case's peak.
        assert [ref() for ref in built] == [None] * len(built), "an earlier base is still alive"
        out = real(shape, device)
        built.append(weakref.ref(out[0]))
        return out

    monkeypatch.setattr(perf, "build_base", build_base)
    out = tmp_path / "result.json"
    rc = perf.main(["--tiny", "--steps", "2", "--warm", "1", "--out", str(out)])
    record = json.loads(out.read_text())
    assert rc == 0, record["results"]
    assert len(built) == 2  # the engine's base and the big one
    assert record["card"].startswith("cpu") and record["versions"]["bitsandbytes"]
    assert record["loss_guard"]["ok"] and record["loss_guard"]["relative_difference"] < 1e-2
    results = record["results"]
    stems = [Path(path).stem for path in record["lengths_files"]]
    assert "sharegpt_v3" in stems
    assert len(results) == 7 + len(stems) + 1, list(results)
    for name, r in results.items():
        assert "error" not in r, (name, r)
        assert r["steps_timed"] == 2 and r["tokens_per_s"] > 0 and r["useful_tokens_per_s"] > 0, name
        assert r["estimate_gib"] > 0 and sum(r["plan"].values()) == 2, name
        assert all(loss == loss and 0 < loss < 20 for loss in r["losses"]), (name, r["losses"])  # finite, sane
    assert results["engine, fixed: + lean activations (every layer still checkpointed)"]["plan"] == {"off": 0, "selective": 0, "on": 2}
    lean = [name for name, r in results.items() if r.get("options", {}).get("lean_activations")]
    assert lean and all(any(word in name for word in ("lean", "fused kernels", "sharegpt", "tiny")) for name in lean), lean
    fused = results["engine, fixed: + fused kernels (every layer still checkpointed)"]
    assert fused["fused_kernels_on"] and fused["fused_kernels_failed"] == []  # compiled, not fallen back
    # packing: a realistic step holds several examples of each lengths file in one row, all of them useful tokens
    for stem in stems:
        packed = results[f"engine, {stem}: packed rows of 256"]
        assert packed["useful_tokens_per_s"] > 0 and packed["options"]["micro_batch_tokens"] == 256
        assert 0 < record["realistic_mean_length"][stem] <= 128


def test_padded_batches_and_packing_count_useful_tokens():
    import perf

    examples = perf.random_examples([3, 5, 2, 7], vocab=50, seed=0)
    fixed = perf.padded_batches(examples, 2, 8)
    assert [b["useful"] for b in fixed] == [8, 9] and fixed[0]["input_ids"].shape == (2, 8)
    assert (fixed[0]["labels"][0, 3:] == -100).all() and fixed[0]["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    longest = perf.padded_batches(examples, 2, None)
    assert [tuple(b["input_ids"].shape) for b in longest] == [(2, 5), (2, 7)]
    budget = perf.padded_budget_batches(examples, 10)  # as many as fit 10 positions padded to their longest
    assert [tuple(b["input_ids"].shape) for b in budget] == [(2, 5), (1, 2), (1, 7)]
    budget = perf.padded_budget_batches(perf.random_examples([2, 3, 2, 4, 1, 9], vocab=50, seed=0), 10)
    assert [tuple(b["input_ids"].shape) for b in budget] == [(3, 3), (2, 4), (1, 9)] and [b["useful"] for b in budget] == [7, 5, 9]
    rows = perf.engine_rows(examples, 8)  # the trainer's packer: best fit, longest first
    assert [[len(e.input_ids) for e in row] for row in rows] == [[7], [5, 3], [2]]


def test_profile_says_where_a_steps_time_goes(tmp_path):
    import perf

    out = tmp_path / "result.json"
    try:
        rc = perf.main(["--tiny", "--skip-big", "--steps", "1", "--warm", "1", "--profile", "--out", str(out),
                        "--lengths", str(REPO / "bench" / "lengths" / "sharegpt_v3.txt")])
    finally:
        perf.PROFILE["on"] = False
    record = json.loads(out.read_text())
    assert rc == 0, record["results"]
    profiled = {name: r for name, r in record["results"].items() if "profile" in r}
    assert list(profiled) == [name for name in record["results"] if name.startswith(("engine, fixed: default", "engine, sharegpt_v3:"))]
    assert len(profiled) == 2
    for name, r in profiled.items():
        prof = r["profile"]
        assert prof["wall_ms"] > 0 and 0 < prof["busy_ms"] and prof["top"], name
        assert sum(prof["by_kind_ms"].values()) == pytest.approx(prof["busy_ms"], abs=0.5), name
        assert prof["by_kind_ms"].get("matmul", 0) > 0, (name, prof["by_kind_ms"])  # the CPU's aten::mm/addmm/bmm


def test_kernel_kinds():
    import perf

    assert perf.kernel_kind("flash_fwd_kernel<...>") == "attention"
    assert perf.kernel_kind("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(...)") == "4-bit dequantize"
    assert perf.kernel_kind("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64") == "matmul"
    assert perf.kernel_kind("void kOptimizer32bit2State<...>") == "optimizer"
    assert perf.kernel_kind("vectorized_elementwise_kernel<4, silu>") == "other (elementwise, norms, copies)"
    assert perf.kernel_kind("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0") == "compiled (fused_kernels)"
