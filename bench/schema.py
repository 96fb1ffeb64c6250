"""The trial record's schema: every field once, with its type, unit, part and definition.

A record is what `llmbench results --format json` prints, one per trial. `TrialRecord` is the
one definition: the record a sweep builds starts from its defaults (record.base_record),
every record is validated against it before it is stored (store.add_trial; a key the schema
lacks is refused), `llmbench results --schema` prints it, and docs/record.md is generated
from it (a test fails when the two drift apart).

Parts: `identity` (which run and trial), `outcome` (status, error, notes), `settings` (what
was asked for: the TrialSpec, one definition shared with suites and `--set`), `model` (counts
of the model built), `measurements` (what was seen), `provenance` (configs and environment).

Versions: 1 = records stored before the schema existed (no `schema_version` field); 2 = the
schema without `config_hash`; 3 = without `rounds`; 4 = without the memory prediction; 5 = without the
throughput prediction and the search's decision; 6 = without `nodes`; 7 = without the learning-rate
schedule, warm-up losses and pruning; 8 = this. `migrate` brings an older record to the current
version; stores and exports of versions 1 to 3 load through it.
"""

from __future__ import annotations

from typing import Any, Optional

import copy

from pydantic import ConfigDict, Field, create_model

from .spec import TrialSpec

SCHEMA_VERSION = 9


def F(default: Any = None, unit: str = "", definition: str = "", part: str = "measurements"):  # noqa: N802
    """A record field: its default, unit (`s`, `bytes`, `tokens/s`, ... or empty) and one-line definition."""
    extra = {"unit": unit, "part": part}
    if isinstance(default, (list, dict)):
        return Field(default_factory=type(default), description=definition, json_schema_extra=extra)
    return Field(default, description=definition, json_schema_extra=extra)


# The settings part is TrialSpec itself; these are its fields' definitions (a test checks
# that every TrialSpec field has one).
SETTINGS = {
    "scenario": ("", "train: DeepSpeed trains the model; inference: one process measures a trained model (inference.py)"),
    "model": ("", "catalog size (tiny, 125m, ... 70b) or a local model directory with a config.json"),
    "family": ("", "llama or gpt2 (catalog sizes)"),
    "seq_len": ("tokens", "sequence length of every sample"),
    "micro_batch": ("samples", "micro-batch per rank (DeepSpeed's train_micro_batch_size_per_gpu)"),
    "grad_accum": ("", "gradient accumulation steps per optimizer step"),
    "precision": ("", "the precision the trial ran at: fp32, fp16 (dynamic loss scaling) or bf16; `auto` resolved per device (precision.py)"),
    "requested_precision": ("", "what was asked for: auto, fp32, fp16 or bf16"),
    "zero_stage": ("", "DeepSpeed ZeRO stage 0-3"),
    "offload": ("", "ZeRO-Offload: none, optimizer (stage >= 1) or optimizer+params (stage 3)"),
    "quant": ("", "training quantization (ZeRO++ zeropp-*, fp8) or, for inference, torchao post-training quantization"),
    "prune": ("", "inference: pruning of the decoder's linear layers before any quantization: none, magnitude-NN (NN% of each layer's smallest weights zeroed, dense) or 2:4 (semi-structured sparse, CUDA)"),
    "world_size": ("ranks", "data-parallel ranks"),
    "activation_checkpointing": ("", "Hugging Face gradient checkpointing of the decoder layers"),
    "attn_implementation": ("", "sdpa, eager or flash_attention_2"),
    "compile": ("", "torch.compile of the DeepSpeed engine"),
    "overlap_comm": ("", "ZeRO overlap_comm (None: DeepSpeed's default or the base config's)"),
    "contiguous_gradients": ("", "ZeRO contiguous_gradients (None: default)"),
    "reduce_bucket_size": ("elements", "ZeRO reduce_bucket_size (None: default)"),
    "allgather_bucket_size": ("elements", "ZeRO allgather_bucket_size (None: default)"),
    "param_persistence_threshold": ("elements", "ZeRO-3 stage3_param_persistence_threshold (None: min(1e5, hidden size))"),
    "loss_scale": ("", "fp16 static loss scale (0: dynamic)"),
    "initial_scale_power": ("", "fp16 dynamic loss scaling: initial scale 2^this"),
    "loss_scale_window": ("steps", "fp16: overflow-free steps before the scale grows"),
    "hysteresis": ("", "fp16: overflows tolerated before the scale shrinks"),
    "min_loss_scale": ("", "fp16: the smallest loss scale"),
    "warmup_steps": ("steps", "optimizer steps before the timed window (model states are probed in the last)"),
    "steps": ("steps", "timed optimizer steps"),
    "rounds": ("", "independent replicates of the trial (a fresh engine, warmup and window each), interleaved with the run's other trials; the step lists hold every round's steps in order"),
    "breakdown_steps": ("steps", "extra steps after the window timed by DeepSpeed's synchronising breakdown timers"),
    "comms_steps": ("steps", "extra steps recording every collective (`--comms`)"),
    "seed": ("", "seed of weights and data"),
    "lr": ("", "learning rate (the optimizer's; a schedule's peak)"),
    "lr_schedule": ("", "constant, or DeepSpeed's WarmupLR, WarmupDecayLR or WarmupCosineLR (the config's scheduler section)"),
    "lr_warmup_steps": ("steps", "the schedule's warmup_num_steps (None: 10% of the total, at least 2)"),
    "lr_total_steps": ("steps", "the schedule's total_num_steps (None: the trial's optimizer steps through the window)"),
    "lr_min_ratio": ("", "WarmupCosineLR's cos_min_ratio (None: DeepSpeed's default, 1e-4)"),
    "lr_warmup_type": ("", "log or linear warm-up (None: DeepSpeed's default, log)"),
    "timeout_s": ("s", "the trial is killed past this"),
    "decode_batches": ("samples", "inference: decode batch sizes"),
    "prompt_len": ("tokens", "inference: prompt length"),
    "new_tokens": ("tokens", "inference: tokens generated per sequence"),
    "eval_batches": ("batches", "inference: held-out batches for perplexity"),
    "repeats": ("", "inference: timed repetitions"),
}

