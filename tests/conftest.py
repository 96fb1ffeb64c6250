import json
import os
import tempfile

import pytest

from helpers import SLOWDOWN, SLOWED, llmbench, cli

# The measured-peak and trained-model caches of this test session start empty and never touch
# the user's ~/.cache/llmbench (fixtures that need their own set LLMBENCH_CACHE and restore it).
os.environ["LLMBENCH_CACHE"] = tempfile.mkdtemp(prefix="llmbench-test-cache-")


@pytest.fixture(scope="session")
def zero_sweep(tmp_path_factory):
    """One real `llmbench sweep zero` (2 gloo ranks, DeepSpeed CPU accelerator) feeding many tests."""
    root = tmp_path_factory.mktemp("zero")
    db, out = root / "llmbench.db", root / "reports"
    p = llmbench("sweep", "zero", "--db", str(db), "--out", str(out), "--label", "ci")
    records = [json.loads(line) for line in cli("results", "--db", str(db), "--format", "json").stdout.splitlines()]
    return {"db": db, "out": out, "stdout": p.stdout, "stderr": p.stderr, "records": records}


@pytest.fixture(scope="session")
def fp32_sweep(tmp_path_factory):
    """A small `llmbench sweep zero` pinned to fp32: the same figures on every kind of CPU."""
    root = tmp_path_factory.mktemp("fp32")
    db = str(root / "f.db")
    llmbench("sweep", "zero", "--set", "precision=fp32", "--set", "micro_batch=2", "--set", "seq_len=32",
             "--set", "steps=3", "--set", "warmup_steps=2", "--db", db, "--out", str(root))
    return [json.loads(x) for x in cli("results", "--db", db, "--format", "json").stdout.splitlines()]


@pytest.fixture(scope="session")
def gate_db(zero_sweep, tmp_path_factory):
    """A copy of the session's store plus two real `llmbench sweep zero` runs: one of the same
    code, and one of 3 rounds in which the test-only LLMBENCH_TEST_SLOWDOWN makes every step
    of z1-mb4 and z2-mb8 twice as long: (store, baseline run id, rerun id, slowed run id)."""
    import os
    import sqlite3

    db = tmp_path_factory.mktemp("gate") / "llmbench.db"
    src, dst = sqlite3.connect(zero_sweep["db"]), sqlite3.connect(db)
    src.backup(dst)
    src.close(), dst.close()
    llmbench("sweep", "zero", "--db", str(db), "--out", str(db.parent / "out"), "--label", "rerun")
    llmbench("sweep", "zero", "--set", "rounds=3", "--db", str(db), "--out", str(db.parent / "out"), "--label", "slowed",
             env=dict(os.environ, LLMBENCH_TEST_SLOWDOWN=f"{SLOWDOWN}:{','.join(SLOWED)}"))
    (a,), (b,), (c,) = sqlite3.connect(db).execute("SELECT run_id FROM runs ORDER BY created_at").fetchall()
    return db, a, b, c


@pytest.fixture(scope="session")
def quant_sweep(tmp_path_factory):
    """One real `llmbench sweep quant`: ZeRO++ training trials on 2 gloo ranks, then the inference
    trials in one process; the trained model's cache starts empty, so this trains once."""
    root = tmp_path_factory.mktemp("quant")
    db, out = root / "llmbench.db", root / "reports"
    old = os.environ.get("LLMBENCH_CACHE")
    os.environ["LLMBENCH_CACHE"] = str(root / "cache")
    try:
        p = llmbench("sweep", "quant", "--db", str(db), "--out", str(out), "--label", "ci-quant")
        records = [json.loads(line) for line in cli("results", "--db", str(db), "--format", "json").stdout.splitlines()]
    finally:
        if old is None:
            os.environ.pop("LLMBENCH_CACHE", None)
        else:
            os.environ["LLMBENCH_CACHE"] = old
    return {"db": db, "out": out, "stdout": p.stdout, "records": {r["trial_id"]: r for r in records},
            "order": [r["trial_id"] for r in records]}


def pytest_addoption(parser):
    parser.addoption("--gate-write-baseline", action="store_true",
                     help="Write the regenerated perf-gate baseline to tests/perf/baseline.json.")
