"""A trial's identity: every setting that can change a figure, in one canonical form, and its hash.

Two records describe the same trial when their `config_hash` is equal: a SHA-256 over the
canonical JSON (sorted keys, no whitespace, integral floats as integers) of
- the settings its scenario reads (the TrialSpec, with the resolved precision: a training
  trial's without the decode settings, an inference trial's without DeepSpeed's), less what
  cannot change a figure or is counted elsewhere (the schedule's knobs: their resolved values
  are in the DeepSpeed config's `scheduler` section): the toggles of the extra passes after the window (`breakdown_steps`,
  `comms_steps`), the time limit (`timeout_s`), what was asked before resolution
  (`requested_precision`) and how many times the trial is repeated (`rounds`: a one-round
  baseline and a five-round candidate are the same configuration); a local model directory counts by its config, not its path;
  a setting added after schema version 7 (`LATER_SETTINGS`: the learning-rate schedule, pruning)
  counts only when it is not at its default, so a record made before it keeps its hash;
- the model's architecture: its counts (parameters, layers, width, heads, vocabulary) and the
  transformers config keys that change the computation (`ARCHITECTURE`), under one name
  whatever the transformers version calls them (`rope_theta` or `rope_parameters`), so that
  a transformers upgrade does not change every hash;
- the DeepSpeed config passed to `deepspeed.initialize` (a `--base-config` is inside it:
  the trial's axes are merged over it, engine.ds_config), less its paths and logging
  sections (`NOT_DS_IDENTITY`).
Ports, paths, labels, run ids and the software versions stay out: versions are recorded
beside it, in the record's `env`. A record made before llmbench stored its configs (schema
version 2 or older, a trial that never reached the ranks, a CSV export) has no hash
(`config_hash` None): it is matched on its settings and model counts alone (`same`).
`differences` names what differs, as `key: a → b`, nested keys dotted.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

# settings added after schema version 7, with their defaults: left out of the identity at these values
LATER_SETTINGS = {"lr_schedule": "constant", "prune": "none"}
NOT_IDENTITY = frozenset({"breakdown_steps", "comms_steps", "timeout_s", "requested_precision", "rounds",
                          # the schedule's knobs: their resolved values are the DeepSpeed config's scheduler
                          # section (engine.scheduler_section), so a default and its explicit value are one trial
                          "lr_warmup_steps", "lr_total_steps", "lr_min_ratio", "lr_warmup_type"})
COUNTS = ("n_params", "n_embedding_params", "n_layers", "hidden_size", "n_heads", "n_kv_heads", "vocab_size")
# transformers config keys that change what is computed (Llama and GPT-2 names)
ARCHITECTURE = ("model_type", "intermediate_size", "n_inner", "hidden_act", "activation_function", "rms_norm_eps",
                "layer_norm_epsilon", "max_position_embeddings", "n_positions", "tie_word_embeddings", "attention_bias",
                "mlp_bias", "head_dim", "attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "pretraining_tp")
# DeepSpeed config sections that name paths or only log: they change no figure
NOT_DS_IDENTITY = frozenset({"tensorboard", "wandb", "csv_monitor", "comet", "checkpoint", "steps_per_print",
                             "dump_state", "nvme_path", "output_path", "job_name", "aio"})


# what each scenario reads of its settings (inference.py and trainedmodel.py read only these)
INFERENCE_ONLY = frozenset({"decode_batches", "prompt_len", "new_tokens", "eval_batches", "repeats"})
INFERENCE_READS = INFERENCE_ONLY | {"scenario", "model", "family", "seq_len", "micro_batch", "precision", "quant", "prune",
                                    "attn_implementation", "seed", "world_size"}


def settings_fields(scenario: str = "train") -> list[str]:
    """The settings in a trial's identity: those its scenario reads (a training trial's
    identity does not change with the decode settings, an inference trial's not with ZeRO's)."""
    from .spec import TrialSpec

    keep = (lambda k: k in INFERENCE_READS) if scenario == "inference" else (lambda k: k not in INFERENCE_ONLY)
    return [k for k in TrialSpec.model_fields if k not in NOT_IDENTITY and keep(k)]


def _rope(mc: dict) -> dict | None:
    """RoPE's settings under one name: transformers 5 keeps them in `rope_parameters`, 4.x in
    `rope_theta` and `rope_scaling`."""
    rope = dict(mc.get("rope_parameters") or {})
    if mc.get("rope_theta") is not None:
        rope.setdefault("rope_theta", mc["rope_theta"])
    for k, v in (mc.get("rope_scaling") or {}).items():
        rope.setdefault("rope_type" if k == "type" else k, v)
    if rope:
        rope.setdefault("rope_type", "default")  # 4.x: no rope_scaling means the default RoPE
    return rope or None


def _architecture(record: dict) -> dict:
    mc = record.get("model_config") or {}
    arch = {k: mc[k] for k in ARCHITECTURE if mc.get(k) is not None}
    if _rope(mc):
        arch["rope"] = _rope(mc)
    return {**{k: record.get(k) for k in COUNTS}, **arch}


def _ds(cfg: dict | None) -> dict | None:
    if not cfg:
        return None

    def strip(d):
        return {k: strip(v) if isinstance(v, dict) else v for k, v in d.items() if k not in NOT_DS_IDENTITY}

    return strip(cfg)


def _normal(v: Any) -> Any:
    """JSON-equal values equal: tuples as lists, integral floats as integers (5.0 from a CSV is 5)."""
    if isinstance(v, dict):
        return {str(k): _normal(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_normal(x) for x in v]
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def has_configs(record: dict) -> bool:
    """Whether the record carries the configs its identity needs (a training trial's DeepSpeed
    config and, for every trial, the model's)."""
    return bool(record.get("model_config")) and (record.get("scenario", "train") != "train" or bool(record.get("ds_config")))


def identity(record: dict, configs: bool = True) -> dict[str, Any]:
    """The canonical identity of a record (or of a planned trial's provisional record);
    `configs=False`: settings and model counts only (what older records can be matched on)."""
    settings = {k: record.get(k) for k in settings_fields(record.get("scenario") or "train")
                if not (k in LATER_SETTINGS and record.get(k, LATER_SETTINGS[k]) == LATER_SETTINGS[k])}
    model = settings.get("model")
    if isinstance(model, str) and (os.sep in model or model.startswith(".")):
        settings["model"] = "local directory"  # identified by its config, wherever it lies
    out: dict[str, Any] = {"settings": settings, "model": _architecture(record) if configs else
                           {k: record.get(k) for k in COUNTS}}
    if configs:
        out["ds_config"] = _ds(record.get("ds_config"))
    return _normal(out)


def canonical(ident: dict) -> str:
    return json.dumps(ident, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(record: dict) -> str | None:
    """16 hex digits of the SHA-256 of the record's canonical identity; None when the record
    lacks the configs (it is then matched on its settings, `same`)."""
    if not has_configs(record):
        return None
    return hashlib.sha256(canonical(identity(record)).encode()).hexdigest()[:16]


def _lossy_pairs(a: dict, b: dict) -> list[tuple[str, Any, Any]]:
    """Settings and model counts of two records where either lacks its configs: only the keys
    both carry (a CSV export drops list columns, an older record some settings)."""
    later = {f"settings.{k}": v for k, v in LATER_SETTINGS.items()}  # left out at their default: compare them so
    fa, fb = ({**later, **_flat("", identity(r, configs=False), {})} for r in (a, b))
    return [(k, fa[k], fb[k]) for k in sorted(set(fa) & set(fb)) if fa[k] is not None and fb[k] is not None]


def same(a: dict, b: dict) -> bool:
    """The same trial: equal hashes, or, where either has none, equal settings and model
    counts wherever both records carry them."""
    ha = a.get("config_hash") or config_hash(a)
    hb = b.get("config_hash") or config_hash(b)
    if ha and hb:
        return ha == hb
    return all(va == vb for _, va, vb in _lossy_pairs(a, b))


def _flat(prefix: str, value: Any, out: dict) -> dict:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value
    return out


def differences(a: dict, b: dict) -> list[str]:
    """What differs between two records' identities: `key: a → b`, settings first, by name
    (`settings.` is left out of the key: `attn_implementation: sdpa → eager`). Where either
    lacks its configs, only what both carry is compared."""
    show = lambda v: "absent" if v is _MISSING else json.dumps(v, default=str).strip('"')  # noqa: E731
    if has_configs(a) and has_configs(b):
        fa, fb = _flat("", identity(a), {}), _flat("", identity(b), {})
        later = {f"settings.{k}": v for k, v in LATER_SETTINGS.items()}  # left out at their default: show it
        pairs = [(k, fa.get(k, later.get(k, _MISSING)), fb.get(k, later.get(k, _MISSING))) for k in set(fa) | set(fb)]
    else:
        pairs = _lossy_pairs(a, b)
    pairs = sorted(pairs, key=lambda p: (not p[0].startswith("settings."), p[0]))
    return [f"{k.removeprefix('settings.')}: {show(va)} → {show(vb)}" for k, va, vb in pairs if va != vb]


_MISSING = object()
