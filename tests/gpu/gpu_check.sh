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
# Checks that need CUDA (#15): energy is the window's (mean power × window within 15%); the
# breakdown's parts (with the ZeRO-1/2 all-gather) add up to its step within 15%; DeepSpeed
# counts the optimizer steps run; the peak the MFU is quoted against follows fp32_matmul_precision.
python3 - "$dest/results.jsonl" <<'PY' | tee "$dest/checks.txt"
import json, sys
def check(name, ok, detail):
    print(f"CHECK {name}: {'PASS' if ok else 'FAIL'} {detail}")
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["status"] != "ok":
        continue
    t = r["trial_id"]
    tele = [x for x in r["telemetry_per_rank"] if x.get("energy_j") is not None and x.get("power_w_mean")]
    if tele:
        want = sum(x["power_w_mean"] for x in tele) * r["window_s"]
        have = sum(x["energy_j"] for x in tele)
        check(f"{t} energy", abs(have / want - 1) < 0.15, f"{have:.1f} J vs mean power x window {want:.1f} J")
    parts = [r["fwd_s"], r["bwd_s"], r["optimizer_s"], r["allgather_s"] or 0.0]
    if None not in parts and r["breakdown_step_s"]:
        check(f"{t} breakdown", abs(sum(parts) / r["breakdown_step_s"] - 1) < 0.15,
              f"fwd+bwd+opt+allgather {sum(parts):.4f} s vs step {r['breakdown_step_s']:.4f} s (allgather {r['allgather_s']})")
    check(f"{t} global steps", r["ds_global_steps"] == r["warmup_steps"] + r["steps"] + r["breakdown_steps"] + r["comms_steps"],
          f"{r['ds_global_steps']} (fp32 matmul precision {r['fp32_matmul_precision']}, peak {r['peak_tflops']})")
PY
# The memory model on CUDA (#16): each record's prediction against the allocator's peak, and the
# three CUDA constants the planner assumes (context + NCCL = NVML's used memory beyond the
# allocator's reserved peak; reserved-but-unallocated slack), measured instead of assumed.
python3 - "$dest/results.jsonl" <<'PY' | tee -a "$dest/checks.txt"
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["status"] != "ok" or r.get("predicted_peak_bytes") is None:
        continue
    e = r.get("prediction_error") or {}
    m = r["memory_per_rank"][0]
    used = max((x.get("mem_used_bytes_max") or 0) for x in r["telemetry_per_rank"]) if r["telemetry_per_rank"] else 0
    alloc, reserved = m.get("cuda_peak_allocated_bytes") or 0, m.get("cuda_peak_reserved_bytes") or 0
    print(f"CHECK {r['trial_id']} activations predicted: {'PASS' if abs(e.get('activations', 1)) <= 0.10 else 'FAIL'} {e.get('activations')}")
    print(f"CHECK {r['trial_id']} own peak predicted within 20%: {'PASS' if abs(e.get('peak', 1)) <= 0.20 else 'FAIL'} "
          f"{e.get('peak')} (phase {r['predicted_memory']['phase']}); slack reserved/allocated {reserved / max(alloc, 1) - 1:+.1%}; "
          f"context+NCCL (NVML used - reserved) {(used - reserved) / 2**20:.0f} MiB vs assumed 1112 MiB")
    print(f"CHECK {r['trial_id']} allocator peak predicted within -10%..+20%: "
          f"{'PASS' if -0.10 <= e.get('allocated_peak', 1) <= 0.20 else 'FAIL'} {e.get('allocated_peak')}")
PY
# ZeRO-Offload's split on CUDA (#15): ZeRO-2 with and without offload=optimizer (torch's AdamW on
# the host partitions, so no DeepSpeedCPUAdam build): the host part is the tensors on the CPU, the
# device part must fit in the allocator's peak above the trial's start and shrink with offload.
cat > "$dest/offload.yaml" <<'YAML'
name: offload-split
description: ZeRO-2 with and without optimizer offload (GPU evidence for the device/host split).
fixed: {model: 125m, world_size: auto, seq_len: 512, micro_batch: 4, warmup_steps: 2, steps: 6, zero_stage: 2, precision: bf16}
grid:
  offload: [none, optimizer]
YAML
echo '{"zero_force_ds_cpu_optimizer": false, "optimizer": {"type": "AdamW", "params": {"lr": 0.001, "torch_adam": true}}}' \
  > "$dest/offload-base.json"
python3 -m llmbench.cli sweep "$dest/offload.yaml" --base-config "$dest/offload-base.json" --db "$dest/offload.db" \
  --out "$dest" --label gpu-offload 2>&1 | tee "$dest/offload.log"
