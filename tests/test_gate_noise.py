"""The gate's error rates by simulation (gate.py): identical runs must not fail it, a slowdown
must. The noise model is what the 2-core machine showed (docs/gates.md): within a window,
steps follow an AR(1) process (neighbouring steps correlated); every window (a run's, or a
round's) has its own level shift (run-to-run noise of one trial); every run shares a common
drift that the reference workload does not cancel."""

import math
import random

import pytest

from llmbench.collect.stats import replicates, welch_log
from llmbench.gate import compare_time, gate

STEPS = 12


def window(rng, level, n=STEPS, phi=0.5, step_cv=0.03, shift_cv=0.03):
    """One window's step times: a level shift for the whole window, AR(1) noise per step."""
    shift = math.exp(rng.gauss(0, shift_cv))
    e, out = rng.gauss(0, step_cv), []
    for _ in range(n):
        out.append(level * shift * math.exp(e))
        e = phi * e + rng.gauss(0, step_cv * math.sqrt(1 - phi * phi))
    return out


def trial_steps(rng, level, rounds, **kw):
    return [t for _ in range(rounds) for t in window(rng, level, **kw)]


def cpu_rec(tid, times, rounds):
    """A CPU record (step_cpu_s present: the run decides) gated on step ÷ reference."""
    return {"trial_id": tid, "status": "ok", "model": "tiny", "zero_stage": 1, "micro_batch": 4, "error": None,
            "step_times_s": times, "step_cpu_s": times, "step_times_rel": [t * 10 for t in times],
            "model_state_bytes": 1000, "rounds_done": rounds, "steps": STEPS}


def run(rng, rounds, slow=None, factor=1.0, drift_cv=0.03, n_trials=8, **kw):
    drift = math.exp(rng.gauss(0, drift_cv))  # what the reference did not cancel: common to the run
    return [cpu_rec(f"t{i}", trial_steps(rng, 0.1 * (1 + i / 10) * drift * (factor if i in (slow or ()) else 1.0),
                                         rounds, **kw), rounds) for i in range(n_trials)]


def test_replicates_are_rounds_from_three_else_batch_means():
    steps = list(range(1, 37))
    reps, kind = replicates([float(s) for s in steps], rounds=3)
    assert kind == "3 rounds" and reps == [6.5, 18.5, 30.5]  # each round's 12 steps, in order
    reps, kind = replicates([float(s) for s in steps[:12]])
    assert kind == "3 batch means" and reps == [2.5, 6.5, 10.5]  # ⌊√12⌋ = 3 runs of 4
    assert replicates([1.0] * 5) is None


def test_welch_log_matches_a_t_test_on_the_logs():
    from scipy.stats import ttest_ind

    a, b = [0.10, 0.11, 0.105, 0.098], [0.12, 0.125, 0.13, 0.118, 0.121]
    diff, p = welch_log(a, b)
    ref = ttest_ind([math.log(x) for x in b], [math.log(x) for x in a], equal_var=False)
    assert diff == pytest.approx(sum(map(math.log, b)) / 5 - sum(map(math.log, a)) / 4)
    assert p == pytest.approx(ref.pvalue, rel=1e-9)


@pytest.mark.parametrize("shift_cv", [0.01, 0.05])
def test_per_trial_test_on_rounds_holds_its_level_where_steps_do_not(shift_cv):
    """The issue's case: identical pairs with 1% and 5% run-to-run noise and correlated steps.
    A test on the steps (Mann-Whitney, the old rule) calls a large share of them significant
    at 0.002; Welch's t on 5 rounds a side stays near its level (at most 1% of 400 draws)."""
    from scipy.stats import mannwhitneyu

    rng = random.Random(7)
    draws, steps_sig, rounds_sig = 400, 0, 0
    for _ in range(draws):
        a, b = window(rng, 0.1, shift_cv=shift_cv), window(rng, 0.1, shift_cv=shift_cv)
        steps_sig += mannwhitneyu(a, b, method="exact").pvalue < 0.002
        a5, b5 = trial_steps(rng, 0.1, 5, shift_cv=shift_cv), trial_steps(rng, 0.1, 5, shift_cv=shift_cv)
        rounds_sig += compare_time(a5, b5, 0.002, (5, 5))[5]
    assert steps_sig / draws > 0.05, steps_sig / draws  # the old rule's false significance
    assert rounds_sig / draws <= 0.01, rounds_sig / draws


def test_per_trial_gate_with_rounds_catches_20_percent_and_passes_identical_runs():
    """The GPU default (each trial decides): 5 rounds a side, 3% run-to-run noise per round:
    20% slower caught in at least 95% of 300 draws, identical runs failing in at most 1%.
    (At asv's 0.002 instead of 0.01 the same rounds miss a share of them: docs/gates.md.)"""
    rng = random.Random(8)
    draws, caught, false = 300, 0, 0
    for _ in range(draws):
        def one(level):
            return [dict(cpu_rec("t", trial_steps(rng, level, 5, shift_cv=0.03), 5), step_cpu_s=[])]
        base = one(0.1)
        false += not gate(base, one(0.1)).passed
        caught += not gate(base, one(0.12)).passed
    assert false / draws <= 0.01 and caught / draws >= 0.95, (false / draws, caught / draws)


def test_run_rule_catches_a_large_regression_confined_to_two_trials_with_one_window():
    """Two of 8 trials 3× slower fails the run in every draw, naming them (the old rule, 3/4 of
    the trials slower, passed it); every trial 25% slower fails it in at least 90% (the
    uniform rule: the run's drift that the reference leaves, 3% a side here, blurs the 25%)."""
    rng = random.Random(9)
    uniform = 0
    for _ in range(100):
        base = run(rng, 1)
        r = gate(base, run(rng, 1, slow=(2, 5), factor=3.0))
        assert not r.passed and set(r.regressed_trials) == {"t2", "t5", "(all trials)"}, r.regressed_trials
        run_row = next(v for v in r.verdicts if v.trial_id == "(all trials)")
        assert run_row.outcome == "regression" and "confined to t2, t5" in run_row.why, run_row.why
        uniform += not gate(base, run(rng, 1, factor=1.25, slow=range(8))).passed
    assert uniform >= 90, uniform


def test_run_rule_false_alarm_rate_on_identical_runs():
    """Identical runs (3% common drift, 3% per-window shift, AR(1) steps): the run fails in at
    most 1% of 300 draws, with one window a trial and with 5 rounds."""
    rng = random.Random(10)
    for rounds in (1, 5):
        false = sum(not gate(run(rng, rounds), run(rng, rounds)).passed for _ in range(300))
        assert false / 300 <= 0.01, (rounds, false / 300)


def test_run_rule_with_five_rounds_catches_20_percent_in_two_of_eight_trials():
    """The issue's example: 20% slower in 2 of 8 trials, 3% noise per round: with 5 rounds a
    side, caught in at least 95% of 300 draws. (3 rounds catch about half: Welch's t with
    about 4 degrees of freedom at the Bonferroni level 0.01 / 8, one-sided, needs t > 6.8;
    one window cannot, its confined margin being CONFINED_ONE_WINDOW; docs/gates.md.)"""
    rng = random.Random(11)
    caught = sum(not gate(run(rng, 5), run(rng, 5, slow=(1, 6), factor=1.2)).passed for _ in range(300))
    assert caught / 300 >= 0.95, caught / 300
