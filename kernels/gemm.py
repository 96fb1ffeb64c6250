"""GEMM throughput at the model's shapes and at square sizes: the device's achievable peak.

A matmul of (m×k)·(k×n) is 2·m·k·n FLOPs (one multiply and one add per term). The trials'
measured peak is llmbench.collect.peak (the model's own linear-layer GEMMs, best path);
these cases show the same device at other shapes, beside the datasheet's peak
(llmbench.collect.flops.PEAK_TFLOPS).
"""

from __future__ import annotations

import torch

from .timing import DTYPES, KernelResult, guarded, measure


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
