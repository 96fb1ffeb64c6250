"""The measured matmul peak that `mfu_vs_measured_peak` is quoted against.

It measures what the model really runs: the GEMMs of its linear layers at the trial's dtype
and shapes (one micro-batch of tokens), forward (x·Wᵀ) and both backward products (dY·W for
the input gradient, dYᵀ·X for the weight gradient), each through the paths torch offers
(`torch.mm` and `F.linear`, which on a CPU take different oneDNN/BLAS kernels: on an AVX2-only
CPU bf16 `F.linear` ran 3× faster than `a @ b`), and keeps the best rate of any of them. A
square `a @ b` probe is not that path: it reported MFU of 4.1-4.7 "of the peak" on such a CPU.

A matmul of (m×k)·(k×n) is 2·m·k·n FLOPs. The peak is measured once per device, dtype,
thread count, shape set and local rank, and cached in `$LLMBENCH_CACHE/peaks` (default
~/.cache/llmbench/peaks), one JSON file per key, written atomically; later trials and sweeps
read it back instead of measuring. Measuring stops after a time budget (2 s by default), the
largest GEMMs first. On a cache miss every rank of a trial measures at once, as they compute
at once in training (sharing the host's memory bandwidth on a CPU), and a trial quotes the
minimum over its ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

CACHE_VERSION = 1


@dataclass
class Peak:
    tflops: float
    source: str                 # "measured" or "cache"
    probe_s: float              # seconds this call spent (reading the cache or measuring)
    best_gemm: str = ""         # which GEMM and path reached the peak
    key: dict = field(default_factory=dict)
    per_gemm: dict = field(default_factory=dict)  # GEMM → best TFLOP/s

    def to_dict(self) -> dict:
        return asdict(self)


def cache_root() -> Path:
    """$LLMBENCH_CACHE, else ~/.cache/llmbench (shared with trainedmodel's weights)."""
    return Path(os.environ.get("LLMBENCH_CACHE") or Path.home() / ".cache" / "llmbench")


def linear_gemms(shape: dict, intermediate: int, tokens: int) -> dict[str, tuple[int, int, int]]:
    """(m, k, n) of every distinct GEMM a training step of the model's linear layers runs, for
    one micro-batch of `tokens`: the forward x[m,k]·Wᵀ and, from autograd's rules for a linear
    layer, the input gradient dY[m,n]·W[n,k] and the weight gradient dYᵀ[n,m]·X[m,k]."""
    from ..kernels.gemm import model_gemm_shapes

    out: dict[str, tuple[int, int, int]] = {}
    for name, (m, k, n) in model_gemm_shapes(shape, intermediate, tokens).items():
        for kind, dims in (("fwd", (m, k, n)), ("dgrad", (m, n, k)), ("wgrad", (n, m, k))):
            if dims not in out.values():
                out[f"{name}.{kind}"] = dims
    return out


def _key(gemms: dict, dtype: str, device: str, device_name: str) -> dict:
    key = {"version": CACHE_VERSION, "device": device.split(":")[0], "device_name": device_name, "dtype": dtype,
           "threads": torch.get_num_threads(), "torch": torch.__version__,
           "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "isa_env": {k: os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
                       if os.environ.get(k)},
           # each local rank keeps its own value (a trial takes the minimum over ranks, every time)
           "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
           "gemms": sorted(set(gemms.values()))}
    return json.loads(json.dumps(key))  # as it reads back from the cache file (tuples become lists)


