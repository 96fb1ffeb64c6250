"""Step timers: one collector (collector.py), two clocks.

A trial's timed window calls `start()` once, then `begin_step()` / `end_step()` around every
optimizer step, and `stop()` after the window's final synchronise: the seconds of each step
(`step_times_s`; `step_cpu_s` on a CPU) and of the whole window (`window_s`, the wall clock
from `start()` to `stop()`). On a CPU the wall clock
(`time.perf_counter`) and the process's CPU seconds (`time.process_time`) are read at each
step's edges: nothing is asynchronous. On CUDA a pair of events brackets each step (recorded on
the stream, read after the window's final synchronise), so nothing in the window waits for
the device (the design's "synchronise only at window edges").
"""

from __future__ import annotations

import time

import torch

from .collector import Base


class _Window(Base):
    """The window's wall clock, from start() to stop()."""

    def start(self) -> None:
        self._window_start = time.perf_counter()

    def _window_s(self) -> float:
        return time.perf_counter() - self._window_start


class HostTimer(_Window):
    """Wall and CPU seconds per step, read on the host (the CPU accelerator)."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._t = self._c = 0.0

    def begin_step(self) -> None:
        self._t, self._c = time.perf_counter(), time.process_time()

    def end_step(self) -> None:
        self.wall.append(time.perf_counter() - self._t)
        self.cpu.append(time.process_time() - self._c)

    def stop(self) -> dict:
        return {"window_s": self._window_s(), "step_times_s": self.wall, "step_cpu_s": self.cpu}


class CudaEventTimer(_Window):
    """Seconds per step between CUDA events recorded at step edges (read after a synchronise)."""

    def __init__(self) -> None:
        self.events: list = []

    def _record(self) -> None:
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        self.events.append(e)

    def start(self) -> None:
        super().start()
        self._record()

    def end_step(self) -> None:
        self._record()

    def stop(self) -> dict:
        if self.events:
            self.events[-1].synchronize()  # elapsed_time() refuses an event not yet completed
        steps = [a.elapsed_time(b) / 1000 for a, b in zip(self.events, self.events[1:])]
        return {"window_s": self._window_s(), "step_times_s": steps, "step_cpu_s": []}


def step_timer(accelerator: str) -> HostTimer | CudaEventTimer:
    return CudaEventTimer() if accelerator == "cuda" else HostTimer()
