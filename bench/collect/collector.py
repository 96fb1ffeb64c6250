"""The one interface every collector follows, and the loop that drives a set of them.

A collector watches some steps of a trial: `start()` before the first, `begin_step()` and
`end_step()` at each step's edges, `stop()` after the last (the device already synchronised),
which returns the rank-result fields it fills, by name (`{"memory": {...}}`,
`{"step_times_s": [...], "step_cpu_s": [...]}`); or, when a step failed, `abort()`, which
measures nothing and only releases what the collector holds (a sampling thread, wrapped
functions, an open profiler), safe whether or not it started. That is the whole protocol: the step timer,
peak memory, GPU telemetry, the reference speed, DeepSpeed's breakdown timers, the comms
recorder and the profiler are all collectors (torchtitan's components/metrics.py has the
same shape: one small class per concern behind one interface).

Nesting: collectors start in the order given and stop in reverse, and at each step the last
one given is the innermost (it begins last and ends first): put the step timer last.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Protocol, runtime_checkable


@runtime_checkable
class Collector(Protocol):
    def start(self) -> None: ...
    def begin_step(self) -> None: ...
    def end_step(self) -> None: ...
    def stop(self) -> dict[str, Any]:
        """The rank-result fields this collector fills (read after the device synchronised)."""
        ...
    def abort(self) -> None: ...


class Base:
    """Per-step hooks that do nothing, for collectors that watch a span, not each step."""

    def start(self) -> None:
        pass

    def begin_step(self) -> None:
        pass

    def end_step(self) -> None:
        pass

    def stop(self) -> dict[str, Any]:
        return {}

    def abort(self) -> None:
        pass


def observe(collectors: list[Collector], step: Callable[[int], Any], steps: Iterable[int],
            sync: Callable[[], None]) -> tuple[list[Any], dict[str, Any]]:
    """Run `step(i)` for each i under the collectors; returns the steps' outputs and every
    collector's fields. Nothing synchronises between steps; `sync()` runs once after the last.
    When a step (or a collector) fails, every collector not yet stopped is aborted, so none
    outlives the trial in a warm worker (the comms recorder's wrappers, a sampler's thread),
    and the failure propagates."""
    stopped: set[int] = set()
    outputs = []
    fields: dict[str, Any] = {}
    try:
        for c in collectors:
            c.start()
        for i in steps:
            for c in collectors:
                c.begin_step()
            outputs.append(step(i))
            for c in reversed(collectors):
                c.end_step()
        sync()
        for c in reversed(collectors):
            fields.update(c.stop())
            stopped.add(id(c))
    except BaseException:
        for c in reversed(collectors):
            if id(c) not in stopped:
                try:
                    c.abort()
                except Exception:  # noqa: BLE001 - the first failure is the one to report
                    pass
        raise
    return outputs, fields
