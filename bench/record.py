"""The trial record: the ranks' results aggregated as a distributed-training engineer expects.

Tokens are summed over ranks, time is the slowest rank's, memory is the max and each rank's.
Every field is defined once, in llmbench.schema.TrialRecord (`llmbench results --schema`).
"""

from __future__ import annotations

import statistics

from .collect.flops import datasheet_peak_tflops, screen_utilisation, utilisation
from .collect.stats import cv, median, median_ci95, throughput_ci95
from .identity import config_hash, differences
from .models import ModelStats
from .rank_result import InferenceResult, RankResult
from .schema import TrialRecord
from .spec import TrialSpec

# pruned: predicted not to fit its device or --memory-budget (plan/memory.py), not launched
STATUSES = ("ok", "oom", "unsupported", "timeout", "failed", "diverged", "skipped", "pruned", "stopped", "interrupted")


def base_record(run_id: str, trial_id: str, spec: TrialSpec, stats: ModelStats | None, env: dict,
                label: str | None = None, model_config: dict | None = None, ds_config: dict | None = None) -> dict:
    """The record every trial starts from, whatever happens to it: the schema's defaults
    (llmbench.schema.TrialRecord) with the trial's identity, settings, model counts and the
    configs planned for it (the ranks' own replace them when they report)."""
    model = {k: getattr(stats, k) if stats else None
             for k in ("n_params", "n_embedding_params", "n_layers", "hidden_size", "n_heads", "n_kv_heads", "vocab_size")}
    rec = TrialRecord(run_id=run_id, label=label, trial_id=trial_id, **spec.model_dump(), global_batch=spec.global_batch,
                      **model, env=env, model_config=model_config, ds_config=ds_config).model_dump(by_alias=True)
    rec["config_hash"] = config_hash(rec)
    return rec


def failed_record(rec: dict, status: str, error: str) -> dict:
    assert status in STATUSES, status
    rec.update(status=status, error=error)
    return rec


def aggregate(rec: dict, ranks: list[RankResult], stats: ModelStats | None = None) -> dict:
    """Fill a record from every rank's result: what every trial has, then (if all ranks
    succeeded) each group of measurements in its own function below."""
    ranks = sorted(ranks, key=lambda r: r.rank)
    planned = dict(rec)
    rec.update({k: v for k, v in _common(ranks).items() if v is not None or k not in ("ds_config", "model_config")})
    _check_identity(planned, rec)
    bad = [r for r in ranks if r.status != "ok"]
    if bad:
        return failed_record(rec, bad[0].status, f"rank {bad[0].rank}: {bad[0].error}")
    if len(ranks) != rec["world_size"]:
        return failed_record(rec, "failed", f"{len(ranks)} of {rec['world_size']} ranks reported")
    for part in (_throughput, _model_states, _steadiness, _relative_speed, _utilisation, _breakdown,
                 _telemetry, _comms, _training_signals, _prediction_error):
        rec.update(part(rec, ranks, stats))
    return rec


def _check_identity(planned: dict, rec: dict) -> None:
    """The identity is what the ranks ran: where their configs differ from the planned ones
    (they should not), the record says which keys, and its hash follows the ranks."""
    if planned["config_hash"] is None or planned["config_hash"] == config_hash(rec):
        return
    rec["config_hash"] = config_hash(rec)
    rec["notes"] = rec["notes"] + ["the ranks ran another configuration than the planned one: "
                                   + "; ".join(differences(planned, rec)[:5])]


