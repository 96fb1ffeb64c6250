"""The trial record: the ranks' results aggregated as a distributed-training engineer expects.

Tokens are summed over ranks, time is the slowest rank's, memory is the max and each rank's.
Every field is defined once, in llmbench.schema.TrialRecord (`llmbench results --schema`).
"""

from __future__ import annotations

import statistics

from .collect.flops import datasheet_peak_tflops, screen_utilisation, utilisation
from .collect.stats import cv, median, median_ci95
from .models import ModelStats
from .schema import TrialRecord
from .spec import TrialSpec

STATUSES = ("ok", "oom", "unsupported", "timeout", "failed", "diverged", "skipped", "interrupted")


def base_record(run_id: str, trial_id: str, spec: TrialSpec, stats: ModelStats | None, env: dict,
                label: str | None = None) -> dict:
    """The record every trial starts from, whatever happens to it: the schema's defaults
    (llmbench.schema.TrialRecord) with the trial's identity, settings and model counts."""
    model = {k: getattr(stats, k) if stats else None
             for k in ("n_params", "n_embedding_params", "n_layers", "hidden_size", "n_heads", "n_kv_heads", "vocab_size")}
    return TrialRecord(run_id=run_id, label=label, trial_id=trial_id, **spec.model_dump(), global_batch=spec.global_batch,
                       **model, env=env).model_dump(by_alias=True)


def failed_record(rec: dict, status: str, error: str) -> dict:
    assert status in STATUSES, status
    rec.update(status=status, error=error)
    return rec


def aggregate(rec: dict, ranks: list[dict], stats: ModelStats | None = None) -> dict:
    """Fill a record from every rank's result (see trial.RankResult)."""
    ranks = sorted(ranks, key=lambda r: r["rank"])
    bad = [r for r in ranks if r["status"] != "ok"]
    first = ranks[0]
    rec.update(
        ds_config=first["ds_config"] or None,
        model_config=first["model_config"] or None,
        entropy_floor=first["entropy_floor"],
        hosts=sorted({r["host"] for r in ranks}),
        devices=[r["device"] for r in ranks],
        setup_s=max(r["setup_s"] for r in ranks),
        teardown_s=max(r["teardown_s"] for r in ranks),
        warmup_s=max(r["warmup_s"] for r in ranks),
        peak_mem_bytes_per_rank=[r["memory"].get("peak_mem_bytes") for r in ranks],
        # What the process (CPU: RSS) or allocator (CUDA) already held when the trial began.
        peak_mem_baseline_bytes=max((r["memory"].get("baseline_bytes") or 0) for r in ranks),
        memory_per_rank=[r["memory"] for r in ranks],
        notes=sorted({n for r in ranks for n in r.get("notes", [])}),
    )
    rec["peak_mem_bytes"] = max((m for m in rec["peak_mem_bytes_per_rank"] if m is not None), default=None)
    if bad:
        worst = bad[0]
        return failed_record(rec, worst["status"], f"rank {worst['rank']}: {worst['error']}")
    if len(ranks) != rec["world_size"]:
        return failed_record(rec, "failed", f"{len(ranks)} of {rec['world_size']} ranks reported")

    # A step ends when its slowest rank ends: take the per-step max across ranks.
    steps = [max(r["step_times_s"][i] for r in ranks) for i in range(len(first["step_times_s"]))]
    window = max(r["window_s"] for r in ranks)
    tokens = sum(r["tokens"] for r in ranks)
    samples = tokens // rec["seq_len"]
    rec.update(
        step_times_s=steps,
        step_time_s=median(steps),
        step_time_ci95_s=median_ci95(steps),
        step_time_cv=cv(steps),
        window_s=window,
        # Global throughput: all ranks' tokens over the window's wall time (not a mean of rates).
        tokens_per_s=tokens / window,
        tokens_per_s_per_device=tokens / window / len(ranks),
        samples_per_s=samples / window,
        losses=[statistics.fmean(r["losses"][i] for r in ranks) for i in range(len(first["losses"]))],
        model_state_bytes_per_rank=[r["model_state"].get("params", 0) + r["model_state"].get("grads", 0)
                                    + r["model_state"].get("optimizer", 0) for r in ranks],
        model_state_breakdown=[{k: r["model_state"].get(k) for k in ("params", "grads", "optimizer")} for r in ranks],
    )
    rec["model_state_bytes"] = max(rec["model_state_bytes_per_rank"])
    # The rest of the trial's peak: activations, communication buckets, gathered ZeRO-3
    # parameters, temporaries, fragmentation (peak minus what was held before, minus model states).
    rec["other_mem_bytes"] = max(max(0, (r["memory"].get("peak_mem_bytes") or 0) - (r["memory"].get("baseline_bytes") or 0) - ms)
                                 for r, ms in zip(ranks, rec["model_state_bytes_per_rank"]))
    rec["final_loss"] = rec["losses"][-1] if rec["losses"] else None
    half = len(steps) // 2
    if half >= 2:
        # A steady window: the second half's median within a few % of the first half's.
        rec["step_time_drift"] = median(steps[half:]) / median(steps[:half]) - 1
        if abs(rec["step_time_drift"]) > 0.10:
            rec["notes"] = rec["notes"] + [f"timed window not steady: the second half's median step is "
                                           f"{rec['step_time_drift']:+.0%} against the first half's (more warmup steps?)"]
    rec["step_times_per_rank"] = [r["step_times_s"] for r in ranks]
    if all(r.get("reference_s") for r in ranks):
        # the slowest rank's median reference time (trial.reference_samples), and every step
        # time divided by it: the trial's speed relative to the machine's at that moment
        rec["reference_s"] = max(median(r["reference_s"]) for r in ranks)
        rec["step_times_rel"] = [t / rec["reference_s"] for t in steps]
    if all(r.get("step_cpu_s") for r in ranks):  # CPU accelerator: CPU seconds all ranks spent per step
        rec["step_cpu_s"] = [sum(r["step_cpu_s"][i] for r in ranks) for i in range(len(first["step_cpu_s"]))]
        if all(r.get("reference_cpu_s") for r in ranks):
            # the same against the reference's CPU seconds (summed over ranks): cancels both other
            # processes time-sharing the cores (CPU time) and a slower machine (the ratio)
            rec["reference_cpu_s"] = sum(median(r["reference_cpu_s"]) for r in ranks)
            rec["step_cpu_rel"] = [c / rec["reference_cpu_s"] for c in rec["step_cpu_s"]]
    if stats is not None:
        peak = datasheet_peak_tflops(first["device"], rec["precision"])
        measured = min((r["measured_peak_tflops"] for r in ranks if r.get("measured_peak_tflops")), default=None)
        u = utilisation(stats, rec["seq_len"], rec["tokens_per_s_per_device"], rec["activation_checkpointing"],
                        peak, measured)
        rec["notes"] = rec["notes"] + screen_utilisation(u)
        rec.update(u)
    sources = {r.get("measured_peak_source") for r in ranks} - {None}
    if sources:  # "measured" when any rank ran the probe in this trial
        rec["measured_peak_source"] = "measured" if "measured" in sources else "cache"
        rec["measured_peak_probe_s"] = max(r.get("measured_peak_probe_s") or 0.0 for r in ranks)
    parts = [r.get("breakdown") or {} for r in ranks]
    rec["breakdown_per_rank"] = parts
    for key in ("fwd_s", "bwd_s", "bwd_compute_s", "comm_s", "optimizer_s"):
        vals = [p.get(key) for p in parts if p.get(key) is not None]
        rec[key] = max(vals) if vals else None  # the slowest rank's
    rec["breakdown_note"] = parts[0].get("breakdown_note")
    rec["data_s"] = max((r.get("data_s") or 0) for r in ranks)
    tele = [r.get("telemetry") or {} for r in ranks]
    rec["telemetry_per_rank"] = tele
    energies = [t.get("energy_j") for t in tele]
    if energies and all(e is not None for e in energies):
        rec["energy_j"] = sum(energies)  # every device's energy over the window
        rec["tokens_per_joule"] = tokens / rec["energy_j"] if rec["energy_j"] else None
    rec["traces"] = [r["trace"] for r in ranks if r.get("trace")]
    if first.get("comms"):
        rec["comms"] = first["comms"]  # rank 0's view; every rank joins the same collectives
        rec["comm_bytes_per_step"] = sum(v["bytes_per_step"] for v in first["comms"].values())
    if rec["final_loss"] is not None and rec["entropy_floor"] is not None:
        rec["loss_gap_to_floor"] = rec["final_loss"] - rec["entropy_floor"]
    # Gradient norm, learning rate and loss scale are global quantities: rank 0's are the run's.
    rec.update(grad_norms=first["grad_norms"], lrs=first["lrs"], loss_scales=first["loss_scales"],
               skipped_steps=max(r["skipped_steps"] for r in ranks))
    if rec["grad_norms"] and all(g is None for g in rec["grad_norms"]):
        rec["notes"] = rec["notes"] + ["no gradient norm: DeepSpeed's engine.get_global_grad_norm() gave none here "
                                       "(fp32 at ZeRO-0 computes it for clipping in clip_fp32_gradients and discards it)"]
    return rec


