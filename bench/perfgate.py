"""Baseline gates for a pytest-benchmark suite: a committed baseline, an environment
fingerprint, a margin per metric.

Only what is stable on a shared machine is gated: counts that do not depend on time (FLOPs,
parameters, model-state bytes) and ratios measured in one run, interleaved against a
reference (llmbench's training step against a bare DeepSpeed loop; one kernel against
another). Absolute times are recorded by pytest-benchmark and reported, never gated here.

- A count is checked only where the software fingerprint (Python, torch, DeepSpeed,
  transformers) matches the baseline's; a ratio also needs the same hardware (accelerator,
  device, cores, CPU capability). Outside CI a different environment skips with a warning.
  Under CI (`CI=true`, which .ci/run sets, installing from constraints.txt) another software
  fingerprint FAILS: a new DeepSpeed or transformers release must not quietly turn every gate
  into a skip. Another CPU still skips the ratios with a warning (CI may run on either kind).
- A metric missing from the baseline fails.
- Whenever a gate fails or a metric is missing, the regenerated baseline (every measured
  value, the margins kept) is printed at the end of the session, for a change that moves
  performance on purpose; `--gate-write-baseline` writes it to the baseline file.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path


def software_fingerprint() -> dict:
    def v(dist):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    import torch

    return {"python": ".".join(platform.python_version_tuple()[:2]), "torch": torch.__version__,
            "deepspeed": v("deepspeed"), "transformers": v("transformers")}


def _public(version):
    """A version without its local build tag: 2.13.0+cpu → 2.13.0 (PEP 440)."""
    return version.split("+")[0] if isinstance(version, str) else version


def hardware_fingerprint() -> dict:
    from .env import detect_hardware

    hw = detect_hardware()
    # Two CPUs of one model name can differ in what decides every bf16 figure (an AVX2 EPYC and
    # an AVX-512 one both say "AMD EPYC"): the torch CPU capability and native bf16 are part of it.
    return {"accelerator": hw.accelerator, "device": hw.device_name, "cores": hw.cpu_cores, "ranks": hw.world_size,
            "cpu_capability": hw.caps.cpu_capability if hw.caps else None, "bf16_native": hw.bf16_native}


@dataclass
class Metric:
    value: float
    kind: str            # "count" (software fingerprint) or "ratio" (software + hardware)
    better: str          # "higher", "lower" or "equal"
    margin: float        # allowed relative change in the worse direction (both for "equal")
    noise_cv: float | None = None
    note: str = ""


@dataclass
class Check:
    name: str
    measured: float
    passed: bool
    message: str


@dataclass
class Baseline:
    path: Path
    fingerprint: dict
    metrics: dict[str, Metric]
    measured: dict[str, tuple[float, Metric]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> "Baseline":
        path = Path(path)
        if not path.exists():
            return cls(path, {}, {})
        raw = json.loads(path.read_text())
        return cls(path, raw.get("fingerprint", {}), {k: Metric(**m) for k, m in raw.get("metrics", {}).items()})

    def env_mismatch(self, kind: str, current: dict | None = None) -> str | None:
        """Why this baseline does not apply to a metric of `kind` here, or None. Software is
        compared by public version (what constraints.txt pins); a build tag (torch's `+cpu`,
        `+cu128`) belongs with the hardware: another build is another machine's torch."""
        current = current or {"software": software_fingerprint(), "hardware": hardware_fingerprint()}
        base = self.fingerprint
        diffs = [f"{k}: baseline {base.get('software', {}).get(k)!r}, here {v!r}"
                 for k, v in current["software"].items()
                 if _public(base.get("software", {}).get(k)) != _public(v)]
        if kind == "ratio":
            diffs += [f"{k}: baseline {base.get('hardware', {}).get(k)!r}, here {v!r}"
                      for k, v in current["hardware"].items() if base.get("hardware", {}).get(k) != v]
            diffs += [f"{k} build: baseline {base.get('software', {}).get(k)!r}, here {v!r}"
                      for k, v in current["software"].items()
                      if _public(base.get("software", {}).get(k)) == _public(v) and base.get("software", {}).get(k) != v]
        return "; ".join(diffs) or None

    def check(self, name: str, measured: float, kind: str, better: str, default_margin: float,
              noise_cv: float | None = None) -> Check:
        """Compare one measured value with the baseline (the caller skips on env mismatch)."""
        base = self.metrics.get(name)
        proposal = Metric(measured, kind, better, base.margin if base else default_margin,
                          noise_cv if noise_cv is not None else (base.noise_cv if base else None),
                          base.note if base else "")
        self.measured[name] = (measured, proposal)
        if base is None:
            self.failures.append(name)
            return Check(name, measured, False, f"{name}: not in the baseline {self.path.name} (measured {measured:.6g})")
        check = self.evaluate(name, measured)
        if not check.passed:
            self.failures.append(name)
        return check

    def evaluate(self, name: str, measured: float) -> Check:
        """Judge a value against the baseline's metric `name`, recording nothing."""
        base = self.metrics[name]
        change = measured / base.value - 1 if base.value else (0.0 if measured == base.value else float("inf"))
        if base.better == "higher":
            ok = change >= -base.margin
        elif base.better == "lower":
            ok = change <= base.margin
        else:
            ok = abs(change) <= base.margin
        msg = (f"{name}: {measured:.6g} vs baseline {base.value:.6g} ({100 * change:+.1f}%, "
               f"{base.better} is better, margin {100 * base.margin:.0f}%)")
        return Check(name, measured, ok, msg)

    def regenerated(self) -> dict:
        metrics = {k: vars(m) for k, m in self.metrics.items()}
        metrics.update({k: vars(p) for k, (_, p) in self.measured.items()})
        return {"fingerprint": {"software": software_fingerprint(), "hardware": hardware_fingerprint()},
                "metrics": dict(sorted(metrics.items()))}


def in_ci() -> bool:
    import os

    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def require_environment(baseline: Baseline, name: str, kind: str) -> None:
    """For a pytest test: go on where the baseline applies here. Another software fingerprint
    fails under CI and skips with a warning elsewhere; other hardware (ratios) skips with a
    warning everywhere."""
    import warnings

    import pytest

    software = baseline.env_mismatch("count")
    if software and in_ci():
        pytest.fail(f"perf gate {name}: CI runs other software than the baseline was measured with ({software}); "
                    f"install from constraints.txt (Python itself is not in it: CI's Python must be the baseline's), "
                    f"or regenerate the baseline and the constraints together (docs/gates.md)")
    why = baseline.env_mismatch(kind)
    if why:
        baseline.failures = [f for f in baseline.failures if f != name]
        warnings.warn(f"perf gate {name} skipped: the baseline comes from another environment ({why})")
        pytest.skip(f"baseline from another environment: {why}")


def assert_gate(baseline: Baseline, name: str, value: float, kind: str, better: str, margin: float,
                noise_cv: float | None = None) -> Check:
    """For a pytest test: fail if `name` is missing from the baseline or worse than its
    margin; where the baseline was measured in another environment, `require_environment`."""
    import pytest

    check = baseline.check(name, value, kind, better, margin, noise_cv)
    if name not in baseline.metrics:
        pytest.fail(check.message + "; the regenerated baseline is printed at the end of the session")
    require_environment(baseline, name, kind)
    assert check.passed, "performance regression: " + check.message
    return check
