"""TrialSpec (+ an optional base DeepSpeed config) → the DeepSpeed config a trial runs with."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from typing import get_args

from .spec import FP16_KNOBS, LrSchedule, SpecError, TrialSpec

NEVER = 10**9  # steps_per_print: DeepSpeed's periodic logging stays out of the timed window


def persistence_threshold(spec: TrialSpec, hidden_size: int) -> int:
    """ZeRO-3's `stage3_param_persistence_threshold` for this trial.

    DeepSpeed keeps every parameter with at most this many elements whole on every rank
    (default 1e5). For the tiny CPU model nearly every tensor is under 1e5, so the default
    would make ZeRO-3 partition nothing; min(1e5, hidden size) keeps the intent (norms and
    biases persist, weight matrices are partitioned) at every size.
    """
    if spec.param_persistence_threshold is not None:
        return spec.param_persistence_threshold
    return min(100_000, hidden_size)


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_base_config(path: str | Path) -> dict:
    """A user's DeepSpeed config (JSON), the starting point of every trial."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"--base-config {p}: no such file")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise SpecError(f"--base-config {p}: line {e.lineno}: malformed JSON: {e.msg}") from None
    if not isinstance(cfg, dict):
        raise SpecError(f"--base-config {p}: a DeepSpeed config is a JSON object")
    return cfg


def axes_from_base_config(base: dict) -> dict:
    """The axis values a base config implies; suites and --set override them.

    Hugging Face style "auto" values are treated as absent.
    """
    def val(*keys):
        d = base
        for k in keys:
            if not isinstance(d, dict) or k not in d:
                return None
            d = d[k]
        return None if d == "auto" else d

    out: dict = {}
    for axis, keys in {"micro_batch": ("train_micro_batch_size_per_gpu",), "grad_accum": ("gradient_accumulation_steps",),
                       "zero_stage": ("zero_optimization", "stage"), "overlap_comm": ("zero_optimization", "overlap_comm"),
                       "contiguous_gradients": ("zero_optimization", "contiguous_gradients"),
                       "reduce_bucket_size": ("zero_optimization", "reduce_bucket_size"),
                       "allgather_bucket_size": ("zero_optimization", "allgather_bucket_size"),
                       "param_persistence_threshold": ("zero_optimization", "stage3_param_persistence_threshold")}.items():
        v = val(*keys)
        if v is not None:
            out[axis] = int(v) if isinstance(v, float) and v.is_integer() else v
    if "auto" in (base.get("bf16", {}).get("enabled"), base.get("fp16", {}).get("enabled")):
        out["precision"] = "auto"  # Hugging Face's "auto": let the device decide, as llmbench's auto does
    elif val("bf16", "enabled") or val("bfloat16", "enabled"):
        out["precision"] = "bf16"
    elif val("fp16", "enabled"):
        out["precision"] = "fp16"
        for k in FP16_KNOBS:
            if val("fp16", k) is not None:
                out[k] = val("fp16", k)
    elif "bf16" in base or "fp16" in base:
        out["precision"] = "fp32"
    lr = val("optimizer", "params", "lr")
    if isinstance(lr, (int, float)) and not isinstance(lr, bool):
        out["lr"] = lr  # the optimizer's lr, which runs; a WarmupLR/WarmupDecayLR peak replaces it below
    sched = base.get("scheduler")
    if isinstance(sched, dict) and sched.get("type") is not None:
        kind = sched["type"]
        if kind not in get_args(LrSchedule):
            raise SpecError(f"--base-config: scheduler type {kind!r} is not a schedule llmbench sweeps; "
                            f"lr_schedule takes {', '.join(get_args(LrSchedule))}")
        out["lr_schedule"] = kind
        peak = val("scheduler", "params", "warmup_max_lr")
        if kind in ("WarmupLR", "WarmupDecayLR") and isinstance(peak, (int, float)) and not isinstance(peak, bool):
            out["lr"] = peak  # these schedulers overwrite the optimizer's lr with their warmup_max_lr
        for axis, key in (("lr_warmup_steps", "warmup_num_steps"), ("lr_total_steps", "total_num_steps"),
                          ("lr_min_ratio", "cos_min_ratio"), ("lr_warmup_type", "warmup_type")):
            if val("scheduler", "params", key) is not None and not (kind == "WarmupLR" and axis == "lr_total_steps"):
                out[axis] = val("scheduler", "params", key)
    off_opt = val("zero_optimization", "offload_optimizer", "device") in ("cpu", "nvme")
    off_par = val("zero_optimization", "offload_param", "device") in ("cpu", "nvme")
    if off_opt or off_par:
        out["offload"] = "optimizer+params" if off_par else "optimizer"
    return out


