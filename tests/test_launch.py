"""The launcher in parts: the pool's run() answers with one type (PoolRun) in every case."""

import psutil

from llmbench.env import detect_hardware
from llmbench.launch import LaunchOptions, PoolRun, RankPool
from llmbench.spec import TrialSpec


def test_a_launch_that_cannot_start_is_a_failed_pool_run_not_an_exception(tmp_path):
    """DeepSpeed's runner refuses an unknown flag and exits: run() says so, with the launcher's
    own words from the log, and leaves no process behind."""
    hw = detect_hardware(force_cpu=True)
    pool = RankPool(hw, 2, tmp_path / "pool.log", LaunchOptions(extra=["--no-such-deepspeed-flag"]),
                    startup_timeout_s=120)
    spec = TrialSpec(model="tiny", precision="fp32", seq_len=16, micro_batch=1, warmup_steps=2, steps=2).model_dump()
    out = pool.run("t", spec, 60)
    assert isinstance(out, PoolRun) and out.status == "failed" and not out.reported and out.results == []
    assert "launcher exited" in out.error and "no-such-deepspeed-flag" in out.error
    assert not pool.alive and not psutil.Process().children(recursive=True)