def _common(ranks: list[RankResult]) -> dict:
    """What a trial has even when it failed: configs, hosts, setup times, memory."""
    first = ranks[0]
    peaks = [r.memory.get("peak_mem_bytes") for r in ranks]
    return dict(
        ds_config=first.ds_config or None,
        model_config=first.transformers_config or None,
        entropy_floor=first.entropy_floor,
        hosts=sorted({r.host for r in ranks}),
        devices=[r.device for r in ranks],
        nodes=[_placement(r) for r in ranks],
        setup_s=max(r.setup_s for r in ranks),
        teardown_s=max(r.teardown_s for r in ranks),
        warmup_s=max(r.warmup_s for r in ranks),
        peak_mem_bytes_per_rank=peaks,
        # What the process (CPU: RSS) or allocator (CUDA) already held when the trial began.
        peak_mem_baseline_bytes=max((r.memory.get("baseline_bytes") or 0) for r in ranks),
        memory_per_rank=[r.memory for r in ranks],
        notes=sorted({n for r in ranks for n in r.notes}),
        peak_mem_bytes=max((m for m in peaks if m is not None), default=None),
        trial_peak_mem_bytes=max((own_peak(r.memory) for r in ranks if r.memory.get("peak_mem_bytes") is not None),
                                 default=None),
        trial_allocated_peak_bytes=max((r.memory["allocated_peak_bytes"] for r in ranks
                                        if r.memory.get("allocated_peak_bytes") is not None), default=None),
        fp32_matmul_precision=first.fp32_matmul_precision,
        ds_global_steps=first.ds_global_steps,
    )


def _placement(r) -> dict:
    """One rank's entry in the record's `nodes`: where the launcher put it."""
    return {"rank": r.rank, "node": r.node or r.host, "node_rank": r.node_rank, "local_rank": r.local_rank,
            "host": r.host, "threads": r.threads}


def own_peak(memory: dict) -> int:
    """A rank's peak memory above what its process (CPU: RSS) or allocator (CUDA) held when
    the trial began: the trial's own, which a regression in the trial moves in full."""
    return max(0, (memory.get("peak_mem_bytes") or 0) - (memory.get("baseline_bytes") or 0))


def _rates(steps: list[float], window: float, tokens: int, n_ranks: int, seq_len: int, rounds: int = 1) -> dict:
    """The step-time summary and tokens/s of one window, or of several rounds' (their steps in
    order, their windows and tokens summed)."""
    return dict(
        step_times_s=steps, step_time_s=median(steps), step_time_ci95_s=median_ci95(steps), step_time_cv=cv(steps),
        window_s=window, tokens_per_s=tokens / window, tokens_per_s_per_device=tokens / window / n_ranks,
        tokens_per_s_ci95=throughput_ci95(tokens / window, steps, rounds),
        samples_per_s=tokens // seq_len / window, rounds_done=rounds,
    )


def _throughput(rec: dict, ranks: list[RankResult], stats) -> dict:
    """Step times (a step ends when its slowest rank ends: the per-step max across ranks),
    tokens/s (all ranks' tokens over the slowest window: not a mean of rates), losses."""
    steps = [max(r.step_times_s[i] for r in ranks) for i in range(len(ranks[0].step_times_s))]
    losses = [statistics.fmean(r.losses[i] for r in ranks) for i in range(len(ranks[0].losses))]
    final = losses[-1] if losses else None
    return dict(
        **_rates(steps, max(r.window_s for r in ranks), sum(r.tokens for r in ranks), len(ranks), rec["seq_len"]),
        step_times_per_rank=[r.step_times_s for r in ranks],
        data_s=max((r.data_s or 0) for r in ranks),
        losses=losses, final_loss=final,
        warmup_losses=[statistics.fmean(r.warmup_losses[i] for r in ranks) for i in range(min(len(r.warmup_losses) for r in ranks))],
        loss_gap_to_floor=final - rec["entropy_floor"] if final is not None and rec["entropy_floor"] is not None else None,
    )


# per-step lists a round contributes to, in order; the rest of a multi-round record is round 1's
ROUND_STEP_LISTS = ("step_times_rel", "step_cpu_s", "step_cpu_rel")