_ID, _OUT, _SET, _MOD, _PROV = "identity", "outcome", "settings", "model", "provenance"


# TrialSpec's fields, constraints included (not its methods): the settings part, one definition.
_Settings = create_model("_Settings", __config__=ConfigDict(extra="forbid"),
                         **{name: (f.annotation, copy.copy(f)) for name, f in TrialSpec.model_fields.items()})


class TrialRecord(_Settings):
    """One trial's record. Fields not measured (a failed trial, the other scenario) stay None/empty."""

    model_config = ConfigDict(extra="forbid", frozen=False, protected_namespaces=(), populate_by_name=True)

    # -- identity and outcome -----------------------------------------------------------------
    schema_version: int = F(SCHEMA_VERSION, "", "version of this schema the record follows", _ID)
    run_id: str = F("", "", "the run (one sweep) this trial belongs to", _ID)
    label: Optional[str] = F(None, "", "the run's --label", _ID)
    trial_id: str = F("", "", "readable id from the swept axes' values (resolved precision)", _ID)
    config_hash: Optional[str] = F(None, "", "SHA-256 (16 hex) of every setting that can change a figure: resolved settings, "
                                   "model config, DeepSpeed config (identity.py); gate, compare and --resume match on it", _ID)
    status: str = F("ok", "", "ok, oom, unsupported, timeout, failed, diverged, skipped, pruned (predicted not to fit: not launched), stopped (`sweep --search` did not run it, or stopped it after a short window; `search` says why) or interrupted", _OUT)
    error: Optional[str] = F(None, "", "why the trial did not succeed (first line: the cause)", _OUT)
    notes: list = F([], "", "caveats about this trial's figures (unsteady window, emulated bf16, ...)", _OUT)
    # -- settings beyond TrialSpec ----------------------------------------------------------------
    global_batch: Optional[int] = F(None, "samples", "micro-batch × accumulation × data-parallel ranks (DeepSpeed's train_batch_size)", _SET)
    # -- the model ---------------------------------------------------------------------------------
    n_params: Optional[int] = F(None, "parameters", "parameters of the built model (exact count)", _MOD)
    n_embedding_params: Optional[int] = F(None, "parameters", "token embedding (unless tied) + learned positions", _MOD)
    n_layers: Optional[int] = F(None, "", "decoder layers", _MOD)
    hidden_size: Optional[int] = F(None, "", "model width", _MOD)
    n_heads: Optional[int] = F(None, "", "attention heads", _MOD)
    n_kv_heads: Optional[int] = F(None, "", "key/value heads (GQA)", _MOD)
    vocab_size: Optional[int] = F(None, "tokens", "vocabulary size", _MOD)
    # -- time and throughput -------------------------------------------------------------------------
    step_time_s: Optional[float] = F(None, "s", "median optimizer-step time of the slowest rank")
    step_time_ci95_s: Optional[list] = F(None, "s", "distribution-free 95% interval of that median: order statistics with exact binomial coverage ≥ 95%; empty below 6 steps (docs/measurement.md)")
    step_time_cv: Optional[float] = F(None, "", "coefficient of variation of the step times")
    step_times_s: list = F([], "s", "every timed step: the slowest rank's wall time (CUDA events on GPU)")
    tokens_per_s: Optional[float] = F(None, "tokens/s", "all ranks' tokens / the slowest rank's window wall time")
    tokens_per_s_ci95: Optional[list] = F(None, "tokens/s", "95% interval of tokens_per_s: batch means of the step times (each round a batch from 3 rounds), Student t (collect/stats.throughput_ci95); empty below 6 steps")
    tokens_per_s_per_device: Optional[float] = F(None, "tokens/s", "tokens_per_s / ranks")
    samples_per_s: Optional[float] = F(None, "samples/s", "all ranks' samples / the window")
    window_s: Optional[float] = F(None, "s", "the slowest rank's timed window (summed over rounds)")
    rounds_done: int = F(0, "", "rounds measured (of `rounds`): the step lists hold rounds_done × steps steps, round by round")
    step_time_drift: Optional[float] = F(None, "", "second half's median step / first half's − 1 (a steady window is near 0; with rounds, the round that drifted most)")
    step_times_per_rank: list = F([], "s", "each rank's step times")
    step_cpu_s: list = F([], "s", "CPU accelerator: CPU seconds all ranks spent per step (time.process_time)")
    reference_s: Optional[float] = F(None, "s", "fixed matmul workload timed next to the window (slowest rank's median; the median over rounds)")
    step_times_rel: list = F([], "", "each step time / reference_s: cost relative to the machine's speed then (each round's against its own reference)")
    reference_cpu_s: Optional[float] = F(None, "s", "the reference's CPU seconds, summed over ranks")
    step_cpu_rel: list = F([], "", "step_cpu_s / reference_cpu_s")
    # -- FLOPs and utilisation ---------------------------------------------------------------------
    flops_per_token: Optional[float] = F(None, "FLOP/token", "6·N + 12·L·H·Q·T (PaLM App. B), N without embeddings")
    hfu_flops_per_token: Optional[float] = F(None, "FLOP/token", "model FLOPs + the forward recomputed under activation checkpointing")
    tflops_per_device: Optional[float] = F(None, "TFLOP/s", "flops_per_token × tokens_per_s_per_device")
    peak_tflops: Optional[float] = F(None, "TFLOP/s", "the device's dense datasheet peak for what the matmuls run in: the precision, fp8 for quant=fp8, tf32 for fp32 with TF32 allowed (collect/flops.py)")
    mfu: Optional[float] = F(None, "", "tflops_per_device / peak_tflops (None above 1: a measurement error)")
    hfu: Optional[float] = F(None, "", "hardware FLOPs utilisation against peak_tflops")
    measured_peak_tflops: Optional[float] = F(None, "TFLOP/s", "best rate of the model's own linear-layer GEMMs on this device (collect/peak.py), min over ranks")
    measured_peak_source: Optional[str] = F(None, "", "measured (this trial ran the probe) or cache")
    fp32_matmul_precision: Optional[str] = F(None, "", "torch.get_float32_matmul_precision() on the ranks: an fp32 trial is quoted against the tf32 peak unless \"highest\"", "provenance")
    ds_global_steps: Optional[int] = F(None, "steps", "DeepSpeed's engine.global_steps at the trial's end (round 1's): every optimizer step run (warmup, window, breakdown, comms and profile passes)")
    measured_peak_probe_s: Optional[float] = F(None, "s", "time the peak cost this trial (reading the cache or measuring)")
    mfu_vs_measured_peak: Optional[float] = F(None, "", "tflops_per_device / measured_peak_tflops (None above 1)")
    hfu_vs_measured_peak: Optional[float] = F(None, "", "HFU against the measured peak")
    # -- where the step's time goes (a separate pass after the window) ------------------------------
    fwd_s: Optional[float] = F(None, "s", "DeepSpeed's `fwd` timer, slowest rank")
    bwd_s: Optional[float] = F(None, "s", "DeepSpeed's `bwd` timer")
    bwd_compute_s: Optional[float] = F(None, "s", "DeepSpeed's `bwd_inner` timer")
    comm_s: Optional[float] = F(None, "s", "DeepSpeed's `bwd_allreduce` timer")
    optimizer_s: Optional[float] = F(None, "s", "DeepSpeed's `step` timer, less the ZeRO-1/2 parameter all-gather (allgather_s)")
    allgather_s: Optional[float] = F(None, "s", "ZeRO-1/2: the all-gather of updated parameter partitions after the optimizer step (DeepSpeed's `optimizer_allgather` timer), slowest rank")
    breakdown_step_s: Optional[float] = F(None, "s", "the breakdown pass's own median step (its timers synchronise); fwd + bwd + optimizer + all-gather come within a few % of it")
    breakdown_note: Optional[str] = F(None, "", "when overlap hides communication inside backward")
    breakdown_per_rank: list = F([], "", "each rank's breakdown")
    data_s: Optional[float] = F(None, "s", "host time to make one step's batches")
    comms: Optional[dict] = F(None, "", "`--comms`: per collective kind: calls, bytes per step, algbw and busbw (nccl-tests)")
    comm_bytes_per_step: Optional[float] = F(None, "bytes", "all collectives' bytes per step (`--comms`)")
    # -- telemetry --------------------------------------------------------------------------------
    telemetry_per_rank: list = F([], "", "NVML during the window (utilisation, memory, power, clocks, throttling), or why not")
    energy_j: Optional[float] = F(None, "J", "every device's energy over the window (NVML counter)")
    tokens_per_joule: Optional[float] = F(None, "tokens/J", "all ranks' tokens / energy_j")
    traces: list = F([], "", "`--profile`: torch.profiler trace files")
    # -- memory ---------------------------------------------------------------------------------------
    model_state_bytes: Optional[float] = F(None, "bytes", "parameters + gradients + optimizer states the engine's tensors hold, max over ranks")
    model_state_bytes_per_rank: list = F([], "bytes", "the same per rank")
    model_state_breakdown: Optional[list] = F(None, "bytes", "params, grads, optimizer per rank")
    peak_mem_bytes: Optional[float] = F(None, "bytes", "CUDA allocator peak, or the process's peak RSS on CPU, reset per trial; max over ranks")
    peak_mem_bytes_per_rank: list = F([], "bytes", "the same per rank")
    peak_mem_baseline_bytes: Optional[float] = F(None, "bytes", "what was held when the trial began")
    trial_peak_mem_bytes: Optional[float] = F(None, "bytes", "the trial's own peak: peak − what its rank held when it began, the largest over ranks (CPU: RSS, most of which is the process itself); what the gate judges")
    trial_allocated_peak_bytes: Optional[float] = F(None, "bytes", "the tensors' own peak: the most bytes torch's allocator held at once above what it held when the trial began, largest rank (CUDA: max_memory_allocated; CPU: llmbench's counting allocator, collect/allocated.py); what the memory model predicts")
    other_mem_bytes: Optional[float] = F(None, "bytes", "peak − baseline − the model states in that memory (on a GPU the device part; on the CPU accelerator all): activations, buckets, temporaries")
    model_state_host_bytes: Optional[float] = F(None, "bytes", "of model_state_bytes, what ZeRO-Offload keeps on the host (the tensor's device on a GPU; DeepSpeed's offload settings on the CPU accelerator, collect/memory.offloaded), largest rank")
    model_state_device_bytes: Optional[float] = F(None, "bytes", "model_state_bytes − the host part: the model states on the device, largest rank; what the memory objective and the offload guidance use")
    memory_per_rank: list = F([], "", "each rank's memory readings")
    activation_bytes: Optional[float] = F(None, "bytes", "bytes one micro-batch saved for backward, seen by autograd's saved-tensor hooks in a warmup step (collect/activations.py: each storage once, parameters left out), largest rank")
    activation_bytes_by_dtype: Optional[dict] = F(None, "bytes", "the same by dtype")
    buffer_bytes: Optional[float] = F(None, "bytes", "DeepSpeed's communication buckets and ZeRO-3's gathered parameters the engine held when its model states were probed, largest rank")
    # -- the memory prediction (plan/memory.py), made before launch -----------------------------------
    predicted_peak_bytes: Optional[float] = F(None, "bytes", "predicted trial_peak_mem_bytes (the trial's own peak per rank)")
    predicted_allocated_peak_bytes: Optional[float] = F(None, "bytes", "predicted trial_allocated_peak_bytes (buckets whole, as allocated)")
    predicted_model_state_bytes: Optional[float] = F(None, "bytes", "predicted model_state_bytes (device + host)")
    predicted_activation_bytes: Optional[float] = F(None, "bytes", "predicted activation_bytes")
    predicted_buffer_bytes: Optional[float] = F(None, "bytes", "predicted DeepSpeed buckets (pages written on a CPU)")
    predicted_device_bytes: Optional[float] = F(None, "bytes", "predicted memory a rank needs of its device: the own peak plus the process (CPU) or the CUDA context, NCCL and allocator slack")
    predicted_host_bytes: Optional[float] = F(None, "bytes", "predicted host memory per rank: ZeRO-Offload's states (the whole process on a CPU)")
    predicted_memory: Optional[dict] = F(None, "bytes", "every term of the prediction (plan/memory.MemoryPrediction), the phase that sets the peak, DeepSpeed's own estimate")
    prediction_error: Optional[dict] = F(None, "", "predicted / measured − 1 per term: activations, model_states, peak, allocated_peak")
    # -- the throughput prediction and the guided search (plan/throughput.py, search.py) ----------------
    predicted_step_s: Optional[float] = F(None, "s", "the throughput model's step time (`sweep --search`: from its last calibration)")
    predicted_tokens_per_s: Optional[float] = F(None, "tokens/s", "the throughput model's tokens/s, all ranks")
    search: Optional[dict] = F(None, "", "`sweep --search`'s decision for this trial: phase (anchor, explore, final, not run), the order it ran in, why it was stopped or promoted")
    # -- training dynamics -----------------------------------------------------------------------------
    losses: list = F([], "nats", "loss per timed step, averaged over ranks")
    grad_norms: list = F([], "", "global gradient norm per step (rank 0; None where DeepSpeed exposes none)")
    lrs: list = F([], "", "learning rate each timed step applied (read before it: DeepSpeed steps its scheduler after the optimizer)")
    warmup_losses: list = F([], "nats", "loss per warm-up step (before the window), averaged over ranks")
    warmup_lrs: list = F([], "", "learning rate each warm-up step applied")
    loss_scales: list = F([], "", "fp16 loss scale per step")
    skipped_steps: Optional[int] = F(None, "steps", "fp16 steps skipped for overflow")
    final_loss: Optional[float] = F(None, "nats", "the last timed step's loss")
    entropy_floor: Optional[float] = F(None, "nats", "entropy rate of the data's Markov chain: the loss floor")
    loss_gap_to_floor: Optional[float] = F(None, "nats", "final_loss − entropy_floor")
    # -- the rest of the trial's wall time -------------------------------------------------------------
    setup_s: Optional[float] = F(None, "s", "model build + deepspeed.initialize, slowest rank")
    teardown_s: Optional[float] = F(None, "s", "engine destroy and memory release")
    warmup_s: Optional[float] = F(None, "s", "warmup steps")
    trial_wall_s: Optional[float] = F(None, "s", "the whole trial as the driver saw it")
    pool_start_s: float = F(0.0, "s", "starting the rank pool, paid by this trial (0: a warm pool)")
    overhead_s: Optional[float] = F(None, "s", "trial_wall_s − window_s")
    # -- inference scenario (None in training records) --------------------------------------------------
    prefill_latency_s: Optional[float] = F(None, "s", "median prompt prefill at the first decode batch")
    prefill_latency_ci95_s: Optional[list] = F(None, "s", "95% interval of that median")
    prefill_latency_s_per_batch: Optional[dict] = F(None, "s", "median prefill per decode batch size")
    decode_tokens_per_s: Optional[dict] = F(None, "tokens/s", "per batch size: batch × decoded tokens / decode time (median repeat)")
    decode_tokens_per_s_ci95: Optional[dict] = F(None, "tokens/s", "95% interval per batch size")
    decode_latency_s_per_token: Optional[dict] = F(None, "s", "median seconds per decoded token, per batch size")
    decode_latency_ci95_s_per_token: Optional[dict] = F(None, "s", "95% interval per batch size")
    weight_bytes: Optional[int] = F(None, "bytes", "measured bytes of the (quantized) model's tensors")
    weight_bytes_reference: Optional[int] = F(None, "bytes", "the unquantized model's at the same precision")
    perplexity: Optional[float] = F(None, "", "exp(mean NLL) on the held-out batches")
    eval_nll_nats: Optional[float] = F(None, "nats", "mean NLL per predicted token")
    eval_batches_sha256: Optional[str] = F(None, "", "fingerprint of the eval tokens")
    eval_tokens: Optional[int] = F(None, "tokens", "predicted tokens in the eval")
    train_loss_final: Optional[float] = F(None, "nats", "the trained model's final training loss")
    train_steps: Optional[int] = F(None, "steps", "steps it was trained")
    train_s: Optional[float] = F(None, "s", "time it took (when trained now)")
    trained_cache: Optional[str] = F(None, "", "hit (loaded) or miss (trained now)")
    entropy_floor_nats: Optional[float] = F(None, "nats", "the floor it approached")
    peak_rss_bytes: Optional[int] = F(None, "bytes", "the process's peak RSS")
    quant_config: Optional[str] = F(None, "", "torchao's config, as it printed")
    weight_sparsity: Optional[float] = F(None, "", "fraction of the decoder linear layers' weights that are zero after pruning (counted; before any quantization)")
    prune_config: Optional[str] = F(None, "", "how the model was pruned (method, layers, library)")
    threads: Optional[int] = F(None, "", "torch threads of the inference process")
    # -- provenance -------------------------------------------------------------------------------------
    # stored as `model_config` (pydantic reserves that name for its own settings: an alias)
    transformers_config: Optional[dict] = Field(None, alias="model_config", description="the transformers config the model was built from",
                                                json_schema_extra={"unit": "", "part": _PROV})
    ds_config: Optional[dict] = F(None, "", "the DeepSpeed config the engine ran with", _PROV)
    hosts: list = F([], "", "hosts the ranks ran on", _PROV)
    nodes: list = F([], "", "each rank's placement: {rank, node (the launcher's name: hostfile entry, SLURM node), node_rank, local_rank (device index on a GPU node), host (its hostname), threads (torch's threads in the rank)}", _PROV)
    devices: list = F([], "", "each rank's device", _PROV)
    env: dict = F({}, "", "versions (Python, torch, DeepSpeed, transformers, CUDA, NCCL), devices, git commit, CPU capability", _PROV)


