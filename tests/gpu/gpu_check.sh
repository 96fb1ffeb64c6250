#!/usr/bin/env bash
# The prepared CUDA check (never run by CI): one short script for a lent GPU machine.
# Usage there, from the repo root, with deepspeed/hjson/pydantic wheels carried in .whl/:
#   bash tests/gpu/gpu_check.sh            # writes evidence to $OUT (or reports/gpu/)
set -uo pipefail
dest=${OUT:-reports/gpu}
mkdir -p "$dest"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/.gpu-src
fi
# Import llmbench from this checkout without installing it (no registry there).
mkdir -p .gpu-src && ln -sfn "$PWD/bench" .gpu-src/llmbench && ln -sfn "$PWD/kernels" bench/kernels 2>/dev/null
ln -sfn "$PWD/suites" bench/suites 2>/dev/null
export PYTHONPATH=${PYTHONPATH:-$PWD/.gpu-src}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$dest/nvidia-smi.csv"
python3 -m llmbench.cli env | tee "$dest/env.txt"
python3 -m llmbench.cli sweep gpu --db "$dest/gpu.db" --out "$dest" --label gpu-evidence 2>&1 | tee "$dest/sweep.log"
python3 -m llmbench.cli results --db "$dest/gpu.db" --format json > "$dest/results.jsonl"
python3 - "$dest/results.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['trial_id']:12} {r['status']:11} tok/s={r['tokens_per_s'] or 0:,.0f} MFU={r['mfu']} "
          f"peak={r['peak_mem_bytes']} scales={r['loss_scales'][:3]} energy_j={r['energy_j']} err={(r['error'] or '')[:80]}")
PY
