"""One optimizer step over the model's own parameter tensors, in parameters per second.

torch.optim.AdamW as a for-loop over tensors, with `foreach` (multi-tensor kernels) and
`fused`, against DeepSpeed's own Adam: DeepSpeedCPUAdam on CPU (a JIT-built C++/SIMD op;
the first build takes minutes and is cached in TORCH_EXTENSIONS_DIR) and FusedAdam on CUDA.
Parameters are fp32 as in mixed-precision training's master copy (ZeRO paper §3.1).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .timing import KernelResult, guarded, measure


def make_optimizer(kind: str, params: list, device: str):
    if kind == "adamw-forloop":
        return torch.optim.AdamW(params, lr=1e-4, foreach=False, fused=False)
    if kind == "adamw-foreach":
        return torch.optim.AdamW(params, lr=1e-4, foreach=True)
    if kind == "adamw-fused":
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    if kind == "deepspeed":
        if device.startswith("cuda"):
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(params, lr=1e-4, adam_w_mode=True)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=1e-4, adamw_mode=True)
    raise ValueError(f"unknown optimizer {kind}")


def backend_name(kind: str, device: str) -> str:
    if kind == "deepspeed":
        return "deepspeed.FusedAdam" if device.startswith("cuda") else "deepspeed.DeepSpeedCPUAdam"
    return f"torch.AdamW({kind.split('-')[1]})"


def bench_optimizers(shapes: list[tuple[int, ...]], kinds: list[str], device: str, repeats: int) -> Iterator[KernelResult]:
    n_params = sum(int(torch.Size(s).numel()) for s in shapes)
    for kind in kinds:
        r = KernelResult("optimizer", kind, "fp32", backend=backend_name(kind, device), op="step",
                         shape=f"{len(shapes)} tensors", device=device, params=n_params)

        def run(r: KernelResult, kind=kind) -> None:
            g = torch.Generator(device="cpu").manual_seed(0)
            params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(device) * 1e-3
            opt = make_optimizer(kind, params, device)
            r.samples_s, r.inner = measure(opt.step, device, repeats, warmup=2)
            r.extra["n_tensors"] = len(shapes)

        yield guarded(r, run)
