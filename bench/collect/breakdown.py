"""Where a step's time goes, from DeepSpeed's own wall-clock timers, in a separate pass.

DeepSpeed's breakdown timers synchronise the device around forward, backward and step, so
they never run inside the throughput window: after the window, the engine is switched to
global timers for a few extra steps and each step's timer snapshot is read. `Breakdown` is
that pass's collector (collector.py): `stop()` returns `{"breakdown": {...}}`.
"""

from __future__ import annotations

import statistics

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


def summarise(steps: list[dict[str, float]], spec) -> dict:
    """Median seconds per optimizer step for each part, and what the timers cannot see."""
    out: dict = {}
    for key in TIMERS.values():
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
    """DeepSpeed's breakdown timers switched on at start, read at the end of every step."""

    def __init__(self, engine, spec) -> None:
        self.engine, self.spec = engine, spec
        self.steps: list[dict[str, float]] = []

    def start(self) -> None:
        enable_breakdown(self.engine)

    def end_step(self) -> None:
        self.steps.append(snapshot(self.engine))

    def stop(self) -> dict:
        return {"breakdown": summarise(self.steps, self.spec)}