python3 -m llmbench.cli results --db "$dest/offload.db" --format json > "$dest/offload.jsonl"
python3 - "$dest/offload.jsonl" <<'PY' | tee -a "$dest/checks.txt"
import json, sys
recs = {r["offload"]: r for r in map(json.loads, open(sys.argv[1]))}
for off, r in recs.items():
    own = (r["peak_mem_bytes"] or 0) - (r["peak_mem_baseline_bytes"] or 0)
    print(f"CHECK offload={off} device part within the allocator's peak: {'PASS' if r['status'] == 'ok' and r['model_state_device_bytes'] <= own else 'FAIL'} "
          f"device {r['model_state_device_bytes']} host {r['model_state_host_bytes']} own peak {own} {r['status']} {(r['error'] or '')[:80]}")
if {"none", "optimizer"} <= set(recs) and all(r["status"] == "ok" for r in recs.values()):
    a, b = recs["none"], recs["optimizer"]
    print(f"CHECK offload moves states to the host: {'PASS' if b['model_state_host_bytes'] > 0 == a['model_state_host_bytes'] and b['model_state_device_bytes'] < a['model_state_device_bytes'] else 'FAIL'} "
          f"device {a['model_state_device_bytes']} -> {b['model_state_device_bytes']}, host {b['model_state_host_bytes']}")
PY
# Inference quantization on CUDA: the quant suite's inference grid (int8, int4 weight-only, fp8
# weight-only and dynamic; torchao) on the tiny model trained to near the entropy floor. int4-wo
# needs torchao's kernel package (mslk); without it the trial is recorded `unsupported` with
# torchao's message, as on CPU. torchao must be importable there (carry its wheel in .whl/ with the
# others). The training grid of `quant` is covered by the gpu suite's ZeRO runs.
cat > "$dest/quant-inference.yaml" <<'YAML'
name: quant-inference
description: The inference grids of the quant suite, alone (GPU evidence), with 2:4 sparsity (cuSPARSELt).
fixed: {scenario: inference, model: tiny, world_size: 1, zero_stage: 0, precision: bf16, seq_len: 128, micro_batch: 4,
        prompt_len: 64, new_tokens: 32, decode_batches: [1, 4, 16], eval_batches: 16, repeats: 6}
grid:
  quant: [none, int8-wo, int4-wo, int8-dyn, fp8-wo, fp8-dyn]
also:
  - grid: {prune: [magnitude-50], quant: [none, int8-wo]}
  - grid: {prune: ["2:4"], quant: [none, fp8-dyn]}
YAML
LLMBENCH_CACHE="$dest/cache" python3 -m llmbench.cli sweep "$dest/quant-inference.yaml" --db "$dest/quant.db" --out "$dest" \
  --label gpu-quant 2>&1 | tee "$dest/quant.log"
python3 -m llmbench.cli results --db "$dest/quant.db" --format json > "$dest/quant.jsonl"
python3 - "$dest/quant.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['trial_id']:14} {r['status']:11} weights={r['weight_bytes']} ref={r['weight_bytes_reference']} "
          f"ppl={r['perplexity']} prefill_s={r['prefill_latency_s']} decode={r['decode_tokens_per_s']} "
          f"cuda_peak={r['peak_mem_bytes']} err={(r['error'] or '')[:100]}")
PY
# Kernel micro-benchmarks on CUDA: GEMM against the H200 datasheet peak (the achievable peak MFU
# can be quoted against), SDPA backends (flash, efficient, cuDNN) vs eager, optimizer step with
# DeepSpeed's FusedAdam (JIT-built there), NCCL collectives (one GPU: bus bandwidth is 0 by the
# nccl-tests definition, (n-1)/n). Then the gate on the gpu suite run against itself (must pass).
python3 -m llmbench.cli kernels --db "$dest/gpu.db" --out "$dest" --label gpu-kernels 2>&1 | tee "$dest/kernels.log"
run=$(python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute(\"select run_id from runs where suite='gpu' order by created_at\").fetchone()[0])" "$dest/gpu.db")
python3 -m llmbench.cli gate "$run" "$run" --db "$dest/gpu.db" 2>&1 | tee "$dest/gate.log"
# The throughput model on CUDA (#17): its calibration on the gpu suite (one GPU: no collectives, so
# a + b·F; the achieved TFLOP/s it fits beside the datasheet's), and a guided search over the
# suite at two micro-batches, which must finish with a winner (docs/search.md).
python3 -m llmbench.plan.throughput_accuracy "$dest/gpu.db" "$run" 2>&1 | tee "$dest/throughput.txt"
python3 -m llmbench.plan.accuracy "$dest/gpu.db" "$run" 2>&1 | tee "$dest/memory-accuracy.txt"  # docs/plan.md's table, on CUDA
python3 -m llmbench.cli sweep gpu --set micro_batch=4,8 --search --db "$dest/search.db" --out "$dest" 2>&1 | tee "$dest/search.log"
