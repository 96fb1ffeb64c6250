"""The progress watchdog: a trial whose ranks stop reporting steps is stopped long before its
`timeout_s`.

Each rank sends a beat after every training step of the warm-up and the timed window (the
phases where only steps run; worker.py, trial.py), from the host, without synchronising the
device. The driver keeps, per rank, the time of its last beat, and the intervals between
beats. The ranks are stalled when one that has not reported its result has sent no beat for

    max(STALL_FACTOR × the median of the last 64 intervals between beats, STALL_FLOOR_S)

which is the rule of torchelastic's and NCCL's watchdogs (a fixed multiple of the expected
progress, with a floor for the gaps a step does not explain: the reference workload at the
window's edges, a collector's start). The watch starts at a rank's third beat (two intervals
seen), so the first step's one-off costs (allocations, a JIT build) never count as a stall;
the trial's own `timeout_s` covers everything before that and every phase after the window.

A frozen rank (SIGSTOP) stops beating at once; the others stop within one step, blocked in
their next collective. Which rank froze is named from its process state where the driver can
see it (`/proc`, ranks on this host: "stopped"); otherwise the rank whose last beat is oldest.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass, field

STALL_FACTOR = 20.0
STALL_FLOOR_S = 10.0


@dataclass
class Progress:
    """Beats of one job, per rank."""

    factor: float = STALL_FACTOR
    floor_s: float = STALL_FLOOR_S
    last: dict[int, tuple[float, int]] = field(default_factory=dict)   # rank → (monotonic time, step)
    beats: dict[int, int] = field(default_factory=dict)
    watching: dict[int, bool] = field(default_factory=dict)
    intervals: deque = field(default_factory=lambda: deque(maxlen=64))  # the recent ones: a phase's own pace

    def beat(self, rank: int, step: int | None, watch: bool, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if rank in self.last and watch and self.watching.get(rank):
            self.intervals.append(now - self.last[rank][0])
        self.last[rank] = (now, step if step is not None else self.last.get(rank, (0, -1))[1])
        self.beats[rank] = self.beats.get(rank, 0) + 1 if watch else 0
        self.watching[rank] = watch

    def threshold_s(self) -> float:
        """How long a rank may go without a beat."""
        expected = statistics.median(self.intervals) if self.intervals else 0.0
        return max(self.factor * expected, self.floor_s)

    def expected_step_s(self) -> float | None:
        return statistics.median(self.intervals) if self.intervals else None

    def stalled(self, done: set[int], now: float | None = None) -> dict[int, float] | None:
        """{rank: seconds since its last beat} for every watched rank past the threshold, when
        any is (ranks in `done` have reported their result and are not watched); else None."""
        now = time.monotonic() if now is None else now
        limit = self.threshold_s()
        late = {r: now - t for r, (t, _) in self.last.items()
                if r not in done and self.watching.get(r) and self.beats.get(r, 0) >= 3 and now - t > limit}
        return late or None

    def describe(self, late: dict[int, float], states: dict[int, str]) -> str:
        """The error a stalled job is recorded with: who stopped, for how long, against what."""
        frozen = [r for r, s in states.items() if s == "stopped"]
        culprit = frozen or [min(late, key=lambda r: self.last[r][0])]
        expected = self.expected_step_s() or 0.0
        parts = [f"rank {r} at step {self.last[r][1]}, silent {late[r]:.1f}s" for r in sorted(late)]
        who = ", ".join(f"rank {r}" for r in culprit)
        state = f" (its process is {states[culprit[0]]}: SIGSTOP or SIGTSTP)" if frozen else \
            " (its process state is not visible from here)" if culprit[0] not in states else \
            f" (its process is {states[culprit[0]]})"
        return (f"no progress: {who} stopped reporting steps{state}; {'; '.join(parts)}; the watchdog allows "
                f"max({self.factor:g} × {expected:.3g}s, the median step so far, {self.floor_s:g}s) = "
                f"{self.threshold_s():.1f}s without a step")
