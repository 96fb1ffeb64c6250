"""Suites and trial specs: validate the input and expand a grid into TrialSpecs.

Axis names are the record's field names, so a suite, `--set` and `llmbench results` speak
one language. Bad input raises `SpecError` with one line naming the file, key and value.
"""

from __future__ import annotations

import itertools
import re
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

Precision = Literal["auto", "fp32", "fp16", "bf16"]  # auto: resolved per device before launch (precision.py)
Offload = Literal["none", "optimizer", "optimizer+params"]
# Training (scenario=train): ZeRO++ (Wang et al. 2023): quantized weight all-gather (qw),
# quantized gradients (qg), hierarchical partitioning (hpz), or all three; fp8 = torchao
# float8 linear layers.
TRAIN_QUANT = ("zeropp-qw", "zeropp-qg", "zeropp-hpz", "zeropp", "fp8")
# Inference (scenario=inference): torchao post-training quantization of the linear layers
# (`torchao.quantization.quantize_`): int8 weight-only, int8 dynamic activation + int8
# weight, int4 weight-only, float8 weight-only, float8 dynamic activation + float8 weight.
INFERENCE_QUANT = ("int8-wo", "int8-dyn", "int4-wo", "fp8-wo", "fp8-dyn")
Quant = Literal["none", "zeropp-qw", "zeropp-qg", "zeropp-hpz", "zeropp", "fp8",
                "int8-wo", "int8-dyn", "int4-wo", "fp8-wo", "fp8-dyn"]
Scenario = Literal["train", "inference"]
# Learning-rate schedules: constant (the optimizer's lr throughout: no `scheduler` section) or
# one of DeepSpeed's own schedulers (deepspeed.runtime.lr_schedules, the config's `scheduler`
# section; https://www.deepspeed.ai/docs/config-json/#scheduler-parameters).
LrSchedule = Literal["constant", "WarmupLR", "WarmupDecayLR", "WarmupCosineLR"]
LR_KNOBS = ("lr_warmup_steps", "lr_total_steps", "lr_min_ratio", "lr_warmup_type")
# Pruning (scenario=inference), before any quantization: `magnitude-NN` zeroes the NN% smallest-
# magnitude weights of every decoder linear layer (torch.nn.utils.prune.l1_unstructured, made
# permanent); `2:4` keeps the 2 largest of every 4 consecutive weights (torchao's
# apply_fake_sparsity) and stores them in torch's semi-structured sparse format (torchao
# sparsify_: CUDA only), alone or with fp8-dyn (torchao's 2:4 fp8 packing).
PRUNE_PATTERN = r"none|2:4|magnitude-([1-9][0-9]?)"
PRUNE_WITH_24 = ("none", "fp8-dyn")
FP16_KNOBS = ("loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale")


def compression(prune: str | None, quant: str | None) -> str:
    """The compression an inference trial applies, as reports name it: none, int8-wo,
    magnitude-50, magnitude-50+int8-wo, 2:4+fp8-dyn (pruning first: it is applied first)."""
    return "+".join(p for p in (prune or "none", quant or "none") if p != "none") or "none"


class SpecError(ValueError):
    """Bad input: reported as one line, exit code 2, before anything is launched."""


