"""Statistics and the ZeRO memory formula against independent computations."""

import math
import random

import pytest

from llmbench.collect.memory import zero_paper_bytes
from llmbench.collect.stats import cv, median_ci95


def test_zero_paper_formula_examples():
    # ZeRO paper §3 / Fig. 1: Ψ = 7.5B, N_d = 64 → 120 GB, 31.4 GB, 16.6 GB, 1.9 GB.
    psi, n = 7.5e9, 64
    assert zero_paper_bytes(psi, 0, n) / 1e9 == pytest.approx(120, rel=1e-3)
    assert zero_paper_bytes(psi, 1, n) / 1e9 == pytest.approx(31.4, abs=0.05)
    assert zero_paper_bytes(psi, 2, n) / 1e9 == pytest.approx(16.6, abs=0.05)
    assert zero_paper_bytes(psi, 3, n) / 1e9 == pytest.approx(1.9, abs=0.05)


def test_median_ci_covers_true_median_about_95_percent():
    rng = random.Random(0)
    hits, trials = 0, 2000
    for _ in range(trials):
        xs = [rng.expovariate(1.0) for _ in range(25)]
        lo, hi = median_ci95(xs)
        hits += lo <= math.log(2) <= hi
    assert 0.93 <= hits / trials <= 0.99


def test_cv():
    assert cv([1.0, 1.0, 1.0]) == 0
    assert cv([1.0, 3.0]) == pytest.approx(math.sqrt(2) / 2)
    assert cv([1.0]) is None


def test_host_step_timer_reads_wall_and_cpu_seconds_per_step():
    """On a CPU each step's wall time and CPU time come from the host clocks at its edges: a
    sleeping step takes wall time and almost no CPU time."""
    import time

    from llmbench.collect.timing import HostTimer, step_timer

    t = step_timer("cpu")
    assert isinstance(t, HostTimer)
    t.start()
    for _ in range(2):
        t.begin_step()
        time.sleep(0.05)
        t.end_step()
    out = t.stop()
    wall, cpu = out["step_times_s"], out["step_cpu_s"]
    assert len(wall) == len(cpu) == 2
    assert all(w >= 0.05 for w in wall) and all(c < 0.02 for c in cpu)
    assert out["window_s"] >= sum(wall)
