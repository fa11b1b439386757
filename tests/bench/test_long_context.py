"""The long-context GPU check runs on the CPU with a tiny shape, so that the script cannot rot between GPU runs."""

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench  # make test-bench

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))


def test_long_context_check_runs_on_cpu(tmp_path):
    import long_context

    out = tmp_path / "long.json"
    assert long_context.main(["--tiny", "--steps", "1", "--low", "64", "--resolution", "128", "--time-limit", "120", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["card"] == "cpu" and record["longest"] >= 64 and record["probes"][0]["ok"]
    first = record["probes"][0]
    assert first["plan"] == {"offload": 2} and first["sequence_tiling"] is True and first["host_bytes"] in (2 * 64 * 64 * 2, 2 * 64 * 64 * 4)  # two layers' inputs: 64 tokens x 64, bf16 or fp32
    speed = record["speed"]
    assert speed["plain"]["ok"] and speed["offloaded_and_tiled"]["ok"] and speed["ratio"] > 0
    assert speed["plain"]["plan"] == {"on": 2} and speed["offloaded_and_tiled"]["plan"] == {"offload": 2}