def aggregate_inference(rec: dict, ranks: list[dict], spec: TrialSpec) -> dict:
    """Fill an inference record from its single process's result (inference.InferenceResult)."""
    from .inference import summarise

    if len(ranks) != 1:
        return failed_record(rec, "failed", f"an inference trial runs in one process; {len(ranks)} reported")
    r = ranks[0]
    mem = r.get("memory") or {}
    rec.update(
        model_config=r["model_config"] or None,
        entropy_floor=r["entropy_floor"],
        entropy_floor_nats=r["entropy_floor"],
        hosts=[r["host"]],
        devices=[r["device"]],
        setup_s=r["setup_s"],
        teardown_s=r["teardown_s"],
        notes=list(r.get("notes") or []),
        memory_per_rank=[mem],
        peak_mem_bytes=mem.get("peak_mem_bytes"),
        peak_mem_bytes_per_rank=[mem.get("peak_mem_bytes")],
        peak_mem_baseline_bytes=mem.get("baseline_bytes"),
        peak_rss_bytes=mem.get("rss_peak_bytes"),
        **{k: r.get(k) for k in ("train_loss_final", "train_steps", "train_s", "trained_cache", "quant_config",
                                 "weight_bytes", "weight_bytes_reference", "eval_batches_sha256", "eval_tokens",
                                 "eval_nll_nats", "perplexity", "threads")},
    )
    if r["status"] != "ok":
        return failed_record(rec, r["status"], r["error"] or "")
    rec.update(summarise(r, spec))
    return rec
