"""The transformer's memory-bound and MLP layers, forward and forward+backward:
RMSNorm (the model's own transformers module) against torch's LayerNorm, and the MLP block.

Norms are memory-bound, so they are reported in GB/s of the bytes a forward must move at
least: read x and write y (2·tokens·hidden elements), plus the weight. The MLP is compute
bound: its FLOPs are 2·tokens·hidden·intermediate per projection (three for Llama's SwiGLU
gate/up/down, two for GPT-2's fc/proj), backward twice the forward (Kaplan et al. 2020 §2.1).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..models import intermediate_size
from .timing import DTYPES, KernelResult, guarded, measure


def _timed_fwd_bwd(module, x, device, repeats, op):
    if op == "fwd":
        with torch.no_grad():
            return measure(lambda: module(x), device, repeats)
    xg = x.detach().requires_grad_(True)
    grad = torch.ones_like(module(xg))

    def step():
        module(xg).backward(grad)
        xg.grad = None
        module.zero_grad(set_to_none=True)

    return measure(step, device, repeats)


def norm_modules(config, hidden: int) -> dict:
    mods = {"layernorm": lambda: torch.nn.LayerNorm(hidden, eps=1e-5)}
    if config.model_type == "llama":
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        mods["rmsnorm"] = lambda: LlamaRMSNorm(hidden, eps=getattr(config, "rms_norm_eps", 1e-6))
    elif hasattr(torch.nn, "RMSNorm"):
        mods["rmsnorm"] = lambda: torch.nn.RMSNorm(hidden, eps=1e-6)
    return mods


def bench_norms(config, hidden: int, tokens: int, precision: str, device: str, repeats: int) -> Iterator[KernelResult]:
    dtype = DTYPES[precision]
    elem = torch.tensor([], dtype=dtype).element_size()
    for name, make in norm_modules(config, hidden).items():
        for op in ("fwd", "fwd+bwd"):
            moved = (2 * tokens * hidden + hidden) * elem * (1 if op == "fwd" else 2.5)  # bwd: read x, dy, w; write dx
            r = KernelResult("norm", f"{name}-{op}-{precision}", precision, backend=name, op=op,
                             shape=f"{tokens}x{hidden}", device=device, bytes=moved)

            def run(r: KernelResult, make=make, op=op) -> None:
                m = make().to(device=device, dtype=dtype)
                x = torch.randn(tokens, hidden, device=device, dtype=dtype)
                r.samples_s, r.inner = _timed_fwd_bwd(m, x, device, repeats, op)

            yield guarded(r, run)


def mlp_flops(config, hidden: int, intermediate: int, tokens: int, op: str) -> float:
    projections = 3 if config.model_type == "llama" else 2
    fwd = 2.0 * tokens * hidden * intermediate * projections
    return fwd if op == "fwd" else 3 * fwd


def mlp_module(config):
    if config.model_type == "llama":
        from transformers.models.llama.modeling_llama import LlamaMLP

        return LlamaMLP(config)
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    return GPT2MLP(intermediate_size(config), config)


def bench_mlp(config, hidden: int, intermediate: int, tokens: int, precision: str, device: str,
              repeats: int) -> Iterator[KernelResult]:
    dtype = DTYPES[precision]
    for op in ("fwd", "fwd+bwd"):
        r = KernelResult("mlp", f"mlp-{op}-{precision}", precision, backend=config.model_type, op=op,
                         shape=f"{tokens}x{hidden}→{intermediate}", device=device,
                         flops=mlp_flops(config, hidden, intermediate, tokens, op))

        def run(r: KernelResult, op=op) -> None:
            m = mlp_module(config).to(device=device, dtype=dtype)
            m.train(op != "fwd")
            x = torch.randn(tokens, hidden, device=device, dtype=dtype)
            r.samples_s, r.inner = _timed_fwd_bwd(m, x, device, repeats, op)

        yield guarded(r, run)