def fields() -> list[dict]:
    """Every field: name, part, type, unit, definition (the settings part from TrialSpec's)."""
    out = []
    for name, f in TrialRecord.model_fields.items():
        extra = f.json_schema_extra or {}
        name = f.alias or name
        if name in TrialSpec.model_fields:
            unit, text = SETTINGS.get(name, ("", ""))
            part = "settings"
        else:
            unit, text, part = extra.get("unit", ""), f.description or "", extra.get("part", "measurements")
        typ = str(f.annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
        out.append({"name": name, "part": part, "type": typ, "unit": unit, "definition": text})
    order = ["identity", "outcome", "settings", "model", "measurements", "provenance"]
    return sorted(out, key=lambda r: order.index(r["part"]))


def markdown() -> str:
    """The field reference (docs/record.md), generated from the schema."""
    lines = ["# The trial record", "",
             f"Generated from `llmbench.schema.TrialRecord` (schema version {SCHEMA_VERSION}) by "
             "`llmbench results --schema --format markdown`; do not edit by hand.", "",
             "`llmbench results --format json` prints one record per trial. Settings are what was asked for "
             "(the suite's axes, `--set`); measurements are what was seen.", ""]
    part = None
    for r in fields():
        if r["part"] != part:
            part = r["part"]
            lines += ["", f"## {part}", "", "| field | type | unit | definition |", "|---|---|---|---|"]
        lines.append(f"| `{r['name']}` | {r['type']} | {r['unit']} | {r['definition']} |")
    return "\n".join(lines) + "\n"


def migrate(record: dict) -> dict:
    """Bring a stored or exported record to the current schema version.

    Version 1 (no `schema_version`): the precision ran was the precision asked for (suites
    named it explicitly then), and the measured-peak provenance fields did not exist.
    Versions 1-2: no `config_hash`; it is computed from the record's own settings, model and
    DeepSpeed configs (a setting the record predates ran at its default). Versions 1-3: one
    round (`rounds`, `rounds_done`); versions 1-4: no memory prediction; versions 1-5: no
    throughput prediction nor search decision; versions 1-6: no `nodes` (empty); versions 1-7: no
    learning-rate schedule (constant), warm-up losses (empty) nor pruning (none); versions 1-8: no
    allocator peak (None)."""
    version = record.get("schema_version", 1)
    if version >= SCHEMA_VERSION:
        return record
    out = dict(record)
    if version == 1:
        out.setdefault("requested_precision", out.get("precision"))
        out.setdefault("measured_peak_source", None)
        out.setdefault("measured_peak_probe_s", None)
    for name, f in TrialSpec.model_fields.items():  # a setting the record predates ran at its default
        if name not in out:
            out[name] = f.get_default(call_default_factory=True)
    if version <= 2:
        from .identity import config_hash

        out["config_hash"] = config_hash(out)
    if version <= 3:
        out["rounds_done"] = 1 if out.get("status") == "ok" else 0
    # version 4 had no memory prediction, version 5 no throughput prediction, version 6 no nodes, version 7 no
    # schedule nor pruning, version 8 no allocator peak: their fields keep their defaults (the settings above:
    # constant, none); a field added since, that the record lacks, is None
    if version <= 8:
        out.setdefault("trial_allocated_peak_bytes", None)
        out.setdefault("predicted_allocated_peak_bytes", None)
    out["schema_version"] = SCHEMA_VERSION
    return out


def validate(record: dict) -> dict:
    """Check a record against the schema before it is stored or exported; returns it unchanged.
    Raises pydantic.ValidationError naming a key the schema lacks or a value of the wrong type."""
    TrialRecord.model_validate(record)
    return record