def combine_rounds(rounds: list[dict], stats: ModelStats | None = None) -> dict:
    """One record from a trial's rounds (each aggregated on its own, in order). The step lists
    are every round's steps in order and tokens/s is all tokens over all windows (its interval
    from the rounds as batches, collect/stats.throughput_ci95); the relative times are each
    round's against its own reference, and the references the median over rounds; energy is
    summed. Memory, losses, gradient norms, breakdown and setup are round 1's, as a one-round
    run has them (every round trains the same steps from the same weights); a later round
    whose peak memory exceeds round 1's by more than 10% is noted. When the last round
    failed, the record is its status and error, and keeps what the rounds before it measured."""
    ok = [r for r in rounds if r["status"] == "ok"]
    last = rounds[-1]
    if not ok:
        return last
    rec = dict(ok[0])
    if len(ok) > 1:
        rec.update(_rates([t for r in ok for t in r["step_times_s"]], sum(r["window_s"] for r in ok),
                          round(sum(r["tokens_per_s"] * r["window_s"] for r in ok)), len(rec["devices"]),
                          rec["seq_len"], len(ok)))
        for k in ROUND_STEP_LISTS:
            rec[k] = [t for r in ok for t in r[k]] if all(r[k] for r in ok) else []
        rec["step_times_per_rank"] = [sum(per, []) for per in zip(*(r["step_times_per_rank"] for r in ok))]
        for k in ("reference_s", "reference_cpu_s"):
            rec[k] = median([r[k] for r in ok]) if all(r[k] for r in ok) else None
        rec["step_time_drift"] = max((r["step_time_drift"] for r in ok if r["step_time_drift"] is not None), key=abs, default=None)
        if all(r["energy_j"] is not None for r in ok):
            rec["energy_j"] = sum(r["energy_j"] for r in ok)
            rec["tokens_per_joule"] = rec["tokens_per_s"] * rec["window_s"] / rec["energy_j"] if rec["energy_j"] else None
        rec["notes"] = _round_notes(ok)
        if stats is not None:
            u = utilisation(stats, rec["seq_len"], rec["tokens_per_s_per_device"], rec["activation_checkpointing"],
                            datasheet_peak_tflops(rec["devices"][0], rec["precision"], rec["quant"], rec["fp32_matmul_precision"]),
                            rec["measured_peak_tflops"])
            rec["notes"] += screen_utilisation(u)
            rec.update(u)
    if last["status"] != "ok":
        failed_record(rec, last["status"], f"round {len(rounds)} of {rec['rounds']}: {last['error']}")
    return rec


def _round_notes(ok: list[dict]) -> list[str]:
    """The rounds' notes once each, without their per-window ones: one steadiness note (the
    round whose window drifted most, if any did), none of their utilisation screens (the
    combined figure is screened again), and a note if a later round's peak memory grew."""
    steady, screen = "timed window not steady", "measurement error:"
    notes = [n for r in ok for n in r["notes"] if not n.startswith((steady, screen))]
    worst = max(range(len(ok)), key=lambda i: abs(ok[i]["step_time_drift"] or 0))
    notes += [f"round {worst + 1}: {n}" for n in ok[worst]["notes"] if n.startswith(steady)]
    first, highest = ok[0]["peak_mem_bytes"], max(ok, key=lambda r: r["peak_mem_bytes"] or 0)
    if first and highest["peak_mem_bytes"] > 1.10 * first:
        notes.append(f"peak memory grew over the rounds: {highest['peak_mem_bytes'] / first - 1:+.0%} in round "
                     f"{ok.index(highest) + 1} against round 1's (the record keeps round 1's)")
    return list(dict.fromkeys(notes))


def _model_states(rec: dict, ranks: list[RankResult], stats) -> dict:
    """Model-state bytes per rank (params + grads + optimizer) and the rest of the peak:
    activations, communication buckets, gathered ZeRO-3 parameters, temporaries, fragmentation
    (peak minus what was held before, minus model states)."""
    per_rank = [sum(r.model_state.get(k, 0) for k in ("params", "grads", "optimizer")) for r in ranks]
    host = [r.model_state.get("host", 0) for r in ranks]
    # the memory measured: the device's on a GPU (offloaded states are not in it), the
    # process's RSS on the CPU accelerator (where the "device" is the host and holds them all)
    in_peak = per_rank if rec["devices"] and str(rec["devices"][0]).startswith("cpu") else \
        [ms - h for ms, h in zip(per_rank, host)]
    return dict(
        model_state_bytes_per_rank=per_rank,
        model_state_breakdown=[{k: r.model_state.get(k) for k in ("params", "grads", "optimizer")} for r in ranks],
        model_state_bytes=max(per_rank),
        model_state_host_bytes=max(host),
        model_state_device_bytes=max(ms - h for ms, h in zip(per_rank, host)),
        other_mem_bytes=max(max(0, (r.memory.get("peak_mem_bytes") or 0) - (r.memory.get("baseline_bytes") or 0) - ms)
                            for r, ms in zip(ranks, in_peak)),
    )


