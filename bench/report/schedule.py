"""The learning-rate schedule section: which schedule reaches the lowest loss at the run's
token budget, beyond the noise across seeds, and whether throughput moved.

Trials are compared within a group that differs only in the schedule and the seed (same
model, precision, ZeRO stage, batch, steps, peak lr). A seed sets the weights, the data
order and the Markov source itself (data.py), so each seed has its own entropy floor: every
loss is taken as its gap to its own floor. Schedules are compared with the constant one seed
by seed (paired: the same seed means the same initial weights and batches), and a
difference counts when the 95% Student-t interval of the paired differences excludes 0
(collect/stats.mean_ci95).

Loss at the budget: the mean gap over the last `LAST_STEPS` optimizer steps (a single step's
loss carries its batch's noise), all trials of a group having run the same steps on the same
number of tokens.
"""

from __future__ import annotations

import json
import math
import statistics

import pandas as pd

from ..collect.stats import mean_ci95

LAST_STEPS = 5
# what the schedule and the seed leave out of a trial's identity (identity.settings_fields): the group
SCHEDULE_KEYS = frozenset({"seed", "lr_schedule", "lr_warmup_steps", "lr_total_steps", "lr_min_ratio", "lr_warmup_type"})
KNOBS = (("lr_warmup_steps", "warmup"), ("lr_total_steps", "total"), ("lr_min_ratio", "min ratio"),
         ("lr_warmup_type", "warm-up"))


def label(r: dict) -> str:
    """The schedule as the report names it: its type, and the knobs set explicitly."""
    knobs = [f"{name} {r[k]}" for k, name in KNOBS if r.get(k) is not None]
    return (r.get("lr_schedule") or "constant") + (f" ({', '.join(knobs)})" if knobs else "")


def _ok(records: list[dict]) -> list[dict]:
    """Finished trials whose loss at the budget is a number (an fp16 step skipped for overflow
    can leave a NaN among the last steps: such a trial is left out, not averaged)."""
    return [r for r in records if r["status"] == "ok" and r.get("entropy_floor") is not None and r.get("losses")
            and all(math.isfinite(x) for x in r["losses"][-LAST_STEPS:]) and (r.get("tokens_per_s") or 0) > 0]


def groups(records: list[dict]) -> list[list[dict]]:
    """Groups of finished training trials that differ only in schedule and seed (every other
    setting of their identity equal), with at least two schedules; one trial per schedule and
    seed (the first)."""
    from ..identity import settings_fields

    keys = [k for k in settings_fields("train") if k not in SCHEDULE_KEYS]
    out: dict[tuple, dict[tuple, dict]] = {}
    for r in _ok(records):
        out.setdefault(tuple(json.dumps(r.get(k), default=str) for k in keys), {}).setdefault((label(r), r["seed"]), r)
    out = {k: list(v.values()) for k, v in out.items()}
    return [g for g in out.values() if len({label(r) for r in g}) > 1]


def curve_frame(records: list[dict]) -> pd.DataFrame:
    """Long format, one row per (trial, optimizer step), warm-up steps included: the schedule,
    seed, step (1 = the first), loss, its gap to the trial's floor, and the lr applied."""
    rows = []
    for g in groups(records):
        for r in g:
            losses = list(r.get("warmup_losses") or []) + list(r["losses"])
            lrs = list(r.get("warmup_lrs") or []) + list(r.get("lrs") or [])
            for i, loss in enumerate(losses):
                rows.append({"trial_id": r["trial_id"], "schedule": label(r), "seed": r["seed"], "step": i + 1,
                             "loss": loss, "gap": loss - r["entropy_floor"], "lr": lrs[i] if i < len(lrs) else None})
    return pd.DataFrame(rows, columns=["trial_id", "schedule", "seed", "step", "loss", "gap", "lr"])


def budget_gap(r: dict) -> float:
    """The loss gap to the floor at the token budget: the mean over the last LAST_STEPS steps."""
    tail = r["losses"][-LAST_STEPS:]
    return statistics.fmean(tail) - r["entropy_floor"]


def budget_tokens(r: dict) -> int:
    """Tokens every trial of the group trained on: warm-up and timed steps, all ranks."""
    return (r["warmup_steps"] + r["steps"]) * r["micro_batch"] * r["grad_accum"] * r["world_size"] * r["seq_len"]


def _paired(g: list[dict], a: str, b: str, value) -> list[float]:
    """value(b's trial) − value(a's trial) for every seed both schedules ran."""
    by = {(label(r), r["seed"]): r for r in g}
    seeds = sorted({s for (lab, s) in by if lab == a} & {s for (lab, s) in by if lab == b})
    return [value(by[(b, s)]) - value(by[(a, s)]) for s in seeds]


def _interval(diffs: list[float], fmt) -> tuple[str, bool | None]:
    """"(95% interval x to y)" and whether it excludes 0 (None: too few seeds for one)."""
    ci = mean_ci95(diffs)
    if ci is None:
        return "(one seed: no interval; run 3 or more seeds)", None
    return f"(95% interval {fmt(ci[0])} to {fmt(ci[1])}, {len(diffs)} seeds)", not (ci[0] <= 0 <= ci[1])


