"""Step timers: one interface, two clocks.

A trial's timed window calls `start()` once, then `begin_step()` / `end_step()` around every
optimizer step, and reads `result()` after the window. On a CPU the wall clock
(`time.perf_counter`) and the process's CPU seconds (`time.process_time`) are read at each
step's edges: nothing is asynchronous. On CUDA a pair of events brackets each step (recorded on
the stream, read after the window's final synchronise), so nothing in the window waits for
the device (the design's "synchronise only at window edges").
"""

from __future__ import annotations

import time
from typing import Protocol

import torch


class StepTimer(Protocol):
    def start(self) -> None: ...
    def begin_step(self) -> None: ...
    def end_step(self) -> None: ...
    def result(self) -> tuple[list[float], list[float]]:
        """(wall seconds per step, CPU seconds per step; empty where not measured)."""
        ...


class HostTimer:
    """Wall and CPU seconds per step, read on the host (the CPU accelerator)."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._t = self._c = 0.0

    def start(self) -> None:
        pass

    def begin_step(self) -> None:
        self._t, self._c = time.perf_counter(), time.process_time()

    def end_step(self) -> None:
        self.wall.append(time.perf_counter() - self._t)
        self.cpu.append(time.process_time() - self._c)

    def result(self) -> tuple[list[float], list[float]]:
        return self.wall, self.cpu


class CudaEventTimer:
    """Seconds per step between CUDA events recorded at step edges (read after a synchronise)."""

    def __init__(self) -> None:
        self.events: list = []

    def _record(self) -> None:
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        self.events.append(e)

    def start(self) -> None:
        self._record()

    def begin_step(self) -> None:
        pass

    def end_step(self) -> None:
        self._record()

    def result(self) -> tuple[list[float], list[float]]:
        return [a.elapsed_time(b) / 1000 for a, b in zip(self.events, self.events[1:])], []


def step_timer(accelerator: str) -> StepTimer:
    return CudaEventTimer() if accelerator == "cuda" else HostTimer()
