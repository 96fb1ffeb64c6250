"""Suites and trial specs: validate the input and expand a grid into TrialSpecs.

Axis names are the record's field names, so a suite, `--set` and `llmbench results` speak
one language. Bad input raises `SpecError` with one line naming the file, key and value.
"""

from __future__ import annotations

import itertools
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Precision = Literal["fp32", "fp16", "bf16"]
Offload = Literal["none", "optimizer", "optimizer+params"]


class SpecError(ValueError):
    """Bad input: reported as one line, exit code 2, before anything is launched."""


class TrialSpec(BaseModel):
    """Everything that defines one trial; the worker needs nothing else."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = "tiny"
    family: Literal["llama", "gpt2"] = "llama"
    seq_len: int = Field(128, ge=8)
    micro_batch: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    precision: Precision = "bf16"
    zero_stage: int = Field(0, ge=0, le=3)
    offload: Offload = "none"
    quant: Literal["none"] = "none"
    world_size: int = Field(2, ge=1)
    warmup_steps: int = Field(3, ge=1)
    steps: int = Field(10, ge=2)
    seed: int = 0
    lr: float = Field(1e-3, gt=0)
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    # ZeRO-3 keeps parameters with fewer elements than this whole on every rank. None = auto:
    # min(DeepSpeed's default 1e5, hidden size), so norms and biases persist but every weight
    # matrix is partitioned, even on the tiny CPU model (see engine.ds_config).
    param_persistence_threshold: int | None = Field(None, ge=0)
    timeout_s: float = Field(600.0, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> "TrialSpec":
        if self.offload == "optimizer+params" and self.zero_stage != 3:
            raise ValueError("offload=optimizer+params needs zero_stage 3 (DeepSpeed offloads parameters only in ZeRO-3)")
        if self.offload != "none" and self.zero_stage == 0:
            raise ValueError(f"offload={self.offload} needs zero_stage >= 1")
        return self

    @property
    def global_batch(self) -> int:
        """DeepSpeed's rule: train_batch_size = micro × accumulation × data-parallel ranks."""
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    def trial_id(self, axes: list[str]) -> str:
        """A readable id from the swept axes' values, stable across runs of the same suite."""
        short = {"zero_stage": "z", "micro_batch": "mb", "grad_accum": "ga", "seq_len": "seq",
                 "world_size": "ws", "offload": "off-", "precision": "", "model": "", "quant": "q-"}
        parts = [f"{short.get(a, a + '=')}{getattr(self, a)}" for a in axes]
        return "-".join(parts) or "trial"


AXES = tuple(TrialSpec.model_fields)


class Suite(BaseModel):
    """A named grid plus fixed settings, as written in suites/*.yaml."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    fixed: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)


def builtin_suites() -> dict[str, Path]:
    """Suites shipped inside the package (works from a wheel as well as an editable install)."""
    root = resources.files("llmbench.suites")
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def load_suite(name_or_path: str) -> tuple[Suite, str]:
    """A suite by built-in name or by path; returns it with the file it came from."""
    path = Path(name_or_path)
    if not path.is_file():
        suites = builtin_suites()
        if name_or_path not in suites:
            raise SpecError(f"unknown suite {name_or_path!r}: not a file, and the built-in suites are {', '.join(sorted(suites))}")
        path = suites[name_or_path]
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise SpecError(f"{path}:{where} malformed YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a suite is a mapping with name, fixed and grid; got {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    try:
        suite = Suite.model_validate(raw)
    except ValidationError as e:
        raise SpecError(f"{path}: {_first_error(e)}") from None
    for section in ("fixed", "grid"):
        for key in getattr(suite, section):
            if key not in AXES:
                raise SpecError(f"{path}: {section}.{key}: unknown axis; known axes are {', '.join(AXES)}")
    for key, values in suite.grid.items():
        if not values:
            raise SpecError(f"{path}: grid.{key}: empty list of values")
    return suite, str(path)


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"]) or "value"
    return f"{loc}={err.get('input')!r}: {err['msg']}"


def parse_override(text: str) -> tuple[str, list[str]]:
    """`axis=v1,v2` from `--set`."""
    if "=" not in text:
        raise SpecError(f"--set {text!r}: expected axis=value[,value...]")
    key, _, vals = text.partition("=")
    key = key.strip()
    if key not in AXES:
        raise SpecError(f"--set {key}: unknown axis; known axes are {', '.join(AXES)}")
    values = [yaml.safe_load(v) for v in vals.split(",") if v.strip() != ""]
    if not values:
        raise SpecError(f"--set {key}: no values given")
    return key, values


def expand(suite: Suite, source: str, defaults: dict[str, Any], overrides: list[str] = ()) -> list[tuple[str, TrialSpec]]:
    """Expand the grid (after `--set` overrides) into (trial_id, TrialSpec) pairs, in order."""
    fixed = {**defaults, **{k: v for k, v in suite.fixed.items() if v != "auto"}}
    grid = dict(suite.grid)
    for text in overrides:
        key, values = parse_override(text)
        if len(values) == 1:
            fixed[key] = values[0]
            grid.pop(key, None)
        else:
            grid[key] = values
            fixed.pop(key, None)
    axes = list(grid)
    trials: list[tuple[str, TrialSpec]] = []
    for combo in itertools.product(*grid.values()):
        values = {**fixed, **dict(zip(axes, combo))}
        try:
            spec = TrialSpec.model_validate(values)
        except ValidationError as e:
            raise SpecError(f"{source}: {_first_error(e)}") from None
        trials.append((spec.trial_id(axes), spec))
    ids = [t for t, _ in trials]
    if len(set(ids)) != len(ids):
        raise SpecError(f"{source}: the grid repeats a configuration ({', '.join(sorted({i for i in ids if ids.count(i) > 1}))})")
    return trials
