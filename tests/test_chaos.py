"""The driver SIGKILLed in its most fragile phases, then resumed: every trial stored exactly
once, none lost, no process or shared-memory segment left (docs/faults.md).

In CI: three kills at fixed phases (LLMBENCH_TEST_PAUSE stops the driver inside the phase: a
pool start with its ranks launched and not yet joined, a SQLite transaction begun and not
committed, a merge half done). Behind `slow`: twenty kills of one sharded sweep at seeded
random moments, with the phase each hit read from LLMBENCH_PHASE_LOG."""

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

from helpers import llmbench
from llmbench.launch.process import extensions_dir

SUITE = ("name: chaos\nfixed: {model: tiny, precision: fp32, seq_len: 32, micro_batch: 2, warmup_steps: 2, steps: 3,"
         " breakdown_steps: 0}\ngrid: {zero_stage: [0, 1, 2, 3]}\n")
TRIALS = ["z0", "z1", "z2", "z3"]


def _sweep(tmp_path: Path, *args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llmbench.cli", "sweep", str(tmp_path / "chaos.yaml"), "--db",
                             str(tmp_path / "c.db"), "--out", str(tmp_path / "out"), "--no-prune", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _kill_when_paused(proc: subprocess.Popen, log: Path, phase: str, timeout: float = 240) -> None:
    """Wait until the driver logs that it paused in `phase`, then SIGKILL it."""
    deadline = time.monotonic() + timeout
    while not (log.exists() and f"paused {phase}" in log.read_text()):
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


def _assert_clean(driver_pid: int, timeout: float = 30) -> None:
    """Nothing the killed driver launched outlives it (ranks see its control socket close, or
    fail to reach it, and leave; DeepSpeed's launcher then ends), no shared-memory segment of
    theirs, no JIT-build lock."""
    deadline = time.monotonic() + timeout
    while (left := _launched_by(driver_pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, [p.info["cmdline"] for p in left]
    assert not [p for p in Path("/dev/shm").glob("deepspeed_*") if _owner_gone(p)], "leaked /dev/shm segment"
    ext = extensions_dir()
    assert not (list(ext.rglob("lock")) if ext.exists() else []), "stale JIT-build lock"


def _owner_gone(seg: Path) -> bool:
    """A DeepSpeed CPU-comm segment (deepspeed_allreduce_buffer_*_ADDR_PORT_RANK) whose
    rendezvous port no live process uses."""
    port = seg.name.rsplit("_", 2)[-2]
    for c in psutil.net_connections("tcp"):
        if c.laddr and str(c.laddr.port) == port:
            return False
    return True


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

    # 2. the second trial's commit: inside its SQLite transaction, before COMMIT
    proc = _sweep(tmp_path, "--resume", run_id, env=dict(base, LLMBENCH_TEST_PAUSE="store-commit:2"))
    _kill_when_paused(proc, log, "store-commit")
    _assert_clean(proc.pid)
    assert _stored(db) == [("z0", "ok")]  # the first commit stands, the second was rolled back

    # resumed to the end
    llmbench("sweep", str(tmp_path / "chaos.yaml"), "--db", str(db), "--out", str(tmp_path / "out"), "--no-prune",
             "--resume", run_id, env=base)
    rows = _stored(db)
    assert sorted(t for t, _ in rows) == TRIALS and all(s == "ok" for _, s in rows), rows
    assert rows[0] == ("z0", "ok")  # measured before the kills, kept, not re-run

    # 3. a merge of the run's result files into another store, killed half done, then run again
    db2 = tmp_path / "merged.db"
    folder = tmp_path / "out" / "results" / run_id
    p = subprocess.Popen([sys.executable, "-m", "llmbench.cli", "merge", str(folder), "--db", str(db2), "--no-report"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=dict(base, LLMBENCH_TEST_PAUSE="merge:2"))
    _kill_when_paused(p, log, "merge")
    assert len(_stored(db2)) == 2  # two trials merged (each in its own commit) when it was killed
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
def test_twenty_random_kills_of_a_sharded_sweep(tmp_path):
    """One sweep of the smoke suite as a shard (its trials go to result files, merged into
    SQLite at the end), killed 20 times: at a seeded random moment, or (a third of the kills,
    so every fragile phase is hit) paused in a chosen phase. Each kill is followed by
    --resume. The figures: docs/faults.md."""
    rng = random.Random(19)
    db, log = tmp_path / "c.db", tmp_path / "phases.log"
    base = dict(os.environ, LLMBENCH_PHASE_LOG=str(log))
    args = ["smoke", "--db", str(db), "--out", str(tmp_path / "out"), "--shard", "0/1", "--run-id", "chaos"]
    hits: list[str] = []
    first = True
    for k in range(20):
        pause = rng.choice(["pool-start", "store-commit", "merge", None, None, None]) if k >= 3 else \
            ["pool-start", "store-commit", "merge"][k]
        env = dict(base, LLMBENCH_TEST_PAUSE=pause) if pause else base
        cmd = [sys.executable, "-m", "llmbench.cli", "sweep", *args, *([] if first else ["--resume", "chaos"])]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        first = False
        if pause:
            try:
                _kill_when_paused(proc, log, pause, timeout=120)
            except AssertionError:  # the run ended before reaching the phase (nothing left to do there)
                proc.kill()
                proc.wait()
                hits.append(f"{pause} (not reached)")
                continue
            hits.append(pause)
        else:
            time.sleep(rng.uniform(0.5, 25))
            at = time.time()
            if proc.poll() is not None:
                hits.append("(finished first)")
                continue
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            hits.append(_open_phase(log, proc.pid, at))
        _assert_clean(proc.pid)
    llmbench(*["sweep", *args, "--resume", "chaos"], env=base)
    rows = _stored(db)
    assert sorted(t for t, _ in rows) == ["z0", "z1", "z2", "z3"] and all(s == "ok" for _, s in rows), rows
    print("kills hit:", hits)
    assert {"pool-start", "store-commit", "merge"} <= set(hits), hits
