"""Run a KernelPlan on one rank: the per-device benchmarks, then the collectives with the
other ranks. Every rank runs the per-device part at the same time, as in training (on a CPU
each rank on its share of the cores), and barriers keep the ranks in step."""

from __future__ import annotations

from typing import Callable

import torch

from ..collect.flops import datasheet_peak_tflops
from ..device import rank_device
from ..models import build_config, config_shape, intermediate_size
from .attention import bench_attention
from .collectives import bench_collectives
from .gemm import bench_gemm, model_gemm_shapes
from .layers import bench_mlp, bench_norms
from .optimizer import bench_optimizers
from .plan import KernelPlan


def model_param_shapes(config) -> list[tuple[int, ...]]:
    """The model's parameter tensor shapes, from a meta-device build (no memory used)."""
    from ..models import build_model

    with torch.device("meta"):
        model = build_model(config)
    return [tuple(p.shape) for p in model.parameters()]


def run_kernels(plan: KernelPlan, rank: int, accelerator: str, device_name: str = "",
                emit: Callable[[dict], None] | None = None) -> list[dict]:
    """All of the plan's cases on this rank, as records (KernelResult.to_dict); each record is
    passed to `emit` as soon as its case finishes, so the driver can store it at once."""
    import torch.distributed as dist

    device = str(rank_device(accelerator))
    config = build_config(plan.model, plan.family, plan.seq_len)
    shape = config_shape(config)
    inter = intermediate_size(config)
    tokens = plan.tokens
    distributed = dist.is_available() and dist.is_initialized()
    out: list[dict] = []

    def done(r) -> None:
        d = r.to_dict()
        d.update(rank=rank, model=plan.model, threads=torch.get_num_threads())
        out.append(d)
        if emit:
            emit(d)

    def barrier():
        if distributed:
            dist.barrier()

    for precision in plan.precisions:
        if "gemm" in plan.benches:
            peak = datasheet_peak_tflops(device_name, precision) if accelerator == "cuda" else None
            for name, (m, k, n) in model_gemm_shapes(shape, inter, tokens).items():
                done(bench_gemm(name, m, k, n, precision, device, plan.repeats, peak))
            for n in plan.square_sizes:
                done(bench_gemm(f"square{n}", n, n, n, precision, device, plan.repeats, peak))
            barrier()
        if "attention" in plan.benches:
            for r in bench_attention(plan.micro_batch, shape["n_heads"], plan.seq_len, shape["head_dim"], precision,
                                     device, plan.repeats):
                done(r)
            barrier()
        if "norm" in plan.benches:
            for r in bench_norms(config, shape["hidden_size"], tokens, precision, device, plan.repeats):
                done(r)
            barrier()
        if "mlp" in plan.benches:
            for r in bench_mlp(config, shape["hidden_size"], inter, tokens, precision, device, plan.repeats):
                done(r)
            barrier()
    if "optimizer" in plan.benches:
        for r in bench_optimizers(model_param_shapes(config), plan.optimizers, device, plan.repeats):
            done(r)
        barrier()
    if "collective" in plan.benches and distributed:
        for r in bench_collectives(plan.collectives, plan.message_bytes, "fp32", device, plan.repeats):
            done(r)
    return out
