"""bench/traffic.py runs (tiny widths) and counts what each variant moves: lean less than peft, fused less still."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench  # make test-bench

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))


def test_traffic_counts_each_variant(tmp_path):
    import traffic

    out = tmp_path / "traffic.json"
    assert traffic.main(["--tiny", "--tokens", "32", "--kernels", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    results = record["results"]
    assert record["card"].startswith("cpu") and record["versions"]["torch"] and record["tokens"] == 32
    peft, lean, fused = (results[v]["bytes_per_token"] for v in ("peft", "lean", "lean+fused"))
    assert peft > lean > fused > 0
    # peft keeps its dropout masks through bernoulli_ (CPU), lean replays native_dropout; fused runs the kernels
    assert "bernoulli_" in results["peft"]["top"] and "native_dropout" in results["lean"]["top"]
    assert not any(k.startswith("fused:") for k in results["lean"]["top"])
    assert any(k.startswith("fused:") for k in results["lean+fused"]["top"])
    # per token: the counts at T and 2T tokens differ by T times the reported figure, never negative
    assert all(v >= 0 for r in results.values() for v in r["top"].values())
    kernels = record["kernel_times"]
    assert set(kernels) == {"rms_forward", "rms_backward", "normed", "swiglu", "swiglu_backward"}
    assert all(row["compiled"] and row["eager_ms"] > 0 and row["compiled_ms"] > 0 for row in kernels.values())
