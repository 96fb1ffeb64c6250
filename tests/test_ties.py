"""The tie rule of the throughput recommendation, by simulation (report/guidance.py): ties by
equivalence (the contender's estimate inside the leader's interval or within TIE_MARGIN), not
by overlapping intervals, so that noise is not rewarded."""

import random

from llmbench.collect.stats import median, median_ci95, throughput_ci95
from llmbench.report.guidance import recommend

TOKENS_PER_STEP = 8 * 128


def trial(trial_id, steps, zero_stage, model_state_bytes):
    """A record as aggregate() makes one from these step times: the window throughput (the
    window is the sum of its steps), its interval, the median step and its interval."""
    tps = TOKENS_PER_STEP * len(steps) / sum(steps)
    return {"trial_id": trial_id, "status": "ok", "global_batch": 8, "seq_len": 128, "grad_accum": 1, "micro_batch": 8,
            "offload": "none", "precision": "fp32", "zero_stage": zero_stage, "model_state_bytes": model_state_bytes,
            "other_mem_bytes": 0, "tokens_per_s": tps, "tokens_per_s_ci95": throughput_ci95(tps, steps),
            "step_times_s": steps, "step_time_s": median(steps), "step_time_ci95_s": median_ci95(steps)}


def steps(rng, n, level, cv):
    return [level * max(0.05, rng.gauss(1, cv)) for _ in range(n)]


def test_two_equal_configurations_are_tied_in_at_least_90_percent_of_draws():
    rng = random.Random(1)
    draws, tied = 200, 0
    for _ in range(draws):
        a = trial("z0", steps(rng, 12, 0.10, 0.05), 0, 16)
        b = trial("z1", steps(rng, 12, 0.10, 0.05), 1, 12)
        rec = recommend([a, b], "throughput")
        tied += len(rec.tied) == 1
    assert tied / draws >= 0.90, tied / draws


def test_a_contender_5_percent_slower_with_tight_intervals_is_not_tied():
    rng = random.Random(2)
    for _ in range(200):
        fast = trial("z0", steps(rng, 12, 0.100, 0.005), 0, 16)
        slower = trial("z3", steps(rng, 12, 0.105, 0.005), 3, 8)  # less memory: it would win a tie
        rec = recommend([fast, slower], "throughput")
        assert rec.winner["trial_id"] == "z0" and not rec.tied


def test_a_noisy_contender_23_percent_slower_is_never_picked():
    """What the old overlap rule rewarded: a ZeRO-3 trial (less memory) with a 23% higher median
    step, three fast steps and a wide interval against a steady leader."""
    rng = random.Random(3)
    for _ in range(200):
        leader = trial("z0", steps(rng, 12, 0.100, 0.02), 0, 16)
        noisy = steps(rng, 12, 0.130, 0.10)  # median throughput 23% lower (0.100 / 0.130 = 0.77)
        noisy[:3] = [0.08, 0.08, 0.08]  # three fast steps
        rec = recommend([leader, trial("z3", noisy, 3, 8)], "throughput")
        assert rec.winner["trial_id"] == "z0", (rec.winner["tokens_per_s"], leader["tokens_per_s"])


def test_the_leader_is_the_headline_figure_not_the_median():
    """Ranked by the statistic printed: window tokens/s. A trial whose median step is faster
    but whose window is slower (slow steps that recur) does not lead."""
    recurring_slow = [0.09] * 8 + [0.20] * 4  # median 0.09, window 1.52 s
    steady = [0.10] * 12  # median 0.10, window 1.20 s
    a, b = trial("z0", recurring_slow, 0, 8), trial("z1", steady, 1, 16)
    assert a["step_time_s"] < b["step_time_s"] and a["tokens_per_s"] < b["tokens_per_s"]
    assert recommend([a, b], "throughput").winner["trial_id"] == "z1"


def test_the_headline_is_inside_its_interval_in_a_real_sweep(zero_sweep):
    for r in zero_sweep["records"]:
        lo, hi = r["tokens_per_s_ci95"]
        assert lo <= r["tokens_per_s"] <= hi, r["trial_id"]
