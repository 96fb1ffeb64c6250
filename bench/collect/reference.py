"""The machine's speed next to a trial's window: a fixed reference workload timed just before
and just after it (a collector, collector.py: `stop()` returns `reference_s` and
`reference_cpu_s`).

A trial's step time divided by the reference's is its speed relative to what the machine
could do at that moment: on a shared machine whose effective speed drifts (other tenants, CPU
steal), both slow down together and the ratio holds, which is what `llmbench gate` compares on
CPU (the design's "ratio against a reference, measured in the same run").
"""

from __future__ import annotations

import time

import torch

from ..device import rank_device, sync
from .collector import Base

_OPERANDS: dict[str, tuple] = {}


def reference_operands(accelerator: str) -> tuple:
    """The reference's operands, made once per process. A trial makes them before its memory
    window opens (trial.py): made inside it they were counted in its allocator peak (0.5 MiB
    on a CPU, 64 MiB on a GPU)."""
    if accelerator not in _OPERANDS:
        if accelerator == "cuda":
            dtype = torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else torch.float16  # native only
            a = torch.randn(4096, 4096, device=rank_device(accelerator), dtype=dtype)
            _OPERANDS[accelerator] = (a, a.clone(), 10)
        else:
            g = torch.Generator().manual_seed(0)
            _OPERANDS[accelerator] = (torch.randn(256, 256, generator=g), torch.randn(256, 256, generator=g), 16)
    return _OPERANDS[accelerator]


def reference_samples(accelerator: str, n: int = 5) -> tuple[list[float], list[float]]:
    """Seconds of a fixed reference workload (a fp32 256³ matmul ×16 on a CPU rank's threads;
    a 16-bit 4096³ matmul ×10 on a GPU: bf16, fp16 before Ampere), `n` samples after one
    warmup; with the CPU seconds of each sample on a CPU (empty on a GPU)."""
    a, b, reps = reference_operands(accelerator)
    wall, cpu = [], []
    for i in range(n + 1):  # the first is a warmup
        sync(accelerator)
        t, c = time.perf_counter(), time.process_time()
        for _ in range(reps):
            a @ b
        sync(accelerator)
        if i:
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    return wall, (cpu if accelerator != "cuda" else [])


class ReferenceSpeed(Base):
    """Reference samples at start and at stop: start it first, so it brackets the window."""

    def __init__(self, accelerator: str) -> None:
        self.accelerator = accelerator

    def start(self) -> None:
        self.before = reference_samples(self.accelerator)

    def stop(self) -> dict:
        wall, cpu = reference_samples(self.accelerator)
        return {"reference_s": self.before[0] + wall, "reference_cpu_s": self.before[1] + cpu}
