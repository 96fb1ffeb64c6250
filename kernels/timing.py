"""How every kernel micro-benchmark is timed, and the record one case produces.

Warm up first (kernel selection, allocator and page faults), then keep every sample. On
CUDA a sample is a pair of events around `inner` calls, synchronised only at the sample's
edges; on CPU it is `time.perf_counter` around `inner` calls. `inner` is chosen so that a
sample lasts at least `min_sample_s`, since a microsecond-long call timed alone measures the
timer. Medians and a distribution-free 95% interval come from llmbench.collect.stats.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from ..collect.stats import cv, median, median_ci95

from ..device import DTYPES, sync  # noqa: F401  (re-exported for the benches)


def measure(fn: Callable[[], object], device: str, repeats: int = 15, warmup: int = 3,
            min_sample_s: float = 2e-3) -> tuple[list[float], int]:
    """Per-call seconds of `fn`, one value per sample, and the calls per sample."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    once = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, min(1000, int(min_sample_s / once)))
    samples = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1000 / inner)
        else:
            s = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - s) / inner)
    return samples, inner


@dataclass
class KernelResult:
    """One measured case: what ran, its per-call samples, and the work one call does.

    The rates are derived here and nowhere else: TFLOP/s = flops / median seconds, GB/s =
    bytes / median seconds, parameters/s = params / median seconds; collectives add the
    nccl-tests algorithm and bus bandwidth (llmbench.collect.comms.bandwidth).
    """

    bench: str                     # gemm, attention, norm, mlp, optimizer, collective
    case: str                      # a readable id, unique within the bench
    dtype: str
    backend: str = ""              # SDPA backend, optimizer implementation, comm backend
    op: str = ""                   # fwd, fwd+bwd, step, all_reduce, ...
    shape: str = ""
    device: str = "cpu"
    status: str = "ok"             # ok, unsupported, failed
    reason: str | None = None
    samples_s: list[float] = field(default_factory=list)
    inner: int = 1
    flops: float | None = None     # per call
    bytes: float | None = None     # per call: bytes moved (norms) or the collective's buffer S
    params: int | None = None      # per call (optimizer step)
    max_abs_err: float | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        med = median(self.samples_s)
        ci = median_ci95(self.samples_s)
        d.update(median_s=med, ci95_s=list(ci) if ci else None, cv=cv(self.samples_s),
                 tflops=self.flops / med / 1e12 if self.flops and med else None,
                 gbytes_per_s=self.bytes / med / 1e9 if self.bytes and med and self.bench != "collective" else None,
                 params_per_s=self.params / med if self.params and med else None)
        d.update(d.pop("extra"))
        return d


def guarded(result: KernelResult, run: Callable[[KernelResult], None]) -> KernelResult:
    """Run one case; an exception marks it unsupported (no kernel for this device or dtype)
    or failed, with the message, instead of ending the whole benchmark."""
    try:
        run(result)
    except (RuntimeError, NotImplementedError, ImportError, AssertionError, ValueError, TypeError) as e:
        from ..failures import classify

        msg = f"{type(e).__name__}: {e}".strip().splitlines()[0][:300]
        result.status, result.reason = ("unsupported" if classify(e) == "unsupported" else "failed"), msg
        result.samples_s = []
    return result


def interleaved_ratio(fa: Callable[[], object], fb: Callable[[], object], device: str, rounds: int = 7,
                      repeats: int = 5) -> tuple[float, list[float]]:
    """median over rounds of (median time of a) / (median time of b), a and b alternating in
    every round so that a machine that slows down or speeds up affects both alike. Returns
    the median ratio and every round's ratio (their spread is the measurement's noise)."""
    ratios = []
    for i in range(rounds):
        order = (fa, fb) if i % 2 == 0 else (fb, fa)
        got = {id(f): median(measure(f, device, repeats, warmup=1)[0]) for f in order}
        ratios.append(got[id(fa)] / got[id(fb)])
    return median(ratios), ratios