class TrialSpec(BaseModel):
    """Everything that defines one trial; the worker needs nothing else.

    Field names are the axis names of suites and `--set`, and the record's field names.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # train: DeepSpeed trains the model (the timed optimizer steps); inference: one process
    # measures a trained model's prefill, decode and perplexity, quantized or not (inference.py).
    scenario: Scenario = "train"
    model: str = "tiny"
    family: Literal["llama", "gpt2"] = "llama"
    seq_len: int = Field(128, ge=8)
    micro_batch: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    # `auto` until the plan resolves it for the device (llmbench.precision); then the precision
    # the trial runs at, and `requested_precision` keeps what was asked for.
    precision: Precision = "auto"
    requested_precision: Precision | None = None
    zero_stage: int = Field(0, ge=0, le=3)
    offload: Offload = "none"
    quant: Quant = "none"
    prune: str = "none"
    world_size: int = Field(2, ge=1)
    activation_checkpointing: bool = False
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    compile: bool = False
    # ZeRO knobs; None = DeepSpeed's default (or the base config's value).
    overlap_comm: bool | None = None
    contiguous_gradients: bool | None = None
    reduce_bucket_size: int | None = Field(None, ge=1)
    allgather_bucket_size: int | None = Field(None, ge=1)
    # ZeRO-3 keeps parameters with at most this many elements whole on every rank. None = auto:
    # min(DeepSpeed's default 1e5, hidden size), so norms and biases persist but every weight
    # matrix is partitioned, even on the tiny CPU model (see engine.ds_config).
    param_persistence_threshold: int | None = Field(None, ge=0)
    # fp16 dynamic loss scaling (DeepSpeed's `fp16` section); None = DeepSpeed's default.
    loss_scale: float | None = Field(None, ge=0)
    initial_scale_power: int | None = Field(None, ge=0, le=64)
    loss_scale_window: int | None = Field(None, ge=1)
    hysteresis: int | None = Field(None, ge=1)
    min_loss_scale: float | None = Field(None, gt=0)
    # At least 2: Adam creates its state at the first step, and model-state memory is
    # probed during the last warmup step (never in the timed window).
    warmup_steps: int = Field(3, ge=2)
    steps: int = Field(10, ge=2)
    # Independent replicates of the whole trial (build, warmup, window), interleaved with the
    # other trials of the run: round 1 of every trial, then round 2, ... (sweep.py). The gate
    # tests a trial's rounds against each other's (gate.py); 1 = one window.
    rounds: int = Field(1, ge=1, le=50)
    breakdown_steps: int = Field(3, ge=0)  # extra steps after the window, timed by DeepSpeed's breakdown timers
    comms_steps: int = Field(0, ge=0)  # extra steps recording every collective (synchronising; `--comms`)
    seed: int = 0
    lr: float = Field(1e-3, gt=0)
    # The learning-rate schedule over the trial's optimizer steps (warm-up and window: DeepSpeed
    # steps its scheduler after every optimizer step). Knobs: None = llmbench's default, made
    # for a short trial (engine.scheduler_section): warm-up 10% of the total, total = every
    # optimizer step of the trial through the window, DeepSpeed's cos_min_ratio (1e-4) and
    # DeepSpeed's warmup_type (log).
    lr_schedule: LrSchedule = "constant"
    lr_warmup_steps: int | None = Field(None, ge=2)  # DeepSpeed refuses 0 and raises 1 to 2
    lr_total_steps: int | None = Field(None, ge=1)
    lr_min_ratio: float | None = Field(None, ge=0, le=1)
    lr_warmup_type: Literal["log", "linear"] | None = None
    timeout_s: float = Field(600.0, gt=0)
    # Inference scenario: greedy decoding with the KV cache after a prompt of `prompt_len`
    # tokens, `new_tokens` generated per sequence, at each batch size of `decode_batches`;
    # perplexity over `eval_batches` held-out batches of `micro_batch` × `seq_len` tokens;
    # `repeats` timed repetitions after one warmup.
    decode_batches: tuple[int, ...] = (1, 4, 16)
    prompt_len: int = Field(64, ge=1)
    new_tokens: int = Field(32, ge=2)
    eval_batches: int = Field(16, ge=1)
    repeats: int = Field(6, ge=2)  # 6: the fewest with a 95% interval of the median (collect/stats.py)

    @field_validator("prune", mode="before")
    @classmethod
    def _prune(cls, v: Any) -> Any:
        """none, magnitude-NN (1-99) or 2:4; YAML 1.1 reads an unquoted 2:4 as the base-60 number 124."""
        if v == 124 and not isinstance(v, bool):
            raise ValueError('YAML read 2:4 as the base-60 number 124: quote it, "2:4"')
        if not isinstance(v, str) or not re.fullmatch(PRUNE_PATTERN, v):
            raise ValueError("prune takes none, magnitude-NN (NN from 1 to 99: the percent of each layer zeroed) or 2:4")
        return v

    @field_validator("decode_batches", mode="before")
    @classmethod
    def _batches(cls, v: Any) -> Any:
        """One batch size (`--set decode_batches=4`) or a list of them, each ≥ 1, no repeats."""
        v = (v,) if isinstance(v, int) else v
        if isinstance(v, (list, tuple)):
            if not v or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in v) or len(set(v)) != len(v):
                raise ValueError("decode_batches must be distinct positive integers")
            return tuple(v)
        return v

    def incompatibility(self) -> str | None:
        """Why this combination makes no sense, or None. In a grid such a trial is recorded
        as `skipped` with this reason; asked for alone it is bad input."""
        if self.offload == "optimizer+params" and self.zero_stage != 3:
            return "offload=optimizer+params needs zero_stage 3 (DeepSpeed offloads parameters only in ZeRO-3)"
        if self.offload != "none" and self.zero_stage == 0:
            return f"offload={self.offload} needs zero_stage >= 1 (ZeRO-Offload offloads partitioned states)"
        lr_knobs = [k for k in LR_KNOBS if getattr(self, k) is not None]
        if self.scenario == "inference":
            if self.lr_schedule != "constant" or lr_knobs:
                return "scenario=inference trains nothing: lr_schedule and its knobs are training settings"
            if self.prune == "2:4" and self.quant not in PRUNE_WITH_24:
                return (f"prune=2:4 combines with quant none or fp8-dyn (torchao's 2:4 formats); "
                        f"not with quant={self.quant}")
            if self.quant in TRAIN_QUANT:
                return f"quant={self.quant} is a training method; scenario=inference takes none, {', '.join(INFERENCE_QUANT)}"
            if self.world_size != 1:
                return f"scenario=inference runs in one process: world_size must be 1, not {self.world_size}"
            if self.zero_stage != 0 or self.offload != "none":
                return "scenario=inference does not use DeepSpeed's ZeRO: zero_stage must be 0 and offload none"
            if self.prompt_len + self.new_tokens > self.seq_len:
                return (f"prompt_len + new_tokens = {self.prompt_len + self.new_tokens} exceeds seq_len={self.seq_len}, "
                        f"the context the model was trained on")
            return None
        if self.prune != "none":
            return f"prune={self.prune} is an inference method (a trained model pruned before it is measured); it needs scenario=inference"
        if lr_knobs and self.lr_schedule == "constant":
            return f"{lr_knobs[0]} shapes a learning-rate schedule; lr_schedule=constant has none"
        if self.lr_schedule == "WarmupLR" and self.lr_total_steps is not None:
            return "lr_total_steps: WarmupLR holds the peak after its warm-up and has no total; use WarmupDecayLR or WarmupCosineLR"
        if self.lr_min_ratio is not None and self.lr_schedule != "WarmupCosineLR":
            return (f"lr_min_ratio is WarmupCosineLR's cos_min_ratio; "
                    f"{'WarmupLR holds the peak' if self.lr_schedule == 'WarmupLR' else 'WarmupDecayLR decays to 0'}")
        warm, total = self.lr_steps()
        if self.lr_schedule in ("WarmupDecayLR", "WarmupCosineLR") and warm >= total:
            return (f"a warm-up of {warm} steps{'' if self.lr_warmup_steps is not None else ' (the default, at least 2)'} "
                    f"leaves no decay: lr_total_steps ({total}) must exceed it")
        if self.quant in INFERENCE_QUANT:
            return f"quant={self.quant} is an inference method (torchao post-training quantization); it needs scenario=inference"
        if self.quant.startswith("zeropp") and self.zero_stage != 3:
            return f"quant={self.quant} needs zero_stage 3 (ZeRO++ extends ZeRO-3)"
        knobs = [k for k in FP16_KNOBS if getattr(self, k) is not None]
        if knobs and self.precision != "fp16":
            return f"{knobs[0]} is an fp16 loss-scaling setting; precision={self.precision} does not scale the loss"
        return None

    def lr_steps(self) -> tuple[int, int]:
        """(warm-up, total) optimizer steps of the schedule as DeepSpeed gets them
        (engine.scheduler_section): the knobs, else warm-up 10% of the total (at least 2,
        DeepSpeed's floor; its own default, 1000, outlasts a trial) and total = the trial's
        optimizer steps through the window."""
        total = self.lr_total_steps or self.warmup_steps + self.steps
        return (self.lr_warmup_steps if self.lr_warmup_steps is not None else max(2, round(0.1 * total))), total

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
                 "world_size": "ws", "offload": "off-", "precision": "", "model": "", "quant": "",
                 "activation_checkpointing": "ac-", "compile": "compile-", "attn_implementation": "",
                 "overlap_comm": "oc-", "contiguous_gradients": "cg-", "reduce_bucket_size": "rb",
                 "allgather_bucket_size": "ab", "lr_schedule": "", "prune": ""}
        axes = [a for a in axes if a != "scenario"]
        parts = [f"{short.get(a, a + '=')}{str(getattr(self, a)) if a == 'lr_schedule' else str(getattr(self, a)).lower()}"
                 for a in axes]
        if self.scenario == "inference":
            return "inf-" + ("-".join(parts) or f"{self.model}-{self.quant}-{self.precision}")
        return "-".join(parts) or f"{self.model}-z{self.zero_stage}-mb{self.micro_batch}-ga{self.grad_accum}-{self.precision}"


AXES = tuple(f for f in TrialSpec.model_fields if f != "requested_precision") + ("global_batch",)


class Block(BaseModel):
    """A further grid of a suite: its `fixed` settings extend (and override) the suite's."""

    model_config = ConfigDict(extra="forbid")

    fixed: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)


