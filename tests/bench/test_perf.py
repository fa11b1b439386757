"""The GPU performance bench runs on the CPU with tiny shapes, so that the script cannot rot between GPU runs."""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))


def test_perf_bench_runs_on_cpu(tmp_path):
    import perf

    out = tmp_path / "result.json"
    rc = perf.main(["--tiny", "--steps", "2", "--warm", "1", "--out", str(out)])
    record = json.loads(out.read_text())
    assert rc == 0, record["results"]
    assert record["card"].startswith("cpu") and record["versions"]["bitsandbytes"]
    assert record["loss_guard"]["ok"] and record["loss_guard"]["relative_difference"] < 1e-2
    results = record["results"]
    assert len(results) == 7, list(results)
    for name, r in results.items():
        assert "error" not in r, (name, r)
        assert r["steps_timed"] == 2 and r["tokens_per_s"] > 0 and r["useful_tokens_per_s"] > 0, name
        assert r["estimate_gib"] > 0 and sum(r["plan"].values()) == 2, name
        assert all(loss == loss and 0 < loss < 20 for loss in r["losses"]), (name, r["losses"])  # finite, sane
    assert results["engine, fixed: + selective checkpointing"]["plan"] == {"off": 0, "selective": 2, "on": 0}
    # packing: a realistic step holds several examples of the lengths file in one row, all of them useful tokens
    packed = results["engine, realistic, packed"]
    assert packed["useful_tokens_per_s"] > 0 and record["realistic_mean_length"] <= 128


def test_padded_batches_and_packing_count_useful_tokens():
    import perf

    examples = perf.random_examples([3, 5, 2, 7], vocab=50, seed=0)
    fixed = perf.padded_batches(examples, 2, 8)
    assert [b["useful"] for b in fixed] == [8, 9] and fixed[0]["input_ids"].shape == (2, 8)
    assert (fixed[0]["labels"][0, 3:] == -100).all() and fixed[0]["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    longest = perf.padded_batches(examples, 2, None)
    assert [tuple(b["input_ids"].shape) for b in longest] == [(2, 5), (2, 7)]
    groups = perf.packed_groups(examples, 8)
    assert [[len(e.input_ids) for e in g] for g in groups] == [[3, 5], [2], [7]]
