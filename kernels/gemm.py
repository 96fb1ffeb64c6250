"""GEMM throughput: the device's achievable matmul peak, which MFU can be quoted against."""

from __future__ import annotations

import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def gemm_tflops(precision: str, device: str = "cpu", n: int | None = None, repeats: int = 10) -> dict:
    """Best-of-`repeats` TFLOP/s of an n×n by n×n matmul (2·n³ FLOPs each).

    The best repeat, not the mean: this is the achievable peak, the ceiling MFU is
    quoted against. On CUDA it is timed with events around a batch of matmuls; on CPU with
    perf_counter, using the calling thread's torch thread count (a rank's share of cores).
    """
    dtype = DTYPES[precision]
    n = n or (8192 if device.startswith("cuda") else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    flops = 2.0 * n**3
    inner = 10 if device.startswith("cuda") else 1
    for _ in range(2):  # warmup (kernel selection, page faults)
        a @ b
    best = float("inf")
    for _ in range(repeats):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                a @ b
            end.record()
            end.synchronize()
            t = start.elapsed_time(end) / 1000 / inner
        else:
            s = time.perf_counter()
            a @ b
            t = time.perf_counter() - s
        best = min(best, t)
    return {"kernel": "gemm", "precision": precision, "n": n, "seconds": best, "tflops": flops / best / 1e12,
            "threads": torch.get_num_threads(), "device": device}
