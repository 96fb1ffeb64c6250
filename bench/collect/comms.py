"""Communication volume and bandwidth per collective, in an optional profiling pass.

Timing a collective means synchronising around it, which disturbs a throughput window, so
this runs only in its own pass after the window (`llmbench sweep --comms`). DeepSpeed's own
comms logger is not used: in 0.19.8 it sizes `all_gather_into_tensor` and
`reduce_scatter_tensor` from a parameter named `tensor`, which those functions lack (it
records 0 bytes), and its all-reduce "algbw" is 2·S/t where nccl-tests uses S/t.
`CommsRecorder` is a collector (collector.py): `stop()` returns `{"comms": {...}}`.
"""

from __future__ import annotations

import time
from collections import defaultdict

from ..device import sync
from .collector import Base

# deepspeed.comm functions wrapped, and which argument holds the collective's full buffer S
# (nccl-tests, doc/PERFORMANCE.md): the buffer for all-reduce and broadcast, the whole output
# for all-gather, the whole input for reduce-scatter.
OPS = {
    "all_reduce": ("all_reduce", lambda a, k: a[0] if a else k["tensor"]),
    "all_gather_into_tensor": ("all_gather", lambda a, k: a[0] if a else k["output_tensor"]),
    "reduce_scatter_tensor": ("reduce_scatter", lambda a, k: a[1] if len(a) > 1 else k["input_tensor"]),
    "broadcast": ("broadcast", lambda a, k: a[0] if a else k["tensor"]),
}


def bus_factor(kind: str, n: int) -> float:
    """busbw / algbw (nccl-tests PERFORMANCE.md): 2(n−1)/n for all-reduce, (n−1)/n for
    all-gather and reduce-scatter, 1 for broadcast."""
    if kind == "all_reduce":
        return 2 * (n - 1) / n
    if kind in ("all_gather", "reduce_scatter"):
        return (n - 1) / n
    return 1.0


def bandwidth(kind: str, size_bytes: int, seconds: float, n: int) -> tuple[float, float]:
    """(algbw, busbw) in bytes/s: algbw = S / t, busbw = algbw · bus_factor."""
    alg = size_bytes / seconds
    return alg, alg * bus_factor(kind, n)


class CommsRecorder(Base):
    """Wraps deepspeed.comm's collectives from start to stop; each call is synchronised and timed."""

    def __init__(self, world_size: int, accelerator: str):
        self.n, self.accelerator, self.steps = world_size, accelerator, 0
        self.calls: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self._saved: list[tuple[object, str, object]] = []

    def _wrap(self, kind, size_of, fn):
        def timed(*args, **kwargs):
            sync(self.accelerator)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if hasattr(out, "wait") and kwargs.get("async_op"):
                out.wait()
            sync(self.accelerator)
            dt = time.perf_counter() - t0
            t = size_of(args, kwargs)
            self.calls[kind].append((t.numel() * t.element_size(), dt))
            return out
        return timed

    def start(self) -> None:
        import deepspeed.comm as package
        import deepspeed.comm.comm as module

        for name, (kind, size_of) in OPS.items():
            for ns in (package, module):
                if hasattr(ns, name):
                    original = getattr(ns, name)
                    self._saved.append((ns, name, original))
                    setattr(ns, name, self._wrap(kind, size_of, original))

    def end_step(self) -> None:
        self.steps += 1

    def stop(self) -> dict:
        self.abort()
        return {"comms": self.summary(max(1, self.steps))}

    def abort(self) -> None:
        """Put deepspeed.comm's own functions back."""
        for ns, name, original in reversed(self._saved):
            setattr(ns, name, original)
        self._saved.clear()

    def summary(self, steps: int) -> dict:
        """Per collective kind: calls and bytes per optimizer step, time, algbw and busbw (GB/s)."""
        out = {}
        for kind, calls in sorted(self.calls.items()):
            size = sum(s for s, _ in calls)
            secs = sum(t for _, t in calls)
            alg, bus = bandwidth(kind, size, secs, self.n) if secs > 0 else (0.0, 0.0)
            out[kind] = {"calls_per_step": len(calls) / steps, "bytes_per_step": size / steps,
                         "seconds_per_step": secs / steps, "algbw_GBps": alg / 1e9, "busbw_GBps": bus / 1e9}
        return out
