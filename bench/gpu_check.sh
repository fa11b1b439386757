#!/usr/bin/env bash
# The one command of a device run (see docs/performance.md): the perf bench against the standard recipe, then
# the engine's unit tests on CUDA. Expects, in ignored folders carried to the machine: .whl/ (the wheels its
# image lacks: bitsandbytes, pydantic and its dependencies) and .gpu/ (standard_recipe.py, a tokenizer dir).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
timeout "${BENCH_TIMEOUT:-380}" python3 bench/perf.py --baseline .gpu/standard_recipe.py --profile --out "$OUT/perf.json" 2>&1 | tee "$OUT/perf.log"
QLORA_TEST_TOKENIZER=.gpu/tokenizer timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q --maxfail=10 -ra tests/training -m "not slow" -p no:cacheprovider \
  > "$OUT/pytest.log" 2>&1
tail -25 "$OUT/pytest.log"
