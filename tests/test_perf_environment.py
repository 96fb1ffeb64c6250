"""Perf gates that cannot quietly stop gating: CI installs the baseline's software, and under
CI another software fingerprint fails instead of skipping (llmbench.perfgate)."""

import json
import re
import warnings
from pathlib import Path

import pytest

from llmbench.perfgate import Baseline, require_environment, software_fingerprint

ROOT = Path(__file__).resolve().parents[1]


def test_ci_installs_the_software_the_baseline_was_measured_with():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.strip().lower()] = version.strip()
    fingerprint = json.loads((ROOT / "tests/perf/baseline.json").read_text())["fingerprint"]["software"]
    for dist in ("torch", "deepspeed", "transformers"):
        assert pins[dist] == fingerprint[dist].split("+")[0], dist
    ci = (ROOT / ".ci/run").read_text()
    installs = [ln for ln in ci.splitlines() if re.search(r"pip install", ln) and not ln.lstrip().startswith("#")]
    assert installs and all("-c constraints.txt" in ln for ln in installs), installs
    assert 'CI="${CI:-true}"' in ci


def baseline(tmp_path, **software):
    here = software_fingerprint()
    from llmbench.perfgate import hardware_fingerprint

    fp = {"software": {**here, **software}, "hardware": hardware_fingerprint()}
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"fingerprint": fp, "metrics": {}}))
    return Baseline.load(path)


def test_other_software_fails_under_ci_and_skips_elsewhere(tmp_path, monkeypatch):
    b = baseline(tmp_path, deepspeed="0.0.1")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="deepspeed: baseline '0.0.1'"):
        require_environment(b, "count.x", "count")
    monkeypatch.delenv("CI")
    with warnings.catch_warnings(record=True) as seen, pytest.raises(pytest.skip.Exception):
        warnings.simplefilter("always")
        require_environment(b, "count.x", "count")
    assert any("skipped" in str(w.message) for w in seen)


def test_other_hardware_skips_the_ratios_even_under_ci(tmp_path, monkeypatch):
    b = baseline(tmp_path)
    b.fingerprint["hardware"]["cpu_capability"] = "AVX2-elsewhere"
    monkeypatch.setenv("CI", "true")
    with pytest.warns(UserWarning, match="skipped"), pytest.raises(pytest.skip.Exception):
        require_environment(b, "ratio.x", "ratio")
    require_environment(b, "count.x", "count")  # counts do not depend on the CPU: they run
