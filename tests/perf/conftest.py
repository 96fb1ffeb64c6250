import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/conftest.py's helpers

from llmbench.perfgate import Baseline  # noqa: E402

BASELINE = Path(__file__).with_name("baseline.json")
_STATE: dict = {}


@pytest.fixture(scope="session")
def perf_baseline() -> Baseline:
    if "baseline" not in _STATE:
        _STATE["baseline"] = Baseline.load(BASELINE)
    return _STATE["baseline"]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    baseline = _STATE.get("baseline")
    if baseline is None or not baseline.measured:
        return
    regen = json.dumps(baseline.regenerated(), indent=2)
    if config.getoption("--gate-write-baseline", default=False):
        BASELINE.write_text(regen + "\n")
        terminalreporter.write_line(f"perf gate: wrote the regenerated baseline to {BASELINE}")
    elif baseline.failures:
        terminalreporter.section("perf gate: regenerated baseline")
        terminalreporter.write_line(f"Gates failed or missing: {', '.join(baseline.failures)}. If the change is "
                                    f"intended, replace {BASELINE} with this (or rerun with --gate-write-baseline):")
        terminalreporter.write_line(regen)
