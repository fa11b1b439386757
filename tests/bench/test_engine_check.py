"""The GPU engine check runs on the CPU with a tiny shape, so that the script cannot rot between GPU runs."""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))


def test_engine_check_runs_on_cpu(tmp_path, demo_model_dir):
    import engine_check

    out = tmp_path / "result.json"
    rc = engine_check.main(["--shape", "tiny", "--tokenizer", str(demo_model_dir), "--seq", "128", "--steps", "2", "--warm", "1",
                            "--workdir", str(tmp_path), "--out", str(out)])
    record = json.loads(out.read_text())
    assert rc == 0, record["results"]
    assert record["card"].startswith("cpu") and record["versions"]["bitsandbytes"]
    (engine,) = record["results"]
    assert engine["status"] == "succeeded" and engine["steps_timed"] == 2
    assert engine["tokens_per_s"] > 0 and engine["peak_mem_gb"] > 0 and engine["estimate_total_gb"] > 0
    assert len(engine["losses"]) == 3 and engine["last_loss"] < engine["first_loss"], engine
