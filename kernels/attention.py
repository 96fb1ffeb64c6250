"""Attention at the model's shapes: each PyTorch scaled-dot-product-attention backend
against the eager formula softmax(QKᵀ/√d + causal mask)·V, forward and forward+backward.

FLOPs as FlashAttention's own benchmark counts them (Dao et al., flash-attention
`benchmarks/benchmark_flash_attention.py`): forward 4·b·h·s²·d, halved for a causal mask;
backward 2.5× the forward, so forward+backward is 3.5× the forward.
"""

from __future__ import annotations

from collections.abc import Iterator

import math

import torch
import torch.nn.functional as F

from .timing import DTYPES, KernelResult, guarded, measure

BACKENDS = ("MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")


def attention_flops(batch: int, heads: int, seq: int, head_dim: int, causal: bool, op: str) -> float:
    fwd = 4.0 * batch * heads * seq * seq * head_dim / (2 if causal else 1)
    return fwd if op == "fwd" else 3.5 * fwd


def eager_attention(q, k, v, causal: bool = True):
    """The textbook formula, materialising the s×s score matrix."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if causal:
        s = q.shape[-2]
        mask = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def _inputs(batch, heads, seq, head_dim, dtype, device, grad):
    g = torch.Generator(device="cpu").manual_seed(0)
    return [torch.randn(batch, heads, seq, head_dim, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)
            for _ in range(3)]


def bench_attention(batch: int, heads: int, seq: int, head_dim: int, precision: str, device: str, repeats: int,
                    causal: bool = True) -> Iterator[KernelResult]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = DTYPES[precision]
    shape = f"b{batch} h{heads} s{seq} d{head_dim}"
    impls = [("eager", None)] + [(f"sdpa-{b.lower()}", getattr(SDPBackend, b)) for b in BACKENDS if hasattr(SDPBackend, b)]
    q32 = [t.float() for t in _inputs(batch, heads, seq, head_dim, dtype, device, False)]
    reference = eager_attention(*q32, causal=causal)
    for name, backend in impls:
        def call(q, k, v, backend=backend):
            if backend is None:
                return eager_attention(q, k, v, causal)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        for op in ("fwd", "fwd+bwd"):
            r = KernelResult("attention", f"{name}-{op}-{precision}", precision, backend=name, op=op, shape=shape,
                             device=device, flops=attention_flops(batch, heads, seq, head_dim, causal, op))

            def run(r: KernelResult, op=op, call=call) -> None:
                q, k, v = _inputs(batch, heads, seq, head_dim, dtype, device, op != "fwd")
                if op == "fwd":
                    with torch.no_grad():
                        r.max_abs_err = call(q, k, v).float().sub(reference).abs().max().item()
                        r.samples_s, r.inner = measure(lambda: call(q, k, v), device, repeats)
                else:
                    grad = torch.ones(batch, heads, seq, head_dim, device=device, dtype=dtype)

                    def step():
                        call(q, k, v).backward(grad)
                        q.grad = k.grad = v.grad = None

                    r.samples_s, r.inner = measure(step, device, repeats)

            yield guarded(r, run)
