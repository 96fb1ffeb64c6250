"""Collectives across the ranks of the pool (gloo on CPU, NCCL on GPU), over message sizes.

Every rank runs the same loop; before each sample a barrier lines the ranks up, and a
sample's time is the slowest rank's (a collective ends when its last rank does). Bandwidths
follow nccl-tests (doc/PERFORMANCE.md), computed by llmbench.collect.comms.bandwidth: algbw =
S / t, with S the collective's full buffer (the buffer for all-reduce and broadcast, the whole
output for all-gather, the whole input for reduce-scatter); busbw = algbw·2(n−1)/n for
all-reduce, ·(n−1)/n for all-gather and reduce-scatter, ·1 for broadcast.
"""

from __future__ import annotations

from collections.abc import Iterator

import time

import torch
import torch.distributed as dist

from ..collect.comms import bandwidth
from ..collect.stats import median
from .timing import DTYPES, KernelResult, guarded, sync


def _op(kind: str, size_bytes: int, dtype, device: str, n: int):
    elem = torch.tensor([], dtype=dtype).element_size()
    count = max(n, size_bytes // elem // n * n)  # divisible by the world size
    if kind == "all_reduce":
        t = torch.ones(count, dtype=dtype, device=device)
        return count * elem, lambda: dist.all_reduce(t)
    if kind == "broadcast":
        t = torch.ones(count, dtype=dtype, device=device)
        return count * elem, lambda: dist.broadcast(t, src=0)
    if kind == "all_gather":
        out, inp = torch.empty(count, dtype=dtype, device=device), torch.ones(count // n, dtype=dtype, device=device)
        return count * elem, lambda: dist.all_gather_into_tensor(out, inp)
    if kind == "reduce_scatter":
        out, inp = torch.empty(count // n, dtype=dtype, device=device), torch.ones(count, dtype=dtype, device=device)
        return count * elem, lambda: dist.reduce_scatter_tensor(out, inp)
    raise ValueError(kind)


def bench_collectives(kinds: list[str], sizes: list[int], precision: str, device: str, repeats: int) -> Iterator[KernelResult]:
    """Called on every rank at once; every rank returns the same (slowest-rank) samples."""
    n = dist.get_world_size()
    dtype = DTYPES[precision]
    for kind in kinds:
        for size in sizes:
            r = KernelResult("collective", f"{kind}-{size}", precision, backend=dist.get_backend(), op=kind,
                             device=device)

            def run(r: KernelResult, kind=kind, size=size) -> None:
                S, fn = _op(kind, size, dtype, device, n)
                r.bytes, r.shape = S, f"{S} B"
                for _ in range(2):
                    fn()
                # more calls per sample for small messages, so a sample is not just the timer
                inner = max(1, min(50, int(2**20 // max(S, 1))))
                local = []
                for _ in range(repeats):
                    dist.barrier()
                    sync(device)
                    t0 = time.perf_counter()
                    for _ in range(inner):
                        fn()
                    sync(device)
                    local.append((time.perf_counter() - t0) / inner)
                t = torch.tensor(local, dtype=torch.float64)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                r.samples_s, r.inner = t.tolist(), inner

            guarded(r, run)
            if r.status == "ok":
                alg, bus = bandwidth(kind, r.bytes, median(r.samples_s), n)
                r.extra.update(algbw_gbs=alg / 1e9, busbw_gbs=bus / 1e9, world_size=n)
            yield r
