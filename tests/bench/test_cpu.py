"""The CPU bench at a tiny size, so that the script cannot rot between recorded runs (`make test-bench`)."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))


@pytest.mark.bench  # the bench's CPU smoke run belongs with `make test-bench`, not make test's 15 minutes
def test_cpu_bench_times_the_plain_path_and_the_engine_on_the_same_tokens(demo_model_dir, tmp_path):
    import cpu

    out = tmp_path / "cpu.json"
    rc = cpu.main(["--model", str(demo_model_dir), "--examples", "10", "--batch-size", "2", "--max-seq-length", "48",
                   "--warm", "1", "--steps", "1", "--out", str(out)])
    record = json.loads(out.read_text())
    assert rc == 0
    assert record["cpu"] and record["cpu_capability"] and record["compute_dtype"] in ("bf16", "fp32")
    assert record["versions"]["bitsandbytes"] and record["versions"]["torch"]
    plain, engine = record["results"]
    assert plain["variant"].startswith("plain") and engine["variant"] == "engine defaults"
    assert plain["useful_tokens"] == engine["useful_tokens"] > 0  # the same examples, counted the same way
    for r in (plain, engine):
        assert r["tokens_per_second"] > 0 and all(0 < loss < 20 for loss in r["losses"]), r
    assert f"compute_dtype={record['compute_dtype']}" in engine["model_loaded"]
    assert record["engine_vs_plain"] == round(engine["tokens_per_second"] / plain["tokens_per_second"], 2)
