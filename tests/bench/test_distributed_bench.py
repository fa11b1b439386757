"""bench/distributed.py at a tiny size on the CPU (gloo, 2 processes), so that the GPU check cannot rot."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

pytestmark = pytest.mark.bench  # make test-bench


def test_one_and_two_processes_train_the_same_losses_and_the_record_has_every_check(tiny_model_dir, tmp_path):
    import distributed

    out = tmp_path / "record.json"
    rc = distributed.main(["--model", str(tiny_model_dir), "--gpus", "2", "--steps", "3", "--batch-size", "4", "--micro-batch-size", "1",
                           "--max-seq-length", "64", "--hyperparameters", '{"compute_dtype": "fp32"}', "--work", str(tmp_path / "work"),
                           "--out", str(out)])
    record = json.loads(out.read_text())
    assert rc == 0, record["checks"]
    assert record["backend"] == "gloo" and record["processes"] == 2 and len(record["losses_parallel"]) == 3
    assert record["max_loss_difference"] <= 1e-6 and record["checks"]["losses_match"]
    assert record["peak_vs_estimate"] is None and record["checks"]["peak_within_10pct"] is None  # CUDA only
    assert record["estimate_per_rank_bytes"] > 0 and record["tokens_per_second_one"] > 0 and record["scaling_efficiency"] > 0
    assert record["versions"]["torch"]