def prediction_fields(pred) -> dict:
    """The record's predicted_* fields from a plan/memory.MemoryPrediction (None: no prediction)."""
    if pred is None:
        return {}
    return dict(predicted_peak_bytes=pred.peak, predicted_allocated_peak_bytes=pred.allocated_peak,
                predicted_model_state_bytes=pred.states_device + pred.states_host,
                predicted_activation_bytes=pred.activations, predicted_buffer_bytes=pred.buffers,
                predicted_device_bytes=pred.device_total, predicted_host_bytes=pred.host_total,
                predicted_memory=pred.to_dict())


def _prediction_error(rec: dict, ranks: list[RankResult], stats) -> dict:
    """The measured memory terms, and predicted / measured − 1 for each the trial predicted."""
    acts = [r.activations for r in ranks if r.activations]
    out: dict = {}
    if acts:
        out["activation_bytes"] = max(a["activation_bytes"] for a in acts)
        out["activation_bytes_by_dtype"] = max(acts, key=lambda a: a["activation_bytes"])["activation_bytes_by_dtype"]
    if any(r.model_state for r in ranks):
        out["buffer_bytes"] = max(r.model_state.get("buffers", 0) for r in ranks)
    pairs = {"activations": ("predicted_activation_bytes", out.get("activation_bytes")),
             "model_states": ("predicted_model_state_bytes", rec.get("model_state_bytes")),
             "peak": ("predicted_peak_bytes", rec.get("trial_peak_mem_bytes")),
             "allocated_peak": ("predicted_allocated_peak_bytes", rec.get("trial_allocated_peak_bytes"))}
    err = {k: rec[p] / m - 1 for k, (p, m) in pairs.items() if rec.get(p) is not None and m}
    if err:
        out["prediction_error"] = err
    return out


def _steadiness(rec: dict, ranks: list[RankResult], stats) -> dict:
    """A steady window: the second half's median within a few % of the first half's."""
    steps, half = rec["step_times_s"], len(rec["step_times_s"]) // 2
    if half < 2:
        return {}
    drift = median(steps[half:]) / median(steps[:half]) - 1
    notes = [f"timed window not steady: the second half's median step is {drift:+.0%} against the first "
             f"half's (more warmup steps?)"] if abs(drift) > 0.10 else []
    return dict(step_time_drift=drift, notes=rec["notes"] + notes)


def _relative_speed(rec: dict, ranks: list[RankResult], stats) -> dict:
    """Step times against the reference workload timed next to the window (collect/reference.py)."""
    out: dict = {}
    if all(r.reference_s for r in ranks):
        # the slowest rank's median reference time, and every step time divided by it: the
        # trial's speed relative to the machine's at that moment
        out["reference_s"] = max(median(r.reference_s) for r in ranks)
        out["step_times_rel"] = [t / out["reference_s"] for t in rec["step_times_s"]]
    if all(r.step_cpu_s for r in ranks):  # CPU accelerator: CPU seconds all ranks spent per step
        out["step_cpu_s"] = [sum(r.step_cpu_s[i] for r in ranks) for i in range(len(ranks[0].step_cpu_s))]
        if all(r.reference_cpu_s for r in ranks):
            # the same against the reference's CPU seconds (summed over ranks): cancels both other
            # processes time-sharing the cores (CPU time) and a slower machine (the ratio)
            out["reference_cpu_s"] = sum(median(r.reference_cpu_s) for r in ranks)
            out["step_cpu_rel"] = [c / out["reference_cpu_s"] for c in out["step_cpu_s"]]
    return out


def _utilisation(rec: dict, ranks: list[RankResult], stats: ModelStats | None) -> dict:
    """TFLOPS and MFU (collect/flops.py) against the datasheet and the measured peak."""
    out: dict = {}
    if stats is not None:
        peak = datasheet_peak_tflops(ranks[0].device, rec["precision"], rec["quant"], ranks[0].fp32_matmul_precision)
        measured = min((r.measured_peak_tflops for r in ranks if r.measured_peak_tflops), default=None)
        out = utilisation(stats, rec["seq_len"], rec["tokens_per_s_per_device"], rec["activation_checkpointing"],
                          peak, measured)
        out["notes"] = rec["notes"] + screen_utilisation(out)
    sources = {r.measured_peak_source for r in ranks} - {None}
    if sources:  # "measured" when any rank ran the probe in this trial
        out["measured_peak_source"] = "measured" if "measured" in sources else "cache"
        out["measured_peak_probe_s"] = max(r.measured_peak_probe_s or 0.0 for r in ranks)
    return out


