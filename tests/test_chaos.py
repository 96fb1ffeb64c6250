"""The driver SIGKILLed in its most fragile phases, then resumed: every trial stored exactly
once, none lost, no process or shared-memory segment left (docs/faults.md).

In CI: three kills at fixed phases (LLMBENCH_TEST_PAUSE stops the driver inside the phase: a
pool start with its ranks launched and not yet joined, a SQLite transaction begun and not
committed, a merge half done). Behind `slow`: twenty kills across one sweep and the merges of
its files, at seeded random moments or paused phases, the phase each hit read from
LLMBENCH_PHASE_LOG."""

import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import llmbench, cli
from llmbench.launch.process import extensions_dir

SUITE = ("name: chaos\nfixed: {model: tiny, precision: fp32, seq_len: 32, micro_batch: 2, warmup_steps: 2, steps: 3,"
         " breakdown_steps: 0, rounds: 2}\ngrid: {zero_stage: [0, 3]}\n")
TRIALS = ["z0", "z3"]


def _sweep(tmp_path: Path, *args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llmbench.cli", "sweep", str(tmp_path / "chaos.yaml"), "--db",
                             str(tmp_path / "c.db"), "--out", str(tmp_path / "out"), "--no-prune", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _kill_when_paused(proc: subprocess.Popen, log: Path, phase: str, timeout: float = 240) -> None:
    """Wait until this driver logs that it paused in `phase`, then SIGKILL it."""
    deadline = time.monotonic() + timeout
    while not (log.exists() and f" {proc.pid} paused {phase}\n" in log.read_text()):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, f"never paused in {phase}"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _launched_by(driver_pid: int) -> list[psutil.Process]:
    """Every process of the driver's pools, wherever it was reparented: the launcher, DeepSpeed's
    launch.py and the ranks all carry the pool's key file, named pool-HOST-PID-*.key."""
    mark = f"pool-{socket.gethostname()}-{driver_pid}-"
    out = []
    for p in psutil.process_iter(["cmdline"]):
        if any(mark in a for a in (p.info["cmdline"] or [])):
            out.append(p)
    return out


SHM_BEFORE = set(Path("/dev/shm").glob("deepspeed_*"))  # whatever was there before these tests (not theirs)


def _assert_clean(driver_pid: int, timeout: float = 30) -> None:
    """Nothing the killed driver launched outlives it (ranks see its control socket close, or
    fail to reach it, and leave; DeepSpeed's launcher then ends), no shared-memory segment of
    theirs, no JIT-build lock."""
    deadline = time.monotonic() + timeout
    while (left := _launched_by(driver_pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, [p.info["cmdline"] for p in left]
    assert not set(Path("/dev/shm").glob("deepspeed_*")) - SHM_BEFORE, "leaked /dev/shm segment"
    ext = extensions_dir()
    assert not (list(ext.rglob("lock")) if ext.exists() else []), "stale JIT-build lock"


def _stored(db: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as c:
        return c.execute("SELECT trial_id, status FROM trials ORDER BY seq").fetchall()


def test_three_kills_at_fixed_phases_then_resume_lose_nothing(tmp_path):
    (tmp_path / "chaos.yaml").write_text(SUITE)
    log = tmp_path / "phases.log"
    db = tmp_path / "c.db"
    base = dict(os.environ, LLMBENCH_PHASE_LOG=str(log))

    # 1. a pool start: the ranks launched, the driver killed before they joined
    proc = _sweep(tmp_path, env=dict(base, LLMBENCH_TEST_PAUSE="pool-start"))
    _kill_when_paused(proc, log, "pool-start")
    _assert_clean(proc.pid)
    with sqlite3.connect(db) as c:
        (run_id,), = c.execute("SELECT run_id FROM runs").fetchall()
    assert _stored(db) == []

    # 2. the second commit (trials run in interleaved rounds: z0's first round is stored, z3's
    #    first is in its transaction): killed before COMMIT
    proc = _sweep(tmp_path, "--resume", run_id, env=dict(base, LLMBENCH_TEST_PAUSE="store-commit:2"))
    _kill_when_paused(proc, log, "store-commit")
    _assert_clean(proc.pid)
    with sqlite3.connect(db) as c:
        stored = [json.loads(r) for (r,) in c.execute("SELECT record_json FROM trials")]
    assert [(r["trial_id"], r["status"], r["rounds_done"]) for r in stored] == [("z0", "ok", 1)]  # z3's rolled back

    # resumed to the end: z0, killed before its last round, runs again whole; each step stored once
    llmbench("sweep", str(tmp_path / "chaos.yaml"), "--db", str(db), "--out", str(tmp_path / "out"), "--no-prune",
             "--resume", run_id, env=base)
    recs = [json.loads(x) for x in cli("results", run_id, "--db", str(db), "--format", "json").stdout.splitlines()]
    assert sorted(r["trial_id"] for r in recs) == TRIALS and all(r["status"] == "ok" for r in recs), recs
    for r in recs:
        assert r["rounds_done"] == 2 and len(r["step_times_s"]) == 2 * r["steps"], r["trial_id"]
        assert r["tokens_per_s"] * r["window_s"] == pytest.approx(2 * r["steps"] * r["global_batch"] * r["seq_len"])
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT COUNT(*) FROM steps WHERE run_id=?", (run_id,)).fetchone()[0] == sum(2 * r["steps"] for r in recs)

    # 3. a merge of the run's result files into another store, killed half done, then run again
    db2 = tmp_path / "merged.db"
    folder = tmp_path / "out" / "results" / run_id
    p = subprocess.Popen([sys.executable, "-m", "llmbench.cli", "merge", str(folder), "--db", str(db2), "--no-report"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=dict(base, LLMBENCH_TEST_PAUSE="merge:1"))
    _kill_when_paused(p, log, "merge")
    assert len(_stored(db2)) == 1  # one trial merged (each in its own commit) when it was killed
    llmbench("merge", str(folder), "--db", str(db2), "--no-report")
    with sqlite3.connect(db) as a, sqlite3.connect(db2) as b:
        q = "SELECT trial_id, record_json FROM trials ORDER BY trial_id"
        assert [(t, json.loads(r)) for t, r in a.execute(q)] == [(t, json.loads(r)) for t, r in b.execute(q)]
        assert b.execute("SELECT COUNT(*) FROM steps").fetchone() == a.execute("SELECT COUNT(*) FROM steps").fetchone()
    events = [ln.split()[2:] for ln in log.read_text().splitlines()]
    assert ["paused", "pool-start"] in events and ["paused", "store-commit"] in events and ["paused", "merge"] in events


def _open_phase(log: Path, pid: int, at: float) -> str:
    """The innermost phase the driver `pid` had begun and not ended at time `at` ("-": none)."""
    open_: list[str] = []
    for line in log.read_text().splitlines():
        t, p, event, name = line.split()
        if int(p) != pid or float(t) > at:
            continue
        if event == "begin":
            open_.append(name)
        elif event == "end" and name in open_:
            open_.remove(name)
    return open_[-1] if open_ else "-"


@pytest.mark.slow
def test_twenty_kills_across_one_sweep(tmp_path):
    """Sweeps of the smoke suite in 2 rounds (8 trial-rounds each, each committed to SQLite and
    mirrored into result files), their driver SIGKILLed 20 times, each kill followed by
    --resume; and merges of their result files into a second store, killed too. Each kill falls
    at a seeded random moment 2-30 s after the start, or (about two thirds, and the first two,
    so every fragile phase is hit) paused in a chosen phase: a pool start, a store commit, a
    merge. An invocation that ends before its kill does not count; a sweep that completes is
    followed by a new one. The figures: docs/faults.md."""
    rng = random.Random(19)
    db, merged, log = tmp_path / "c.db", tmp_path / "merged.db", tmp_path / "phases.log"
    base = dict(os.environ, LLMBENCH_PHASE_LOG=str(log))
    sweep = [sys.executable, "-m", "llmbench.cli", "sweep", "smoke", "--set", "rounds=2", "--db", str(db), "--out",
             str(tmp_path / "out")]
    hits: list[str] = []
    runs: list[str] = []
    current, k = None, 0

    def new_run_id() -> str | None:
        with sqlite3.connect(db) as c:
            ids = [r for (r,) in c.execute("SELECT run_id FROM runs ORDER BY created_at")]
        fresh = [r for r in ids if r not in runs]
        return fresh[-1] if fresh else None

    while len(hits) < 20:
        k += 1
        assert k < 100, hits
        pause = ["pool-start", "store-commit"][len(hits)] if len(hits) < 2 else \
            rng.choice(["pool-start", "store-commit:2", "merge", "merge", None, None])
        if pause == "merge" and not runs:
            continue
        if pause == "merge":
            cmd = [sys.executable, "-m", "llmbench.cli", "merge", str(tmp_path / "out" / "results"), "--db", str(merged),
                   "--no-report"]
        else:
            cmd = sweep + (["--resume", current] if current else [])
        env = dict(base, LLMBENCH_TEST_PAUSE=pause) if pause else base
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        if pause:
            try:
                _kill_when_paused(proc, log, pause.split(":")[0], timeout=120)
                hit = pause.split(":")[0]
            except AssertionError:  # ended before reaching the phase: not a kill
                proc.kill()
                proc.wait()
                hit = None
        else:
            time.sleep(rng.uniform(2, 30))
            at = time.time()
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                hit = _open_phase(log, proc.pid, at)
            else:
                hit = None  # finished first: not a kill
        if "merge" not in cmd:
            if current is None:
                current = new_run_id()
                if current:
                    runs.append(current)
            if hit is None and proc.returncode == 0:
                current = None  # that sweep is complete: the next kills go to a new one
        if hit is None:
            continue
        _assert_clean(proc.pid)
        with sqlite3.connect(db) as c:
            rounds = sum(json.loads(r)["rounds_done"] for (r,) in c.execute("SELECT record_json FROM trials"))
        hits.append(f"{hit} ({rounds} rounds stored, {len(runs)} run(s))")
    if current:
        llmbench(*sweep[3:], "--resume", current, env=base)
    llmbench("merge", str(tmp_path / "out" / "results"), "--db", str(merged), "--no-report", env=base)
    print("kills hit:", hits)
    for store in (db, merged):
        with sqlite3.connect(store) as c:
            for run_id in runs:
                rows = c.execute("SELECT trial_id, status, record_json FROM trials WHERE run_id=?", (run_id,)).fetchall()
                steps = c.execute("SELECT COUNT(*) FROM steps WHERE run_id=?", (run_id,)).fetchone()[0]
                assert sorted(t for t, _, _ in rows) == ["z0", "z1", "z2", "z3"], (run_id, rows)
                assert all(s == "ok" for _, s, _ in rows), rows
                recs = [json.loads(r) for _, _, r in rows]
                assert all(r["rounds_done"] == 2 for r in recs)
                assert steps == sum(len(r["step_times_s"]) for r in recs)  # each step stored once
    assert {"pool-start", "store-commit", "merge"} <= {h.split()[0] for h in hits}, hits