def _cache_file(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_root() / "peaks" / f"{key['device']}-{key['dtype']}-t{key['threads']}-r{key['local_rank']}-{digest}.json"


def _seconds(fn, device: str) -> float:
    """Wall seconds of one call, the device synchronised at both edges."""
    from ..device import sync

    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def _operands(m: int, k: int, n: int, dtype: torch.dtype, device: str):
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(m, k, device=device, dtype=dtype, generator=g)
    b = torch.randn(k, n, device=device, dtype=dtype, generator=g)
    bt = b.t().contiguous()  # the weight as nn.Linear stores it: [out, in]
    return {"mm": lambda: torch.mm(a, b), "linear": lambda: F.linear(a, bt)}


def _best_rate(m: int, k: int, n: int, dtype: torch.dtype, device: str, repeats: int, budget_s: float
               ) -> tuple[float, str]:
    """Best TFLOP/s of A[m,k]·B[k,n] over torch's paths. The faster path is picked on a slice
    of at most 64 rows (cheap even where a path is emulated), then timed at full size: one
    warmup call, then up to `repeats` calls while within `budget_s`; the best call counts,
    since this is a ceiling."""
    small = _operands(min(m, 64), k, n, dtype, device)
    first = {}
    for name, fn in small.items():
        fn()
        first[name] = _seconds(fn, device)
    path = min(first, key=first.get)
    fn = _operands(m, k, n, dtype, device)[path]
    t0 = time.perf_counter()
    fn()
    times = [_seconds(fn, device)]
    while len(times) < repeats and time.perf_counter() - t0 < budget_s:
        times.append(_seconds(fn, device))
    return 2.0 * m * k * n / min(times) / 1e12, path


def measure_peak(gemms: dict[str, tuple[int, int, int]], dtype: str, device: str, repeats: int = 5,
                 budget_s: float = 2.0) -> dict:
    """Measure now: the GEMMs from the most FLOPs down (the large ones set the peak), each one's
    best rate, until `budget_s` is spent (at least one GEMM is measured)."""
    from ..device import DTYPES

    per = {}
    t0 = time.perf_counter()
    for name, (m, k, n) in sorted(gemms.items(), key=lambda kv: -kv[1][0] * kv[1][1] * kv[1][2]):
        left = budget_s - (time.perf_counter() - t0)
        if per and left <= 0:
            break
        tflops, path = _best_rate(m, k, n, DTYPES[dtype], device, repeats, max(left, 0.0) / 2)
        per[f"{name}:{path}"] = tflops
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # the operands' blocks go back before the trial's memory window
    best = max(per, key=per.get)
    return {"tflops": per[best], "best_gemm": best, "per_gemm": per, "gemms_measured": len(per), "gemms": len(gemms)}


def measured_peak(gemms: dict[str, tuple[int, int, int]], dtype: str, device: str = "cpu",
                  device_name: str = "") -> Peak:
    """The cached peak for these GEMMs on this device, dtype and thread count, measured on a miss."""
    t0 = time.perf_counter()
    key = _key(gemms, dtype, device, device_name)
    path = _cache_file(key)
    try:
        hit = json.loads(path.read_text())
        if hit.get("key") == key:
            return Peak(hit["tflops"], "cache", time.perf_counter() - t0, hit["best_gemm"], key, hit["per_gemm"])
    except (OSError, ValueError, KeyError):
        pass  # absent or damaged: measure and rewrite
    got = measure_peak(gemms, dtype, device)
    peak = Peak(got["tflops"], "measured", time.perf_counter() - t0, got["best_gemm"], key, got["per_gemm"])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")  # unique, also across hosts
        with os.fdopen(fd, "w") as f:
            json.dump({"key": key, "tflops": peak.tflops, "best_gemm": peak.best_gemm, "per_gemm": peak.per_gemm,
                       "gemms_measured": got["gemms_measured"], "gemms": got["gemms"], "measured_s": peak.probe_s,
                       "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}, f, indent=1)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one
    except OSError:
        pass  # a read-only cache costs a re-measurement next time, nothing else
    return peak


def model_peak(config, micro_batch: int, seq_len: int, dtype: str, device: str = "cpu", device_name: str = "") -> Peak:
    """The measured peak at a transformers config's linear-layer GEMMs for one micro-batch."""
    from ..models import config_shape, intermediate_size

    return measured_peak(linear_gemms(config_shape(config), intermediate_size(config), micro_batch * seq_len), dtype,
                         device, device_name)