def _breakdown(rec: dict, ranks: list[RankResult], stats) -> dict:
    """DeepSpeed's breakdown timers (collect/breakdown.py): the slowest rank's, per part."""
    parts = [r.breakdown for r in ranks]
    out: dict = {"breakdown_per_rank": parts, "breakdown_note": parts[0].get("breakdown_note")}
    for key in ("fwd_s", "bwd_s", "bwd_compute_s", "comm_s", "optimizer_s", "allgather_s", "breakdown_step_s"):
        vals = [p.get(key) for p in parts if p.get(key) is not None]
        out[key] = max(vals) if vals else None
    return out


def _telemetry(rec: dict, ranks: list[RankResult], stats) -> dict:
    """GPU telemetry per rank; energy summed over devices (collect/telemetry.py)."""
    tele = [r.telemetry for r in ranks]
    out: dict = {"telemetry_per_rank": tele, "traces": [r.trace for r in ranks if r.trace]}
    energies = [t.get("energy_j") for t in tele]
    if energies and all(e is not None for e in energies):
        out["energy_j"] = sum(energies)  # every device's energy over the window
        out["tokens_per_joule"] = sum(r.tokens for r in ranks) / out["energy_j"] if out["energy_j"] else None
    return out


def _comms(rec: dict, ranks: list[RankResult], stats) -> dict:
    """Rank 0's view of the collectives (every rank joins the same ones; collect/comms.py)."""
    comms = ranks[0].comms
    if not comms:
        return {}
    return {"comms": comms, "comm_bytes_per_step": sum(v["bytes_per_step"] for v in comms.values())}


def _training_signals(rec: dict, ranks: list[RankResult], stats) -> dict:
    """Gradient norm, learning rate and loss scale are global quantities: rank 0's are the run's."""
    first = ranks[0]
    out = dict(grad_norms=first.grad_norms, lrs=first.lrs, warmup_lrs=first.warmup_lrs, loss_scales=first.loss_scales,
               skipped_steps=max(r.skipped_steps for r in ranks))
    if first.grad_norms and all(g is None for g in first.grad_norms):
        out["notes"] = rec["notes"] + ["no gradient norm: DeepSpeed's engine.get_global_grad_norm() gave none here "
                                       "(fp32 at ZeRO-0 computes it for clipping in clip_fp32_gradients and discards it)"]
    return out


def aggregate_inference(rec: dict, ranks: list[InferenceResult], spec: TrialSpec) -> dict:
    """Fill an inference record from its single process's result (inference.run_inference)."""
    from .inference import summarise

    if len(ranks) != 1:
        return failed_record(rec, "failed", f"an inference trial runs in one process; {len(ranks)} reported")
    r = ranks[0]
    mem = r.memory
    planned = dict(rec)
    rec.update(
        model_config=r.transformers_config or planned["model_config"],
        entropy_floor=r.entropy_floor,
        entropy_floor_nats=r.entropy_floor,
        hosts=[r.host],
        devices=[r.device],
        nodes=[_placement(r)],
        setup_s=r.setup_s,
        teardown_s=r.teardown_s,
        notes=list(r.notes),
        memory_per_rank=[mem],
        peak_mem_bytes=mem.get("peak_mem_bytes"),
        peak_mem_bytes_per_rank=[mem.get("peak_mem_bytes")],
        peak_mem_baseline_bytes=mem.get("baseline_bytes"),
        peak_rss_bytes=mem.get("rss_peak_bytes"),
        **{k: getattr(r, k) for k in ("train_loss_final", "train_steps", "train_s", "trained_cache", "quant_config",
                                      "weight_bytes", "weight_bytes_reference", "weight_sparsity", "prune_config", "eval_batches_sha256", "eval_tokens",
                                      "eval_nll_nats", "perplexity", "threads")},
    )
    _check_identity(planned, rec)
    if r.status != "ok":
        return failed_record(rec, r.status, r.error or "")
    rec.update(summarise(r, spec), rounds_done=1)
    return rec
