import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def llmbench(*args, cwd=None, timeout=900, check=True):
    """Run the real CLI in a subprocess, as a user would."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, "-m", "llmbench.cli", *args], capture_output=True, text=True, cwd=cwd,
                       timeout=timeout, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"llmbench {' '.join(args)} exited {p.returncode}\nstdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-4000:]}")
    return p


@pytest.fixture(scope="session")
def zero_sweep(tmp_path_factory):
    """One real `llmbench sweep zero` (2 gloo ranks, DeepSpeed CPU accelerator) feeding many tests."""
    root = tmp_path_factory.mktemp("zero")
    db, out = root / "llmbench.db", root / "reports"
    p = llmbench("sweep", "zero", "--db", str(db), "--out", str(out), "--label", "ci")
    records = [json.loads(line) for line in llmbench("results", "--db", str(db), "--format", "json").stdout.splitlines()]
    return {"db": db, "out": out, "stdout": p.stdout, "stderr": p.stderr, "records": records}
