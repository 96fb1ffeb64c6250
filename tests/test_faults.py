"""Process faults, each injected for real from outside the ranks into real DeepSpeed trials on
two CPU ranks (docs/faults.md has the table): a rank SIGKILLed or frozen (SIGSTOP) mid-window,
the launcher killed, a loss that turns NaN, a trial past the ranks' memory limit. After each:
the outcome recorded with its cause, no process left, no shared-memory segment, no JIT lock,
and the next trial runs on a fresh pool."""

import os
import signal

import pytest

from helpers import assert_nothing_left, run_with_fault
from llmbench.env import detect_hardware
from llmbench.launch import LaunchOptions, RankPool
from llmbench.spec import TrialSpec

WARMUP = 2
NAN_STEP = 5  # LLMBENCH_TEST_NAN: optimizer step 5 (the window's 4th) of the trial "nan" is made NaN


def spec(steps=400, **kw):
    kw = {"model": "tiny", "precision": "fp32", "seq_len": 32, "micro_batch": 2, "zero_stage": 1,
          "warmup_steps": WARMUP, "steps": steps, "breakdown_steps": 0, "comms_steps": 0,
          "reduce_bucket_size": int(2e7), "allgather_bucket_size": int(2e7), **kw}
    return TrialSpec(**kw).model_dump()


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """One pool object for the module; every fault kills its launch, and the next job starts a
    fresh one. Its ranks see LLMBENCH_TEST_NAN (they inherit the driver's environment) and a
    1.5 GiB memory limit each. RLIMIT_DATA counts address space, touched or not: ZeRO-1/2 reserve
    a 2 GB gradient bucket by default (reduce_bucket_size 5e8 fp32 elements), so these trials
    take 2e7-element buckets."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LLMBENCH_TEST_NAN", f"{NAN_STEP}:nan")
    p = RankPool(detect_hardware(force_cpu=True), 2, tmp_path_factory.mktemp("faults") / "pool.log",
                 LaunchOptions(rank_memory="1536MiB"), startup_timeout_s=300)
    yield p
    p.stop()
    mp.undo()


def test_a_rank_sigkilled_mid_window_fails_the_trial_naming_it_and_the_signal(pool):
    out, detect_s, pids, port = run_with_fault(pool, "killed", spec(), lambda p: os.kill(p.pids[1], signal.SIGKILL))
    assert out.status == "failed", out
    assert "rank 1" in out.error and "SIGKILL" in out.error, out.error
    assert detect_s < 60, detect_s  # the other rank did not hang until the trial's 300 s limit
    assert_nothing_left(pids, port)
    print(f"rank SIGKILL: outcome {detect_s:.1f}s after the kill")
    starts = pool.starts
    again = pool.run("after-kill", spec(steps=4), 300)  # the next trial: a fresh launch, and it runs
    assert again.reported and all(r["status"] == "ok" for r in again.results), again
    assert pool.starts == starts + 1


def test_a_frozen_rank_is_caught_by_the_progress_watchdog_and_killed(pool):
    """SIGSTOP: the rank neither dies nor reports. The watchdog (no beat for max(20 × the median
    step, 10 s)) ends the trial as a timeout long before its 300 s limit; the stopped process,
    deaf to SIGTERM, is SIGKILLed."""
    out, detect_s, pids, port = run_with_fault(pool, "frozen", spec(), lambda p: os.kill(p.pids[0], signal.SIGSTOP))
    assert out.status == "timeout", out
    assert "rank 0" in out.error and "stopped" in out.error and "no progress" in out.error, out.error
    assert 10 <= detect_s < 30, detect_s
    assert_nothing_left(pids, port)
    print(f"rank SIGSTOP: detected {detect_s:.1f}s after the stop")


def test_the_launcher_killed_mid_window_fails_the_trial_and_leaves_no_rank(pool):
    out, detect_s, pids, port = run_with_fault(pool, "launcher", spec(), lambda p: os.kill(p.launcher.proc.pid, signal.SIGKILL))
    assert out.status == "failed", out
    assert "launcher ended" in out.error and "SIGKILL" in out.error, out.error
    assert_nothing_left(pids, port)
    print(f"launcher SIGKILL: outcome {detect_s:.1f}s after the kill")


def test_a_loss_that_turns_nan_is_diverged_at_the_step_it_started(pool):
    """LLMBENCH_TEST_NAN makes step 5's loss NaN: its gradients and then DeepSpeed's weights
    become NaN, a real divergence. Both ranks say diverged at step 5, read after the window."""
    out = pool.run("nan", spec(steps=8), 300)
    assert out.reported, out
    for r in out.results:
        assert r["status"] == "diverged", r
        assert f"at step {NAN_STEP} " in r["error"] and f"window's step {NAN_STEP - WARMUP + 1} of 8" in r["error"], r["error"]
        assert all(x == x for x in r["losses"][:NAN_STEP - WARMUP])  # finite before it (the unpoisoned trials: ok)


def test_a_trial_past_the_rank_memory_limit_is_oom_and_the_next_one_runs(pool):
    """The ranks" RLIMIT_DATA (1.5 GiB here, --rank-memory) turns a trial far too large (1.3B
    parameters, 5 GB of fp32 weights a rank) into the allocator's own error: oom, on every
    rank, without the host's OOM killer; the next trial runs."""
    out = pool.run("huge", spec(model="1.3b", steps=2, seq_len=16, micro_batch=1), 300)
    assert out.reported, out
    for r in out.results:
        assert r["status"] == "oom", r
        assert "RLIMIT_DATA 1.50 GiB" in r["error"], r["error"]
    ok = pool.run("small", spec(steps=4), 300)
    assert ok.reported and all(r["status"] == "ok" for r in ok.results), ok


