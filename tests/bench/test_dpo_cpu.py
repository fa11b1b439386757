"""The DPO CPU bench at a tiny size, so that the script cannot rot between recorded runs (make test-bench)."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))


@pytest.mark.bench
def test_dpo_bench_times_trl_and_the_engine_on_the_same_pairs(demo_model_dir, tmp_path):
    import dpo_cpu

    out = tmp_path / "dpo.json"
    rc = dpo_cpu.main(["--model", str(demo_model_dir), "--pairs", "10", "--batch-size", "2", "--prompt-words", "4", "--answer-words", "4",
                       "--max-seq-length", "96", "--warm", "1", "--steps", "1", "--out", str(out)])
    record = json.loads(out.read_text())
    assert rc == 0
    assert record["cpu"] and record["versions"]["trl"] and record["versions"]["bitsandbytes"]
    trl, engine, checkpointed = record["results"]
    assert trl["variant"].startswith("trl DPOTrainer") and engine["variant"].startswith("engine")
    assert checkpointed["variant"] == "engine (method dpo, gradient_checkpointing on)"
    for r in (trl, engine, checkpointed):
        assert r["timed_steps"] == 1 and r["seconds_per_step"] > 0 and r["peak_rss"] >= r["rss_after_load"] > r["rss_after_imports"] > 0, r
        assert len(r["losses"]) == 2 and all(0 < loss < 5 for loss in r["losses"]), r
        assert len(r["load_average_before"]) == 3
    # The same pairs in the same order: the first step's loss is log 2 on both sides (the policy is the reference).
    assert trl["losses"][0] == pytest.approx(0.6931, abs=1e-3) and engine["losses"][0] == pytest.approx(0.6931, abs=1e-3)
    assert engine["reference_pass_seconds"] > 0 and trl["gradient_checkpointing"] is True
    assert record["engine_speedup_vs_trl"] == round(trl["seconds_per_step"] / engine["seconds_per_step"], 2)
    assert checkpointed["losses"] == pytest.approx(engine["losses"], abs=1e-3)  # recomputing changes no number
    assert record["engine_checkpointed_peak_rss_vs_trl"] == round(checkpointed["peak_rss"] / trl["peak_rss"], 2)
