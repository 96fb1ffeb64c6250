"""`llmbench gate`: the noise-aware rule on its own, and on real runs of the same code."""

import json
import random

import pytest

from helpers import SLOWED, llmbench, cli
from llmbench.gate import ALPHA, gate


def rec(trial_id="t", times=None, status="ok", **kw):
    r = {"trial_id": trial_id, "status": status, "model": "tiny", "zero_stage": 1, "micro_batch": 4,
         "step_times_s": times if times is not None else [], "model_state_bytes": 1000, "error": None}
    r.update(kw)
    return r


def noisy(n, level, cv=0.05, seed=0):
    rng = random.Random(seed)
    return [level * (1 + rng.gauss(0, cv)) for _ in range(n)]


def test_rule_slowdown_beyond_margin_and_significant_is_a_regression():
    base = [rec(times=noisy(12, 0.10, seed=1))]
    same = [rec(times=noisy(12, 0.10, seed=2))]
    slow = [rec(times=[t * 1.25 for t in noisy(12, 0.10, seed=2)])]
    fast = [rec(times=[t / 1.25 for t in noisy(12, 0.10, seed=2)])]
    assert gate(base, same).passed
    r = gate(base, slow)
    assert not r.passed and r.regressions[0].metric == "step time" and r.regressions[0].p_value < ALPHA
    assert r.regressions[0].change == pytest.approx(0.25, abs=0.06)
    r = gate(base, fast)
    assert r.passed and any(v.outcome == "improvement" for v in r.verdicts)


def test_rule_needs_significance_not_just_a_large_median_change():
    # 3 wildly noisy samples each: the medians differ by > 15% but nothing is significant
    base, cand = [rec(times=[0.10, 0.20, 0.14])], [rec(times=[0.09, 0.30, 0.17])]
    v = next(v for v in gate(base, cand).verdicts if v.metric == "step time")
    assert abs(v.change) > 0.15 and v.outcome == "same" and "not significant" in v.why


def test_rule_status_counts_and_configuration():
    base = [rec("a", noisy(8, 0.1)), rec("b", noisy(8, 0.1)), rec("c", noisy(8, 0.1)), rec("d", noisy(8, 0.1))]
    cand = [rec("a", noisy(8, 0.1), status="oom", error="CUDA out of memory"),
            rec("b", noisy(8, 0.1), model_state_bytes=1100),
            rec("c", noisy(8, 0.1), zero_stage=2)]
    out = {(v.trial_id, v.metric): v for v in gate(base, cand).verdicts}
    assert out[("a", "status")].outcome == "regression"
    assert out[("b", "model-state bytes")].outcome == "regression"      # +10% > 1%
    assert ("b", "tensors' peak memory") not in out  # a figure neither run has is not judged
    more = gate([rec("e", noisy(8, 0.1), trial_allocated_peak_bytes=50_000_000)],
                [rec("e", noisy(8, 0.1), trial_allocated_peak_bytes=51_000_000)]).verdicts
    assert next(v for v in more if v.metric == "tensors' peak memory").outcome == "regression"  # +2% > 1%
    assert out[("c", "configuration")].outcome == "not compared"
    assert out[("d", "status")].outcome == "regression" and out[("d", "status")].candidate == "absent"