class Suite(BaseModel):
    """A named grid plus fixed settings, as written in suites/*.yaml.

    `also` lists further grids run in the same sweep (e.g. the quant suite's training grid
    and its inference grid): each block's trials are the suite's `fixed`, then the block's
    `fixed`, then its grid. Trial ids must stay distinct across blocks.
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    fixed: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    also: list[Block] = Field(default_factory=list)

    def blocks(self) -> list[tuple[str, dict[str, Any], dict[str, list[Any]]]]:
        """(where, fixed, grid) of every grid of the suite, in order."""
        out = [("", dict(self.fixed), dict(self.grid))]
        out += [(f"also[{i}].", {**self.fixed, **b.fixed}, dict(b.grid)) for i, b in enumerate(self.also)]
        return out


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
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a suite is a mapping with name, fixed and grid; got {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    try:
        suite = Suite.model_validate(raw)
    except ValidationError as e:
        raise SpecError(f"{path}: {_first_error(e)}") from None
    sections = [("", suite)] + [(f"also[{i}].", b) for i, b in enumerate(suite.also)]
    for where, part in sections:
        for section in ("fixed", "grid"):
            for key in getattr(part, section):
                if key not in AXES:
                    raise SpecError(f"{path}: {where}{section}.{key}: unknown axis; known axes are {', '.join(AXES)}")
        for key, values in part.grid.items():
            if not values:
                raise SpecError(f"{path}: {where}grid.{key}: empty list of values")
    return suite, str(path)


MAX_SUITE_BYTES = 256 * 1024   # the built-in suites are under 2 KiB
MAX_DEPTH = 16                  # mappings and lists inside one another (a suite needs 5 at most: also[].fixed.decode_batches)
MAX_VALUES = 10_000             # values once YAML aliases are expanded (a grid of 10,000 trials is far past useful)


def read_yaml(path: Path) -> Any:
    """A suite file, read safely: at most 256 KiB; no YAML tags (`!!python/...`, `!!binary`,
    `!custom`: a suite holds plain values); nested at most 16 deep; at most 10,000 values with
    aliases expanded (a "billion laughs" of anchors is refused before it is built); then
    yaml.safe_load. SpecError (one line, exit 2) otherwise."""
    size = path.stat().st_size
    if size > MAX_SUITE_BYTES:
        raise SpecError(f"{path}: {size:,} bytes; a suite file is at most {MAX_SUITE_BYTES // 1024} KiB")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, where: str) -> Any:
    """YAML text under read_yaml's rules (`where` names it in errors)."""
    def line(mark) -> str:
        return f" line {mark.line + 1}" if mark is not None else ""

    try:
        depth = 0
        for ev in yaml.parse(text, Loader=yaml.SafeLoader):
            tag = getattr(ev, "tag", None)
            if tag is not None and not isinstance(ev, (yaml.DocumentStartEvent, yaml.DocumentEndEvent)):
                raise SpecError(f"{where}:{line(ev.start_mark)} YAML tag {tag!r}: tags are not read in a suite; write a plain value")
            if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    raise SpecError(f"{where}:{line(ev.start_mark)} nested more than {MAX_DEPTH} deep; a suite needs 5 at most")
            elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        _count_values(node, where)
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise SpecError(f"{where}:{line(mark)} malformed YAML: {getattr(e, 'problem', None) or e}") from None