# -- the rules on their own ----------------------------------------------------------------------

def test_an_exit_status_names_the_signal_as_each_launcher_reports_it():
    """Statuses made by real processes: Python's sys.exit(-9) (what DeepSpeed's launch.py does
    with a rank's −9), a shell's 128 + 9, Popen's −9 for a child killed by SIGKILL."""
    import subprocess
    import sys

    from llmbench.launch.exits import describe_exit, signal_of

    py = subprocess.run([sys.executable, "-c", "import sys; sys.exit(-9)"]).returncode
    sh = subprocess.run(["bash", "-c", "bash -c 'kill -9 $$'; exit $?"]).returncode
    killed = subprocess.Popen(["sleep", "30"])
    killed.kill()
    popen = killed.wait()
    assert (py, sh, popen) == (247, 137, -9)
    assert signal_of(py) == signal_of(sh) == signal_of(popen) == signal.SIGKILL
    assert describe_exit(py) == "killed by SIGKILL (exit status 247)"
    assert describe_exit(1) == "exit code 1" and describe_exit(0) == "exit code 0" and describe_exit(None) == "still running"
    assert signal_of(256 - 15) == signal.SIGTERM and signal_of(255) is None  # 255: ssh's own error


def test_a_skipped_fp16_overflow_is_not_divergence_and_a_nan_loss_otherwise_is():
    from llmbench.failures import first_divergence

    inf, nan = float("inf"), float("nan")
    assert first_divergence([2.0, inf, 1.9], [False, True, False], 10) is None   # fp16: overflow, skipped
    assert first_divergence([2.0, inf, 1.9], [], 10) == (11, inf)                 # bf16/fp32: diverged at 11
    step, loss = first_divergence([2.0, 1.9, nan, nan], [False, False, False, True], 3)
    assert step == 5 and loss != loss


def test_the_watchdog_waits_twenty_median_steps_or_ten_seconds():
    from llmbench.launch.watchdog import Progress

    p = Progress()
    for k in range(3):  # rank 0 and 1: a step every 0.1 s from t = 100
        p.beat(0, k, True, now=100 + 0.1 * k)
        p.beat(1, k, True, now=100 + 0.1 * k)
    assert p.threshold_s() == 10.0                                   # 20 × 0.1 s < the 10 s floor
    assert p.stalled(set(), now=100.2 + 9.9) is None
    assert set(p.stalled(set(), now=100.2 + 10.1)) == {0, 1}
    assert set(p.stalled({1}, now=100.2 + 10.1)) == {0}               # rank 1 reported its result
    slow = Progress()
    for k in range(3):
        slow.beat(0, k, True, now=2.0 * k)
    assert slow.threshold_s() == 40.0 and slow.stalled(set(), now=4 + 39) is None  # 20 × 2 s
    off = Progress()
    for k in range(3):
        off.beat(0, k, False, now=k)                                 # after the window: not watched
    assert off.stalled(set(), now=1000) is None
    young = Progress()
    young.beat(0, 0, True, now=0)
    young.beat(0, 1, True, now=0.1)                                   # two beats: the first step's costs
    assert young.stalled(set(), now=1000) is None