def test_gate_passes_two_real_runs_of_the_same_code(gate_db):
    """No retry: one comparison of two real runs (the false-alarm rate of this one-window
    comparison is measured in docs/gates.md)."""
    db, a, b, _ = gate_db
    assert a != b
    p = cli("gate", a, b, "--db", str(db), check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "PASS" in p.stdout and "z3-mb8" in p.stdout
    # on CPU: the step time relative to the in-run reference, decided over the whole run;
    # the wall-clock step time is shown as reported
    assert "step ÷ reference" in p.stdout and "(all trials)" in p.stdout and "reported" in p.stdout


def test_gate_fails_a_real_slowdown_confined_to_two_trials(gate_db, tmp_path):
    """A real run (3 rounds) in which two of the 8 trials' steps take twice as long (the
    test-only LLMBENCH_TEST_SLOWDOWN): the gate fails and names those two, by the confined rule."""

    db, a, _, c = gate_db
    out = tmp_path / "gate.json"
    p = cli("gate", a, c, "--db", str(db), "--json", str(out), check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    verdict = json.loads(out.read_text())
    # Only slowed trials are named, and at least one of them. Not always both: at 3 rounds with
    # this VM's per-round noise (8.5%, docs/gates.md) the confined test's one-sided α/n = 0.00125
    # missed one of the two (z1-mb4: +63% against the reference, p = 0.0044) in 1 of 3 full runs
    # on 2026-11-30; asserting both would assert more power than the method has.
    named = set(verdict["regressions"]) - {"(all trials)"}
    assert "(all trials)" in verdict["regressions"] and named and named <= set(SLOWED), p.stdout
    run_row = next(v for v in verdict["verdicts"] if v["trial_id"] == "(all trials)")
    # the confined rule names them (the uniform rule may fire too: two trials 2× slower lift
    # the geometric mean over 8 trials by 19%)
    assert f"confined to {', '.join(t for t in SLOWED if t in named)}" in run_row["why"], run_row
    for v in verdict["verdicts"]:
        if v["trial_id"] in SLOWED and v["metric"] == "step ÷ reference":
            # every slowed trial is measured slower, significantly so even when the confined test misses it
            assert v["change"] > 0.3 and v["p_value"] < 0.05, v
            if v["trial_id"] in named:
                assert v["outcome"] == "regression" and v["why"].startswith("confined"), v


def test_a_run_of_rounds_holds_every_round(gate_db):
    """The slowed run's records: 3 rounds each, every round's steps in order, tokens/s all
    tokens over all windows, losses those of one round (every round trains the same steps),
    the injected slowdown named in the slowed trials' notes and no other."""
    from llmbench.store import Store

    db, _, _, c = gate_db
    for r in Store(db).trials(c):
        assert r["status"] == "ok" and r["rounds"] == 3 and r["rounds_done"] == 3, r["trial_id"]
        assert len(r["step_times_s"]) == len(r["step_times_rel"]) == len(r["step_cpu_s"]) == 3 * r["steps"]
        assert all(len(per) == 3 * r["steps"] for per in r["step_times_per_rank"])
        assert len(r["losses"]) == r["steps"] and len(r["grad_norms"]) == r["steps"]
        tokens = 3 * r["steps"] * r["global_batch"] * r["seq_len"]
        assert r["tokens_per_s"] * r["window_s"] == pytest.approx(tokens, rel=1e-9)
        lo, hi = r["tokens_per_s_ci95"]
        assert lo <= r["tokens_per_s"] <= hi
        injected = any("LLMBENCH_TEST_SLOWDOWN" in n for n in r["notes"])
        assert injected == (r["trial_id"] in SLOWED), (r["trial_id"], r["notes"])


def test_gate_fails_a_candidate_25_percent_slower_with_a_table(gate_db, tmp_path):
    """The candidate is the baseline run itself with every step 25% longer, against the wall
    clock and against the in-run reference alike (what a change that makes each step 25%
    slower produces): throughput 20% lower."""
    db, a, _, _ = gate_db
    out = tmp_path / "a.json"
    cli("results", a, "--db", str(db), "--format", "json", "--output", str(out))
    slowed = []
    for line in out.read_text().splitlines():
        r = json.loads(line)
        if r["status"] == "ok":
            for k in ("step_times_s", "step_times_rel", "step_cpu_s", "step_cpu_rel"):
                r[k] = [t * 1.25 for t in r[k]]
            r["tokens_per_s"] /= 1.25
        slowed.append(r)
    cand = tmp_path / "slowed.json"
    cand.write_text("".join(json.dumps(r) + "\n" for r in slowed))
    p = cli("gate", a, str(cand), "--db", str(db), check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "FAIL" in p.stdout and "(all trials)" in p.stdout
    run_row = next(ln for ln in p.stdout.splitlines() if "(all trials)" in ln)
    assert "+25.0%" in run_row and "8 slower" in run_row and "regression" in run_row, run_row
    trial_rows = [ln for ln in p.stdout.splitlines() if "step ÷ reference" in ln and "+25.0%" in ln
                  and "(all trials)" not in ln]
    # every trial shows the +25%; whether each is significant on its own (p < 0.002) depends on
    # its window's noise (3 to 8 of 8 seen here): the run-level row is what decides
    assert len(trial_rows) == 8, p.stdout


def test_gate_reads_exports_and_refuses_bad_input(gate_db, tmp_path):
    db, a, b, _ = gate_db
    pq = tmp_path / "a.parquet"
    cli("results", a, "--db", str(db), "--format", "parquet", "--output", str(pq))
    # an export against its own run: the same samples read back, so nothing may change
    p = cli("gate", str(pq), a, "--db", str(db), check=False)
    assert p.returncode == 0 and "Welch t" in p.stdout and "reported" in p.stdout, p.stdout
    assert "FAIL" not in p.stdout and p.stdout.count("+0.0%") >= 8 * 5, p.stdout  # 5 figures per trial
    csv = tmp_path / "a.csv"
    cli("results", a, "--db", str(db), "--format", "csv", "--output", str(csv))
    p = cli("gate", str(csv), a, "--db", str(db), check=False)
    assert p.returncode == 0 and "no per-step samples" in p.stdout, p.stdout  # tokens/s, margin only
    p = cli("gate", "no-such-run", b, "--db", str(db), check=False)
    assert p.returncode == 2 and "no-such-run" in p.stderr + p.stdout
    p = cli("gate", a, b, "--margin", "speed=0.1", "--db", str(db), check=False)
    assert p.returncode == 2 and "--margin" in p.stderr + p.stdout


def test_run_level_uniform_rule_catches_every_trial_25_percent_slower():
    """On CPU records (they carry step_cpu_s) the run decides: every trial +25% is a uniform
    regression of the step ÷ reference; its per-trial verdicts are advice (test_gate_noise.py
    has the confined rule and the error rates)."""
    def cpu_rec(tid, times):
        return rec(tid, times, step_cpu_s=times, step_times_rel=[t * 10 for t in times])

    base = [cpu_rec(f"t{i}", noisy(12, 0.1, cv=0.02, seed=i)) for i in range(8)]
    slow = [cpu_rec(f"t{i}", [t * 1.25 for t in noisy(12, 0.1, cv=0.02, seed=i + 10)]) for i in range(8)]
    r = gate(base, slow)
    run = next(v for v in r.verdicts if v.trial_id == "(all trials)")
    assert run.outcome == "regression" and run.why == "uniform" and not r.passed
    assert run.change == pytest.approx(0.25, abs=0.03) and run.metric.startswith("step ÷ reference")
    assert {v.outcome for v in r.verdicts if v.trial_id != "(all trials)" and v.metric == "step ÷ reference"} <= {"slower", "same"}