def _count_values(node, where: str) -> None:
    """Every value the document holds with its aliases expanded, iteratively; past MAX_VALUES: SpecError."""
    n, todo = 0, [node] if node is not None else []
    while todo:
        cur = todo.pop()
        n += 1
        if n > MAX_VALUES:
            raise SpecError(f"{where}: more than {MAX_VALUES:,} values once its YAML aliases (*name) are expanded; "
                            f"a suite is a small grid")
        if isinstance(cur, yaml.MappingNode):
            todo.extend(x for pair in cur.value for x in pair)
        elif isinstance(cur, yaml.SequenceNode):
            todo.extend(cur.value)


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
    texts = [v for v in vals.split(",") if v.strip() != ""]
    values = [parse_yaml(v, f"--set {key}={v}") for v in texts]
    field = TrialSpec.model_fields.get(key)
    if field is not None and field.annotation is str:  # a text axis keeps the text as typed: YAML reads 2:4 as 124
        values = [x if isinstance(x, str) else t.strip() for x, t in zip(values, texts)]
    if not values:
        raise SpecError(f"--set {key}: no values given")
    return key, values


def _drop_base_schedule(values: dict[str, Any], defaults: dict[str, Any], explicit: set) -> None:
    """A base config's schedule (engine.axes_from_base_config: the `defaults`) applies to the
    trials that train with it: none to an inference trial, and its knobs only to a trial whose
    lr_schedule is the base's type (a suite sweeping lr_schedule keeps its constant trials)."""
    for k in ("lr_schedule",) + LR_KNOBS:
        if k in defaults and k not in explicit:
            if values.get("scenario") == "inference" or (k != "lr_schedule" and values.get("lr_schedule") != defaults.get("lr_schedule")):
                values.pop(k, None)


