"""The routes bench runs at a tiny size (make test-bench), so that the script cannot rot between recorded runs."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

pytestmark = pytest.mark.bench  # make test-bench


def test_routes_bench_trains_each_route_and_a_given_base_directory(tiny_model_dir, tmp_path):
    import routes

    out = tmp_path / "routes.json"
    rc = routes.main(["--model", str(tiny_model_dir), "--routes", "4bit,hqq,none", "--base", f"fp4={tiny_model_dir},quant_type=fp4,double_quant=false",
                      "--examples", "10", "--batch-size", "2", "--max-seq-length", "48", "--warm", "1", "--steps", "1",
                      "--out", str(out)])
    record = json.loads(out.read_text())
    assert rc == 0, record
    assert record["cpu"] and record["date"] and record["versions"]["hqq"] and record["versions"]["bitsandbytes"]
    by_label = {r["variant"]: r for r in record["results"]}
    assert list(by_label) == ["4bit", "hqq", "none", "fp4"]
    for r in by_label.values():
        assert r["tokens_per_second"] > 0 and r["seconds_per_step"] > 0 and all(0 < loss < 20 for loss in r["losses"]), r
        assert r["peak_rss_bytes"] >= r["rss_after_load_bytes"] > 0 and r["base_weight_bytes"] > 0
        assert f"quantization={r['options']['quantization'] if 'quantization' in r['options'] else '4bit'}" in r["model_loaded"]
    assert by_label["none"]["speed_vs_none"] == 1.0
    # the tiny model is mostly its embeddings, but the quantized linears still make each base smaller than 'none'
    assert by_label["4bit"]["base_weight_bytes"] < by_label["none"]["base_weight_bytes"]
    assert by_label["hqq"]["base_weight_bytes"] < by_label["none"]["base_weight_bytes"]
    assert by_label["fp4"]["options"]["quant_type"] == "fp4" and by_label["fp4"]["options"]["double_quant"] is False
