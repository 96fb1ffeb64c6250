"""Which configuration to use, and why: recommendations and statements drawn from one run's data.

Every statement carries the trials and numbers behind it; where the run lacks the data for
a statement, the statement is omitted. Leaders within each other's noise are called a tie,
broken by a fixed rule (less memory, then the simpler configuration), so two runs of the
same sweep do not recommend different winners because of noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ..collect.stats import range_coverage

OBJECTIVES = ("throughput", "memory", "budget")


def device_state_bytes(r: dict) -> float:
    """Model states on the device (ZeRO-Offload's host part left out; older records: all)."""
    v = r.get("model_state_device_bytes")
    return r["model_state_bytes"] if v is None else v


def step_interval(r: dict) -> tuple[list[float] | None, str]:
    """The step-time interval of the median and what it is: the exact 95% interval
    (collect/stats.median_ci95), or, for a window too short to have one (n < 6 steps), the
    range of its steps, which covers the median with probability only 1 − 2^(1−n)."""
    if r.get("step_time_ci95_s"):
        return r["step_time_ci95_s"], "95% CI"
    steps = r.get("step_times_s") or []
    if len(steps) >= 2:
        return [min(steps), max(steps)], f"range of {len(steps)} steps, {100 * range_coverage(len(steps)):.0f}% coverage"
    return None, "no interval"


def tokens_ci(r: dict) -> tuple[float, float]:
    """The interval of the headline tokens/s (the window's): its block-bootstrap 95% interval
    (`tokens_per_s_ci95`); for a record without one (fewer than 6 steps, an older record) the
    step-time interval (step_interval) rescaled around the headline. The headline is always
    inside its interval."""
    tps = r["tokens_per_s"]
    if r.get("tokens_per_s_ci95"):
        lo, hi = r["tokens_per_s_ci95"]
        return min(lo, tps), max(hi, tps)
    ci, _ = step_interval(r)
    mid = r.get("step_time_s")
    if not ci or not mid:
        return tps, tps
    return min(tps, tps * mid / ci[1]), max(tps, tps * mid / ci[0])


def interval_label(r: dict) -> str:
    return "95% CI" if r.get("tokens_per_s_ci95") else step_interval(r)[1]


# A contender within this fraction of the leader's throughput is as fast: the equivalence
# margin of the tie rule (docs/measurement.md measures what it does).
TIE_MARGIN = 0.04


def tied_with(leader: dict, r: dict) -> bool:
    """As fast as the leader: its tokens/s inside the leader's interval, or within TIE_MARGIN
    of the leader's. An equivalence rule on the contender's estimate, not an overlap of
    intervals: a much slower contender is never tied because its own interval is wide."""
    lo, _ = tokens_ci(leader)
    return r["tokens_per_s"] >= min(lo, leader["tokens_per_s"] * (1 - TIE_MARGIN))


def simplicity(r: dict) -> tuple:
    """Smaller is simpler: no offload, lower ZeRO stage, less accumulation, no extras."""
    return ({"none": 0, "optimizer": 1, "optimizer+params": 2}.get(r.get("offload", "none"), 3), r["zero_stage"],
            r["grad_accum"], bool(r.get("activation_checkpointing")), r["micro_batch"])


@dataclass
class Recommendation:
    objective: str
    winner: dict | None
    tied: list[dict] = field(default_factory=list)  # the others within the winner's noise
    reason: str = ""


def recommend(records: list[dict], objective: str, memory_budget: float | None = None) -> Recommendation:
    ok = [r for r in records if r["status"] == "ok" and r.get("step_time_s")]
    if objective == "budget":
        ok = [r for r in ok if memory_budget is None or (r.get("peak_mem_bytes") or 0) <= memory_budget]
    if not ok:
        return Recommendation(objective, None, reason="no successful trial" + (" fits the memory budget" if objective == "budget" else ""))
    if objective == "memory":
        best = min(ok, key=lambda r: (device_state_bytes(r) + (r.get("other_mem_bytes") or 0), simplicity(r)))
        return Recommendation(objective, best, reason=f"least memory per device: {fmt_mib(device_state_bytes(best))} "
                                                      f"of model states + {fmt_mib(best.get('other_mem_bytes') or 0)} for the rest")
    leader = max(ok, key=lambda r: (r["tokens_per_s"], r["trial_id"]))  # the headline, the statistic ranked
    contenders = [r for r in ok if tied_with(leader, r)]
    winner = min(contenders, key=lambda r: (device_state_bytes(r) + (r.get("other_mem_bytes") or 0), simplicity(r)))
    tied = [r for r in contenders if r is not winner]
    if tied:
        reason = (f"{len(contenders)} configurations are as fast as the fastest (inside its interval or within "
                  f"{TIE_MARGIN:.0%}); the tie goes to the one with less memory, then the simpler configuration")
    else:
        reason = f"fastest; every other trial is below its interval and more than {TIE_MARGIN:.0%} slower"
    return Recommendation(objective, winner, tied, reason)


def fmt_mib(b: float) -> str:
    return f"{b / 2**20:,.2f} MiB"


def _fmt_tps(r: dict) -> str:
    lo, hi = tokens_ci(r)
    return f"{r['tokens_per_s']:,.0f} tokens/s ({interval_label(r)} {lo:,.0f}–{hi:,.0f})"


def _overlap(a: dict, b: dict) -> bool:
    (alo, ahi), (blo, bhi) = tokens_ci(a), tokens_ci(b)
    return alo <= bhi and blo <= ahi


def statements(records: list[dict]) -> list[dict]:
    """Tuning statements, each {"text", "trials"}; only those this run's data supports."""
    ok = [r for r in records if r["status"] == "ok" and r.get("step_time_s")]
    out: list[dict] = []

    def group(key_fields, vary):
        groups: dict[tuple, list[dict]] = {}
        for r in ok:
            groups.setdefault(tuple(r.get(k) for k in key_fields), []).append(r)
        return [sorted(g, key=lambda r: r[vary]) for g in groups.values() if len({r[vary] for r in g}) > 1]

    base = ("model", "precision", "seq_len", "world_size", "offload", "activation_checkpointing")
    # ZeRO stage: memory saved and throughput lost against stage 0 at the same micro-batch.
    for g in group(base + ("micro_batch", "grad_accum"), "zero_stage"):
        ref = g[0]
        for r in g[1:]:
            saved = 1 - r["model_state_bytes"] / ref["model_state_bytes"]
            change = r["tokens_per_s"] / ref["tokens_per_s"] - 1
            noise = " (within noise)" if _overlap(r, ref) else ""
            out.append({"text": f"ZeRO-{r['zero_stage']} vs ZeRO-{ref['zero_stage']} at micro-batch {r['micro_batch']}: "
                                f"{saved:.0%} less model-state memory per rank ({fmt_mib(ref['model_state_bytes'])} → "
                                f"{fmt_mib(r['model_state_bytes'])}), throughput {change:+.0%}{noise}.",
                        "trials": [ref["trial_id"], r["trial_id"]]})
    # Micro-batch: where throughput stops growing; a larger batch that is slower contradicts the rule of thumb.
    for g in group(base + ("zero_stage", "grad_accum"), "micro_batch"):
        if all(b["tokens_per_s"] > a["tokens_per_s"] and not _overlap(a, b) for a, b in zip(g, g[1:])):
            out.append({"text": f"ZeRO-{g[0]['zero_stage']}: throughput still grows up to micro-batch {g[-1]['micro_batch']} "
                                f"({_fmt_tps(g[0])} at {g[0]['micro_batch']} → {_fmt_tps(g[-1])}); a larger micro-batch may "
                                f"pay if memory allows.", "trials": [r["trial_id"] for r in g]})
            continue
        for a, b in zip(g, g[1:]):
            if _overlap(a, b):
                out.append({"text": f"ZeRO-{a['zero_stage']}: throughput stops growing between micro-batch {a['micro_batch']} "
                                    f"({_fmt_tps(a)}) and {b['micro_batch']} ({_fmt_tps(b)}): the intervals overlap.",
                            "trials": [a["trial_id"], b["trial_id"]]})
                break
            if b["tokens_per_s"] < a["tokens_per_s"]:
                out.append({"text": f"ZeRO-{a['zero_stage']}: a larger micro-batch is not always faster here: "
                                    f"{b['micro_batch']} gives {_fmt_tps(b)} against {_fmt_tps(a)} at {a['micro_batch']}.",
                            "trials": [a["trial_id"], b["trial_id"]]})
                break
    # Gradient accumulation at a fixed micro-batch.
    for g in group(base + ("zero_stage", "micro_batch"), "grad_accum"):
        a, b = g[0], g[-1]
        verdict = "pays" if b["tokens_per_s"] > a["tokens_per_s"] and not _overlap(a, b) else "does not pay in throughput"
        out.append({"text": f"Gradient accumulation {a['grad_accum']} → {b['grad_accum']} at micro-batch {a['micro_batch']} "
                            f"{verdict}: {_fmt_tps(a)} → {_fmt_tps(b)} (the global batch grows {b['grad_accum'] // a['grad_accum']}×).",
                    "trials": [a["trial_id"], b["trial_id"]]})
    # Precision.
    for g in group(("model", "seq_len", "world_size", "zero_stage", "micro_batch", "grad_accum", "offload"), "precision"):
        parts = ", ".join(f"{r['precision']} {_fmt_tps(r)}" for r in g)
        out.append({"text": f"Precision at ZeRO-{g[0]['zero_stage']}: {parts}.", "trials": [r["trial_id"] for r in g]})
    failed = [r for r in records if r["precision"] == "fp16" and r["status"] in ("unsupported", "diverged")]
    for r in failed:
        out.append({"text": f"fp16 was {r['status']} here: {(r['error'] or '').splitlines()[0]}", "trials": [r["trial_id"]]})
    # Offload.
    for g in group(("model", "precision", "seq_len", "world_size", "zero_stage", "micro_batch", "grad_accum"), "offload"):
        ref = next((r for r in g if r["offload"] == "none"), None)
        for r in g:
            if ref is None or r is ref:
                continue
            out.append({"text": f"Offload {r['offload']} at ZeRO-{r['zero_stage']}: model states on the device "
                                f"{fmt_mib(device_state_bytes(ref))} → {fmt_mib(device_state_bytes(r))} "
                                f"({fmt_mib(r.get('model_state_host_bytes') or 0)} on the host), throughput "
                                f"{r['tokens_per_s'] / ref['tokens_per_s'] - 1:+.0%}.", "trials": [ref["trial_id"], r["trial_id"]]})
    return out


def exportable_config(record: dict) -> dict:
    """The trial's DeepSpeed config for users to copy: llmbench's measurement settings out,
    and `train_batch_size` left for DeepSpeed to derive (micro × accumulation × ranks), so it
    initialises at any world size."""
    cfg = dict(record["ds_config"])
    cfg.pop("train_batch_size", None)
    cfg.pop("steps_per_print", None)
    cfg.pop("timers", None)
    opt = cfg.get("optimizer", {}).get("params", {})
    if opt.get("torch_adam") and record["env"].get("accelerator") == "cuda":
        opt.pop("torch_adam")
    return cfg


def default_memory_budget(env: dict) -> float | None:
    """Memory per rank: a GPU's memory, or on CPU the host's memory shared by its ranks."""
    mem = env.get("device_memory_bytes")
    if not mem:
        return None
    return mem if env.get("accelerator") == "cuda" else mem / max(1, env.get("world_size") or 1)


# A compression method (quantization, pruning or both) pays on this model and hardware when its perplexity rises by less than
# PPL_BUDGET against the unquantized model on the same batches, and it is faster (decode
# tokens/s beyond the 95% intervals at some batch size) or its weights are at least
# MIN_WEIGHT_SAVING smaller.
PPL_BUDGET = 0.01
MIN_WEIGHT_SAVING = 0.10
QUANT_RULE = (f"rule: a method pays when perplexity rises by less than {PPL_BUDGET:.0%} against none on the same "
              f"batches and it decodes faster (95% intervals apart at some batch size) or its weights are at least "
              f"{MIN_WEIGHT_SAVING:.0%} smaller")


def _faster(r: dict, ref: dict, batch: str) -> bool | None:
    """True/False when the decode-rate intervals at this batch size are apart; None within noise."""
    a = (r.get("decode_tokens_per_s_ci95") or {}).get(batch)
    b = (ref.get("decode_tokens_per_s_ci95") or {}).get(batch)
    if not a or not b:
        return None
    if a[0] > b[1]:
        return True
    if a[1] < b[0]:
        return False
    return None


def _undominated(paying: list[tuple], records: list[dict], out: list[dict]) -> list[tuple]:
    """Pruning stacked on a quantization (`magnitude-25+int8-wo`) that pays only as much as the
    quantization alone: no smaller (by MIN_WEIGHT_SAVING) and not faster beyond the 95%
    intervals at any batch size, while its perplexity is higher. Such a method is left out of
    the summary (a noise-level speed difference must not pick it), and its statement says why."""
    from .frames import method

    ok = {method(r): r for r in records if r.get("scenario") == "inference" and r["status"] == "ok"}
    names = {p[0] for p in paying}
    keep = []
    for p in paying:
        alone = p[0].split("+", 1)[1] if "+" in p[0] else None
        if alone in names and p[0] in ok:
            r, a = ok[p[0]], ok[alone]
            smaller = (r.get("weight_bytes") or 0) <= (1 - MIN_WEIGHT_SAVING) * (a.get("weight_bytes") or 0)
            faster = any(_faster(r, a, b) is True for b in (r.get("decode_tokens_per_s_ci95") or {}))
            if not smaller and not faster and (r.get("perplexity") or 0) >= (a.get("perplexity") or 0):
                for s in out:
                    if s["text"].startswith(f"{p[0]}: "):
                        s["text"] = s["text"].rstrip(".") + (f"; but {alone} alone pays the same at a lower perplexity "
                                                             f"({a['perplexity']:.4f}): the pruning adds error and saves "
                                                             f"nothing more here.")
                continue
        keep.append(p)
    return keep


def quant_statements(records: list[dict]) -> list[dict]:
    """One statement per compression method of the inference scenario (quantization, pruning,
    both), against `none` (weights, decode rate, perplexity, and whether it pays by
    QUANT_RULE), plus one per method this hardware refused, with the reason."""
    from .frames import quant_frame

    q = quant_frame(records)
    out: list[dict] = []
    paying = []
    for _, row in q.iterrows():
        if row["method"] == "none":
            continue
        if row["status"] != "ok":
            reason = (row["error"] or "").splitlines()[0].removeprefix("Unsupported: ") if row["error"] else ""
            out.append({"text": f"{row['method']}: {row['status']} here — {reason}", "trials": [row["trial_id"]]})
            continue
        ref = row["ref"]
        if ref is None:
            continue
        r = next(x for x in records if x["trial_id"] == row["trial_id"])
        tps, ref_tps = r.get("decode_tokens_per_s") or {}, ref.get("decode_tokens_per_s") or {}
        batches = sorted(set(tps) & set(ref_tps), key=int)
        speed = ", ".join(f"{100 * (tps[b] / ref_tps[b] - 1):+.0f}% at batch {b} ({ref_tps[b]:,.0f} → {tps[b]:,.0f})"
                          for b in batches)
        verdicts = [_faster(r, ref, b) for b in batches]
        if row["prune"].startswith("magnitude-") and row["quant"] == "none":
            verdicts = [None if v else v for v in verdicts]  # dense zeros compute the same: a faster reading is noise
        faster, slower = any(v is True for v in verdicts), all(v is False for v in verdicts)
        wchange, pchange = row["weight_change"], row["perplexity_change"]
        smaller = wchange is not None and -wchange >= MIN_WEIGHT_SAVING
        if pchange is None or pchange >= PPL_BUDGET:
            verdict = "does not pay: perplexity rises too much"
        elif faster and smaller:
            verdict = "pays: smaller and faster"
        elif smaller:
            verdict = "pays for memory only" + (": decoding is slower at every batch size here" if slower else
                                                ": no decode speed-up beyond the noise here")
        elif faster:
            verdict = "pays for speed only: the weights are not smaller"
        else:
            verdict = "does not pay: neither smaller nor faster"
        if row["prune"].startswith("magnitude-"):
            verdict += (f"; {row['prune']} zeroed {row['weight_sparsity']:.0%} of the decoder's linear weights (counted), "
                        f"kept dense: zeros stored in a dense tensor save no bytes and no time")
        if verdict.startswith("pays"):
            dchange = [tps[b] / ref_tps[b] - 1 for b in batches]
            paying.append((row["method"], faster, smaller, wchange, sum(dchange) / max(1, len(dchange)), pchange))
        out.append({"text": f"{row['method']}: weights {100 * wchange:+.0f}% ({fmt_mib(ref['weight_bytes'])} → "
                            f"{fmt_mib(r['weight_bytes'])}, measured), decode tok/s {speed}, perplexity "
                            f"{100 * pchange:+.2f}% ({ref['perplexity']:.4f} → {r['perplexity']:.4f}): {verdict}.",
                    "trials": [ref["trial_id"], row["trial_id"]]})
    paying = _undominated(paying, records, out)
    if out:
        both = [p for p in paying if p[1] and p[2]]
        small = [p for p in paying if p[2]]
        fast = [p for p in paying if p[1]]
        # Among methods that pay the same way: the fastest decode (mean change over batch sizes), then
        # the smaller perplexity rise, then the smaller weights.
        def rank(p):
            return (-p[4], p[5], p[3])

        if both:
            best = min(both, key=rank)
            summary = (f"For this model and hardware, {best[0]} pays: weights {100 * best[3]:+.0f}% and faster decoding "
                       f"at {100 * best[5]:+.2f}% perplexity.")
        elif small:
            best = min(small, key=rank)
            summary = (f"For this model and hardware, {best[0]} pays for memory: weights {100 * best[3]:+.0f}% at "
                       f"{100 * best[5]:+.2f}% perplexity, with the least decode slowdown of the methods that pay "
                       f"({100 * best[4]:+.0f}% tok/s averaged over batch sizes); " +
                       (f"{', '.join(p[0] for p in fast)} decode faster." if fast else
                        "no method decodes faster than none beyond the noise here."))
        elif fast:
            best = min(fast, key=rank)
            summary = f"For this model and hardware, {best[0]} pays for speed only ({100 * best[4]:+.0f}% decode tok/s)."
        else:
            summary = "For this model and hardware, no compression method pays: keep the uncompressed model."
        cited = list(dict.fromkeys(t for s in out for t in s["trials"]))
        out.insert(0, {"text": f"{summary} ({QUANT_RULE}.)", "trials": cited})
    return out
