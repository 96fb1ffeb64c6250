"""GEMM throughput at the model's shapes and at square sizes: the device's achievable peak.

A matmul of (m×k)·(k×n) is 2·m·k·n FLOPs (one multiply and one add per term). The best
square size's TFLOP/s is the "achievable peak" that MFU can be quoted against beside the
datasheet's (llmbench.collect.flops.PEAK_TFLOPS).
"""

from __future__ import annotations

import torch

from .timing import DTYPES, KernelResult, guarded, measure


def gemm_tflops(precision: str, device: str = "cpu", n: int | None = None, repeats: int = 10) -> dict:
    """Best-of-`repeats` TFLOP/s of an n×n by n×n matmul (2·n³ FLOPs each).

    The best repeat, not the mean: this is the achievable peak, the ceiling MFU is
    quoted against. On CUDA it is timed with events around a batch of matmuls; on CPU with
    perf_counter, using the calling thread's torch thread count (a rank's share of cores).
    Used inside every trial (llmbench.trial.measured_peak_tflops); `llmbench kernels`
    measures the same at many shapes.
    """
    dtype = DTYPES[precision]
    n = n or (8192 if device.startswith("cuda") else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    flops = 2.0 * n**3
    best = min(measure(lambda: a @ b, device, repeats, warmup=2)[0])
    return {"kernel": "gemm", "precision": precision, "n": n, "seconds": best, "tflops": flops / best / 1e12,
            "threads": torch.get_num_threads(), "device": device}


def model_gemm_shapes(shape: dict, intermediate: int, tokens: int) -> dict[str, tuple[int, int, int]]:
    """(m, k, n) of the transformer's matmuls for `tokens` tokens (one micro-batch):
    fused QKV projection, attention output, the MLP's up (and gate) and down projections,
    and the LM head."""
    h, q, kv = shape["hidden_size"], shape["head_dim"], shape["n_kv_heads"]
    qkv = shape["n_heads"] * q + 2 * kv * q
    return {"qkv": (tokens, h, qkv), "attn_out": (tokens, shape["n_heads"] * q, h), "mlp_up": (tokens, h, intermediate),
            "mlp_down": (tokens, intermediate, h), "lm_head": (tokens, h, shape["vocab_size"])}


def bench_gemm(name: str, m: int, k: int, n: int, precision: str, device: str, repeats: int,
               peak_tflops: float | None = None) -> KernelResult:
    r = KernelResult("gemm", f"{name}-{precision}", precision, backend="torch.matmul", op="fwd",
                     shape=f"{m}x{k} @ {k}x{n}", device=device, flops=2.0 * m * k * n)

    def run(r: KernelResult) -> None:
        dtype = DTYPES[precision]
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        ref = a.float() @ b.float()
        r.max_abs_err = (a @ b).float().sub(ref).abs().max().item()  # against an fp32 matmul
        r.samples_s, r.inner = measure(lambda: a @ b, device, repeats)
        if peak_tflops:
            r.extra["datasheet_peak_tflops"] = peak_tflops

    return guarded(r, run)
