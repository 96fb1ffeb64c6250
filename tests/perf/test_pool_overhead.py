"""Per-trial overhead of the `smoke` suite: warm worker pool vs one DeepSpeed launch per trial.

Overhead = (sweep wall time − the trials' timed windows) / trials, measured for both modes
in the same session, interleaved. Also shows that a trial measures the same in the pool as
in a fresh process. Run: python3 -m pytest -m slow --benchmark-enable tests/perf -s
"""

import json
import statistics
import time

import pytest

from helpers import llmbench, cli


def sweep(tmp_path, name, *extra):
    db = tmp_path / f"{name}.db"
    t0 = time.perf_counter()
    llmbench("sweep", "smoke", "--db", str(db), "--out", str(tmp_path / name), *extra)
    wall = time.perf_counter() - t0
    recs = [json.loads(x) for x in cli("results", "--db", str(db), "--format", "json").stdout.splitlines()]
    return wall, recs


@pytest.mark.slow
def test_pool_overhead_vs_fresh_launch(tmp_path, benchmark):
    runs = {"warm": [], "fresh": []}

    def measure():
        for i in range(2):  # interleaved: warm, fresh, warm, fresh
            for mode, extra in (("warm", ()), ("fresh", ("--fresh-launch",))):
                runs[mode].append(sweep(tmp_path, f"{mode}{i}", *extra))

    benchmark.pedantic(measure, rounds=1, iterations=1)
    summary = {}
    for mode, results in runs.items():
        per_trial, steady, starts = [], [], []
        for wall, recs in results:
            assert all(r["status"] == "ok" for r in recs)
            per_trial.append((wall - sum(r["window_s"] for r in recs)) / len(recs))
            steady += [r["overhead_s"] - r["pool_start_s"] for r in recs]
            starts += [r["pool_start_s"] for r in recs if r["pool_start_s"]]
        summary[mode] = {"overhead_per_trial_s": statistics.median(per_trial),
                         "overhead_per_trial_excl_pool_start_s": statistics.median(steady),
                         "pool_start_s": statistics.median(starts), "pool_starts_per_sweep": len(starts) / len(results)}
    # The same trial measures the same: deterministic losses and model-state bytes, throughput within noise.
    warm, fresh = runs["warm"][0][1], runs["fresh"][0][1]
    for a, b in zip(warm, fresh):
        assert a["trial_id"] == b["trial_id"]
        assert a["losses"] == pytest.approx(b["losses"], abs=1e-4)
        assert a["model_state_bytes"] == b["model_state_bytes"]
    ratio = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(warm, fresh)]
    peak_growth = [(a["peak_mem_bytes"] - a["peak_mem_baseline_bytes"]) / max(1, b["peak_mem_bytes"] - b["peak_mem_baseline_bytes"])
                   for a, b in zip(warm, fresh)]
    summary["warm_vs_fresh_tokens_per_s_ratio"] = ratio
    summary["warm_vs_fresh_trial_peak_ratio"] = peak_growth
    summary["per_trial_saving_s"] = summary["fresh"]["overhead_per_trial_s"] - summary["warm"]["overhead_per_trial_s"]
    benchmark.extra_info.update(summary)
    print(json.dumps(summary, indent=2))
    assert summary["warm"]["overhead_per_trial_excl_pool_start_s"] <= 2.0
    assert summary["warm"]["overhead_per_trial_s"] < summary["fresh"]["overhead_per_trial_s"]
