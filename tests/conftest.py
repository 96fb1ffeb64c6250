import json

import pytest

from helpers import llmbench


@pytest.fixture(scope="session")
def zero_sweep(tmp_path_factory):
    """One real `llmbench sweep zero` (2 gloo ranks, DeepSpeed CPU accelerator) feeding many tests."""
    root = tmp_path_factory.mktemp("zero")
    db, out = root / "llmbench.db", root / "reports"
    p = llmbench("sweep", "zero", "--db", str(db), "--out", str(out), "--label", "ci")
    records = [json.loads(line) for line in llmbench("results", "--db", str(db), "--format", "json").stdout.splitlines()]
    return {"db": db, "out": out, "stdout": p.stdout, "stderr": p.stderr, "records": records}


def pytest_addoption(parser):
    parser.addoption("--gate-write-baseline", action="store_true",
                     help="Write the regenerated perf-gate baseline to tests/perf/baseline.json.")