def scheduler_section(spec: TrialSpec, peak_lr: float, base_params: dict | None = None) -> dict | None:
    """DeepSpeed's `scheduler` section for the trial's lr_schedule (None: constant, no section).

    Parameter names and defaults are deepspeed.runtime.lr_schedules' (WarmupLR, WarmupDecayLR,
    WarmupCosineLR; https://www.deepspeed.ai/docs/config-json/#scheduler-parameters). Defaults
    made for a trial of tens of steps: TrialSpec.lr_steps (the extra passes after the window
    run past the total). WarmupLR and WarmupDecayLR rise from 0 to `peak_lr` (the optimizer's
    lr, which they would otherwise overwrite with their warmup_max_lr default 1e-3);
    WarmupCosineLR scales the optimizer's lr by its ratios. `base_params`: a base config's
    scheduler parameters of the same type, whose warmup_min_lr and warmup_min_ratio are kept
    (its warmup_max_lr is the `lr` axis, its other parameters the knobs: axes_from_base_config).
    DeepSpeed's defaults for warmup_type (log) and cos_min_ratio (1e-4) are written out, so one
    schedule has one section (and one identity) whether the knob was given or not.
    """
    if spec.lr_schedule == "constant":
        return None
    warm, total = spec.lr_steps()
    kept = {k: v for k, v in (base_params or {}).items()
            if k in ("warmup_min_lr", "warmup_min_ratio") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    params: dict = {"warmup_num_steps": warm, "warmup_type": spec.lr_warmup_type or "log"}
    if spec.lr_schedule in ("WarmupLR", "WarmupDecayLR"):
        params.update(warmup_min_lr=kept.get("warmup_min_lr", 0.0), warmup_max_lr=peak_lr)
    if spec.lr_schedule in ("WarmupDecayLR", "WarmupCosineLR"):
        params["total_num_steps"] = total
    if spec.lr_schedule == "WarmupCosineLR":
        params["cos_min_ratio"] = spec.lr_min_ratio if spec.lr_min_ratio is not None else 1e-4
        if "warmup_min_ratio" in kept:
            params["warmup_min_ratio"] = kept["warmup_min_ratio"]
    return {"type": spec.lr_schedule, "params": params}


def ds_config(spec: TrialSpec, accelerator: str, hidden_size: int, base: dict | None = None,
              ranks_per_node: int | None = None) -> dict:
    """A real DeepSpeed config (https://www.deepspeed.ai/docs/config-json/).

    The base config, when given, is the starting point; the trial's axes override only the
    keys they define, and measurement hygiene (no periodic prints, no synchronising timers)
    is always enforced.
    """
    if spec.precision not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"precision {spec.precision!r} must be resolved for the device before a DeepSpeed config "
                         f"is made (llmbench.precision.resolve)")
    base = copy.deepcopy(base or {})
    zero: dict = {"stage": spec.zero_stage}
    for knob in ("overlap_comm", "contiguous_gradients", "reduce_bucket_size", "allgather_bucket_size"):
        if getattr(spec, knob) is not None:
            zero[knob] = getattr(spec, knob)
    if spec.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = persistence_threshold(spec, hidden_size)
    pin = accelerator == "cuda"
    if spec.offload in ("optimizer", "optimizer+params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if spec.offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    if spec.quant in ("zeropp-qw", "zeropp"):
        zero["zero_quantized_weights"] = True
    if spec.quant in ("zeropp-qg", "zeropp"):
        zero["zero_quantized_gradients"] = True
    if spec.quant in ("zeropp-hpz", "zeropp"):
        # DeepSpeed's guidance: the secondary (hpZ) partition spans one node's GPUs.
        zero["zero_hpz_partition_size"] = ranks_per_node or spec.world_size
    # A stage change invalidates the base's offload sections unless this trial offloads.
    base_zero = base.get("zero_optimization", {})
    if spec.offload == "none":
        base_zero.pop("offload_optimizer", None)
        base_zero.pop("offload_param", None)
    if "optimizer" not in base:
        base["optimizer"] = {"type": "AdamW", "params": {"lr": spec.lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}}
    opt = base["optimizer"]
    if "lr" in opt.get("params", {}):
        opt["params"]["lr"] = spec.lr  # the lr axis (a base's own lr is its default: axes_from_base_config)
    if accelerator == "cpu" and spec.offload == "none" and opt.get("type", "").lower() in ("adam", "adamw"):
        # FusedAdam would JIT-build a CUDA-style op on CPU (~30 s); torch's AdamW is the CPU path.
        opt.setdefault("params", {})["torch_adam"] = True
    # The schedule is the trial's lr_schedule axis (a base config's own is read into it:
    # axes_from_base_config), so the base's section never survives beside it.
    base_sched = base.pop("scheduler", None)
    same = isinstance(base_sched, dict) and base_sched.get("type") == spec.lr_schedule
    sched = scheduler_section(spec, spec.lr,
                              base_sched.get("params") if same and isinstance(base_sched.get("params"), dict) else None)
    if sched is not None:
        base["scheduler"] = sched
    fp16 = {"enabled": spec.precision == "fp16"}
    if spec.precision == "fp16":
        fp16.update({"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                     "min_loss_scale": 1})
        fp16.update({k: getattr(spec, k) for k in FP16_KNOBS if getattr(spec, k) is not None})
    base.pop("bfloat16", None)
    ours = {
        "train_batch_size": spec.global_batch,
        "train_micro_batch_size_per_gpu": spec.micro_batch,
        "gradient_accumulation_steps": spec.grad_accum,
        "zero_optimization": zero,
        "bf16": {"enabled": spec.precision == "bf16"},
        "fp16": fp16,
        "steps_per_print": NEVER,
        # DeepSpeed's throughput timer is on by default and synchronises the device every
        # step; the wall-clock breakdown synchronises too. Both stay off while we measure.
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
        "wall_clock_breakdown": False,
    }
    base.setdefault("gradient_clipping", 1.0)
    if spec.precision != "fp16":
        base.pop("fp16", None)
    return _merge(base, ours)
