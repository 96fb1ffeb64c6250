"""Helpers shared by the tests."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil


def llmbench(*args, cwd=None, timeout=900, check=True, env=None):
    """Run the real CLI in a subprocess, as a user would (in `env`, else this process's environment)."""
    env = dict(env if env is not None else os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, "-m", "llmbench.cli", *args], capture_output=True, text=True, cwd=cwd,
                       timeout=timeout, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"llmbench {' '.join(args)} exited {p.returncode}\nstdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-4000:]}")
    return p


def cli(*args, env=None, check=True):
    """Run the real console entry point (llmbench.cli.main) in this process, without a
    subprocess's seconds of imports: for commands that launch nothing (results, gate, report,
    plan, --dry-run) and for bad input, refused before anything launches.
    Returns a CompletedProcess with the exit code and what went to stdout and stderr (an
    AssertionError on a non-zero code unless check=False, as llmbench() does)."""
    import contextlib
    import io

    from llmbench.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_env = sys.argv, dict(os.environ)
    sys.argv = ["llmbench", *args]
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
    p = subprocess.CompletedProcess(["llmbench", *args], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"llmbench {' '.join(args)} exited {code}\nstdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-4000:]}")
    return p


# the test-only slowdown of gate_db's third run (conftest.py): every step of these trials twice as long
SLOWDOWN, SLOWED = 1.0, ("z1-mb4", "z2-mb8")


# -- faults injected into a running pool (test_faults.py, test_cluster.py) -------------------------
def run_with_fault(pool, trial_id, spec, fault, at_step=5, timeout_s=300):
    """Run a trial on the pool in a thread; once every rank has reported step `at_step` (counted
    from the first warm-up step, 0; their beats), call fault(pool). Returns (PoolRun, seconds from the fault to the
    outcome, the rank pids, the launch's rendezvous port)."""
    box = {}
    pool.progress = None  # the job's own, once it starts
    th = threading.Thread(target=lambda: box.setdefault("out", pool.run(trial_id, spec, timeout_s)))
    th.start()
    deadline = time.monotonic() + 240
    while True:
        prog = pool.progress
        if prog is not None and len(prog.last) == pool.world_size and all(s >= at_step for _, s in prog.last.values()):
            break
        assert th.is_alive() and time.monotonic() < deadline, f"the trial never reached step {at_step}: {box}"
        time.sleep(0.02)
    pids, port = dict(pool.pids), pool.launcher.master_port
    t0 = time.monotonic()
    fault(pool)
    th.join(timeout_s)
    return box["out"], time.monotonic() - t0, pids, port


def assert_nothing_left(pids, port):
    """No rank process, no DeepSpeed shared-memory segment of that launch, no JIT-build lock."""
    alive = [p for p in pids.values() if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, [psutil.Process(p).cmdline() for p in alive]
    assert not list(Path("/dev/shm").glob(f"deepspeed_*_{port}_*"))
    from llmbench.launch.process import extensions_dir

    ext = extensions_dir()
    assert not (list(ext.rglob("lock")) if ext.exists() else []), "stale JIT-build lock"
    assert not psutil.Process().children(recursive=True)


