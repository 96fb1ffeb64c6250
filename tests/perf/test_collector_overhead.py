"""What llmbench's collection costs: its tokens/s against a bare DeepSpeed loop (trial.bare_loop)
on the same model, data and config, interleaved in one pool. Run with -m slow."""

import json
import statistics
from pathlib import Path

import pytest

from llmbench.env import detect_hardware
from llmbench.launch import RankPool
from llmbench.spec import TrialSpec


@pytest.mark.slow
def test_collector_overhead(tmp_path, benchmark):
    hw = detect_hardware(force_cpu=True)
    spec = TrialSpec(model="tiny", zero_stage=1, micro_batch=4, seq_len=128, precision="fp32", warmup_steps=3, steps=20,
                     breakdown_steps=0).model_dump()
    pool = RankPool(hw, 2, Path(tmp_path) / "pool.log")
    ratios = []

    def tokens_per_s(results):
        assert all(r["status"] == "ok" for r in results), results
        return sum(r["tokens"] for r in results) / max(r["window_s"] for r in results)

    def measure():
        for i in range(6):
            order = ("bare", "trial") if i % 2 == 0 else ("trial", "bare")
            got = {kind: tokens_per_s(pool.run(f"{kind}{i}", spec, 300, kind=kind).results) for kind in order}
            ratios.append(got["trial"] / got["bare"])

    try:
        benchmark.pedantic(measure, rounds=1, iterations=1)
    finally:
        pool.stop()
    med = statistics.median(ratios)
    spread = (min(ratios), max(ratios))
    benchmark.extra_info.update(ratio_median=med, ratio_min=spread[0], ratio_max=spread[1], ratios=ratios)
    print(json.dumps({"llmbench_vs_bare_tokens_per_s": ratios, "median": med, "overhead_pct": (1 - med) * 100}, indent=2))
    # The collector may cost at most 2%; on a noisy 2-core machine the spread is wider than
    # that, so the gate is on the median, with the noise reported beside it.
    assert med >= 0.98 - (spread[1] - spread[0]) / 2
