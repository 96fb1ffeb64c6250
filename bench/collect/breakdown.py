"""Where a step's time goes, from DeepSpeed's own wall-clock timers, in a separate pass.

DeepSpeed's breakdown timers synchronise the device around forward, backward and step, so
they never run inside the throughput window: after the window, the engine is switched to
global timers for a few extra steps and each step's timer snapshot is read. `Breakdown` is
that pass's collector (collector.py): `stop()` returns `{"breakdown": {...}}`.
"""

from __future__ import annotations

import statistics
import time

from .collector import Base

# deepspeed.runtime.engine timer names (FORWARD_GLOBAL_TIMER etc.)
TIMERS = {"fwd": "fwd_s", "bwd": "bwd_s", "bwd_inner": "bwd_compute_s", "bwd_allreduce": "comm_s", "step": "optimizer_s"}


def enable_breakdown(engine) -> None:
    from deepspeed.runtime.engine import EngineTimers

    engine._config.wall_clock_breakdown = True
    engine.engine_timers = EngineTimers(enable_micro_timers=False, enable_global_timers=True)


def snapshot(engine) -> dict[str, float]:
    """Seconds per timer for the optimizer step that just ended (DeepSpeed resets them per step)."""
    cache = engine.get_wall_clock_timers()
    return {TIMERS[k]: v / 1000.0 for k, v in cache.items() if k in TIMERS}


ALLGATHER = "optimizer_allgather"  # deepspeed.runtime.zero.stage_1_and_2.OPTIMIZER_ALLGATHER_TIMER


def summarise(steps: list[dict[str, float]], spec) -> dict:
    """Median seconds per optimizer step for each part, and what the timers cannot see."""
    out: dict = {}
    for key in (*TIMERS.values(), "allgather_s", "breakdown_step_s"):
        vals = [s[key] for s in steps if key in s]
        out[key] = statistics.median(vals) if vals else None
    overlap = spec.zero_stage >= 2 and (spec.overlap_comm or spec.zero_stage == 3)
    notes = []
    if spec.zero_stage >= 2:
        notes.append("ZeRO-{} reduces gradients in buckets during backward{}: comm_s is only the reduction epilogue "
                     "after backward; the rest of the gradient communication is inside bwd_compute_s".format(
                         spec.zero_stage, ", overlapped with compute (overlap_comm)" if overlap else ""))
    if spec.zero_stage == 3:
        notes.append("ZeRO-3 all-gathers parameters inside fwd_s and bwd_s")
    out["breakdown_note"] = "; ".join(notes) or None
    return out


class Breakdown(Base):
    """DeepSpeed's breakdown timers switched on at start, read at the end of every step.

    ZeRO-1/2 all-gather the updated parameter partitions inside the optimizer step, under
    DeepSpeed's own `optimizer_allgather` timer, which the ZeRO optimizer runs only when it was
    built with wall_clock_breakdown on. For this pass the optimizer gets the engine's timers,
    and their `log` (which the optimizer calls at the end of each step, printing on rank 0 and
    resetting) is replaced by one that reads the all-gather's time and resets, printing
    nothing; both are put back at stop. The all-gather is reported as `allgather_s` and taken
    out of `optimizer_s`. Each step's own wall time is read too (`breakdown_step_s`)."""

    def __init__(self, engine, spec) -> None:
        self.engine, self.spec = engine, spec
        self.steps: list[dict[str, float]] = []
        self._optimizer_timers = None
        self._allgather: float | None = None

    def start(self) -> None:
        enable_breakdown(self.engine)
        opt = getattr(self.engine, "optimizer", None)
        if self.spec.zero_stage in (1, 2) and hasattr(opt, "timers"):
            self._optimizer_timers, opt.timers = opt.timers, self.engine.timers
            self.engine.timers.log = self._read_and_reset

    def _read_and_reset(self, names, normalizer=1.0, reset=True, memory_breakdown=False, ranks=None) -> None:
        timers = self.engine.timers.timers
        for name in names:
            if name in timers:
                ms = timers[name].elapsed(reset=reset)
                if name == ALLGATHER:
                    self._allgather = ms / 1000.0

    def begin_step(self) -> None:
        self._t0 = time.perf_counter()

    def end_step(self) -> None:
        snap = snapshot(self.engine)
        snap["breakdown_step_s"] = time.perf_counter() - self._t0
        if self._optimizer_timers is not None and self._allgather is not None:
            snap["allgather_s"] = self._allgather
            if "optimizer_s" in snap:
                snap["optimizer_s"] = max(0.0, snap["optimizer_s"] - self._allgather)
            self._allgather = None
        self.steps.append(snap)

    def _restore(self) -> None:
        if self._optimizer_timers is not None:
            self.engine.optimizer.timers = self._optimizer_timers
            del self.engine.timers.log  # back to the class's method
            self._optimizer_timers = None

    def stop(self) -> dict:
        self._restore()
        return {"breakdown": summarise(self.steps, self.spec)}

    def abort(self) -> None:
        self._restore()