def statements(records: list[dict]) -> list[dict]:
    """Per group: a summary (the schedule with the lowest mean loss at the budget, and whether it
    beats the reference beyond the seed noise), one statement per schedule against the
    reference (constant where the group has it), and one on throughput. Every comparison is
    over the seeds both schedules ran; each 95% interval is for its own comparison (no
    correction for the several made)."""
    out: list[dict] = []
    for g in groups(records):
        labels = list(dict.fromkeys(label(r) for r in g))
        ref = "constant" if "constant" in labels else labels[0]
        mean_gap = {lab: statistics.fmean(budget_gap(r) for r in g if label(r) == lab) for lab in labels}
        seeds = {lab: sum(1 for r in g if label(r) == lab) for lab in labels}
        tokens = budget_tokens(g[0])
        lines, beats = [], []
        for lab in labels:
            if lab == ref:
                continue
            d = _paired(g, ref, lab, budget_gap)
            if not d:
                continue
            text, apart = _interval(d, lambda x: f"{x:+.3f}")
            mean = statistics.fmean(d)
            a = statistics.fmean(budget_gap(r) for r in g if label(r) == lab and r["seed"] in _seeds(g, ref, lab))
            b = statistics.fmean(budget_gap(r) for r in g if label(r) == ref and r["seed"] in _seeds(g, ref, lab))
            if apart is None:
                verdict = "untested"
            elif apart:
                verdict = f"{'lower' if mean < 0 else 'higher'} than {ref} beyond the seed noise"
            else:
                verdict = f"no difference from {ref} beyond the seed noise"
            if apart and mean < 0:
                beats.append(lab)
            lines.append({"text": f"{lab}: loss {a:.3f} nats above the floor at the budget against {ref}'s {b:.3f} "
                                  f"(means over the {len(d)} seed{'s' if len(d) != 1 else ''} both ran); paired "
                                  f"difference {mean:+.3f} nats {text}: {verdict}.",
                          "trials": [r["trial_id"] for r in g if label(r) in (ref, lab)]})
        best = min(mean_gap, key=mean_gap.get)
        head = (f"At this token budget ({tokens:,} tokens: {g[0]['warmup_steps'] + g[0]['steps']} optimizer steps, "
                f"loss = mean of the last {LAST_STEPS} steps, as a gap to each seed's entropy floor), ")
        if best in beats:
            tied = []  # schedules that beat the reference too and are within the seed noise of the best
            for lab in beats:
                if lab != best:
                    ci = mean_ci95(_paired(g, best, lab, budget_gap))
                    if ci is not None and ci[0] <= 0 <= ci[1]:
                        tied.append(f"{lab} ({mean_gap[lab]:.3f}; {lab} − {best}: 95% interval {ci[0]:+.3f} to {ci[1]:+.3f})")
            head += (f"{best} reaches the lowest loss, {mean_gap[best]:.3f} nats above the floor against {ref}'s "
                     f"{mean_gap[ref]:.3f} (means over {seeds[best]} and {seeds[ref]} seeds), beyond the seed noise")
            head += f"; tied with {', '.join(tied)}: no difference between them beyond the seed noise" if tied else ""
            section = next(r for r in g if label(r) == best).get("ds_config", {}).get("scheduler")
            head += f". Its DeepSpeed config section: \"scheduler\": {json.dumps(section)}." if section else "."
        elif beats:
            head += (f"{', '.join(beats)} reach{'es' if len(beats) == 1 else ''} a lower loss than {ref} beyond the seed "
                     f"noise; the lowest mean, {best}'s {mean_gap[best]:.3f} nats, is not shown lower than {ref} beyond it.")
        else:
            head += (f"no schedule reaches a lower loss than {ref} beyond the seed noise"
                     f"{f' (lowest mean: {best}, {mean_gap[best]:.3f} nats)' if best != ref else ''}.")
        out.append({"text": head, "trials": [r["trial_id"] for r in g]})
        out += lines
        out.append(_throughput(g, labels, ref))
    return out


def _seeds(g: list[dict], a: str, b: str) -> set:
    """The seeds both schedules ran."""
    return {r["seed"] for r in g if label(r) == a} & {r["seed"] for r in g if label(r) == b}


def _throughput(g: list[dict], labels: list[str], ref: str) -> dict:
    """Whether the schedule moved tokens/s: paired log-ratios against the reference per seed.
    "No difference" is said only where every interval holds 0; a schedule is host-side
    arithmetic once per step, so none is expected."""
    import math

    parts, moved, few, widths = [], [], [], []
    for lab in labels:
        if lab == ref:
            continue
        d = _paired(g, ref, lab, lambda r: math.log(r["tokens_per_s"]))
        if not d:
            continue
        ci = mean_ci95(d)
        if ci:
            widths.append(100 * (math.exp((ci[1] - ci[0]) / 2) - 1))
        pct = lambda x: f"{100 * (math.exp(x) - 1):+.1f}%"  # noqa: E731
        parts.append(f"{lab} {pct(statistics.fmean(d))}" + (f" ({pct(ci[0])} to {pct(ci[1])})" if ci else " (one seed)"))
        if ci is None:
            few.append(lab)
        elif not ci[0] <= 0 <= ci[1]:
            moved.append(lab)
    if not parts:
        return {"text": "Throughput: no pair of trials with the same seed to compare.", "trials": []}
    if moved:
        verdict = f"{', '.join(moved)} differ{'s' if len(moved) == 1 else ''} from {ref} beyond the noise across seeds"
    elif few:
        verdict = "one seed: no interval, so no statement on throughput (run 3 or more seeds)"
    else:
        verdict = (f"no schedule changes throughput beyond the noise across seeds (intervals up to ±{max(widths):.1f}% "
                   f"wide: a smaller change would not show)")
    return {"text": f"Throughput against {ref}, tokens/s paired by seed (95% interval): {'; '.join(parts)}: {verdict}.",
            "trials": [r["trial_id"] for r in g]}