def expand(suite: Suite, source: str, defaults: dict[str, Any], overrides: list[str] = (),
           resolve_precision: Callable[[str], str] | None = None) -> list[tuple[str, TrialSpec, str | None]]:
    """Expand the grid (after `--set` overrides) into (trial_id, TrialSpec, skip reason).

    A combination that makes no sense is kept with its reason (recorded as `skipped`) when
    it comes from a grid; a single explicit configuration that makes no sense is bad input.
    `global_batch` may be given instead of `grad_accum` (DeepSpeed's rule derives it).
    A suite with `also` blocks expands each block the same way; `--set` applies to every block.
    `resolve_precision` turns `auto` into the device's precision (llmbench.precision.resolve)
    before trial ids are made, so ids name the precision the trial really runs at.
    """
    parsed = [parse_override(text) for text in overrides]
    from_cli = {key for key, _ in parsed}
    combos: list[tuple[dict[str, Any], list[str], tuple, set]] = []
    for _, block_fixed, block_grid in suite.blocks():
        fixed = {**defaults, **{k: v for k, v in block_fixed.items() if v != "auto"}}
        grid = dict(block_grid)
        for key, values in parsed:
            if len(values) == 1:
                fixed[key] = values[0]
                grid.pop(key, None)
            else:
                grid[key] = values
                fixed.pop(key, None)
        axes = [a for a in grid if a != "global_batch"] + (["global_batch"] if "global_batch" in grid else [])
        # An inference trial runs in one process: unless world_size is given, it is 1, not the
        # hardware's default number of ranks.
        explicit = {k for k, v in block_fixed.items() if v != "auto"} | set(grid) | from_cli
        if "world_size" not in explicit and (fixed.get("scenario") == "inference" or "scenario" in grid):
            fixed["world_size"] = None
        combos += [(fixed, axes, combo, explicit) for combo in itertools.product(*(grid[a] for a in axes))]
    trials: list[tuple[str, TrialSpec, str | None]] = []
    combos_blocks = suite.blocks()
    for fixed, axes, combo, explicit in combos:
        values = {**fixed, **dict(zip(axes, combo))}
        _drop_base_schedule(values, defaults, explicit)
        if values.get("world_size", 0) is None:  # the default for this trial's scenario
            values["world_size"] = 1 if values.get("scenario") == "inference" else defaults.get("world_size", 2)
        where = ", ".join(f"{a}={v}" for a, v in zip(axes, combo)) or "fixed"
        if "global_batch" in values:
            gb = values.pop("global_batch")
            per_step = values.get("micro_batch", 4) * values.get("world_size", 2)
            if not isinstance(gb, int) or gb < 1 or gb % per_step:
                raise SpecError(f"{source}: global_batch={gb!r} ({where}) is not a positive multiple of "
                                f"micro_batch × world_size = {per_step}")
            values["grad_accum"] = gb // per_step
        if resolve_precision is not None:
            requested = values.get("precision", "auto")
            if requested in get_args(Precision):  # anything else fails validation below
                values["requested_precision"] = requested
                values["precision"] = resolve_precision(requested)
        try:
            spec = TrialSpec.model_validate(values)
        except ValidationError as e:
            field = str(e.errors()[0]["loc"][0]) if e.errors()[0]["loc"] else ""
            raise SpecError(f"{'--set' if field in from_cli else source}: {_first_error(e)}") from None
        reason = spec.incompatibility()
        if reason and len(combos) == 1:
            raise SpecError(f"{source}: {reason}")
        trials.append((spec.trial_id([a if a != "global_batch" else "grad_accum" for a in axes]), spec, reason))
    ids = [t[0] for t in trials]
    if len(set(ids)) != len(ids):
        why = (f"; --set applies to each of the suite's {len(combos_blocks)} grids (its `also` blocks), which then make "
               f"the same trials: write a suite with one grid" if len(combos_blocks) > 1 and parsed else "")
        raise SpecError(f"{source}: the grid repeats a configuration ({', '.join(sorted({i for i in ids if ids.count(i) > 1}))}){why}")
    return trials
