"""The memory model against a stored run: `python -m llmbench.plan.accuracy DB [RUN]` prints, per
trial, each predicted term beside what the trial measured (docs/plan.md's tables).

Predictions are made again from each record's settings, model and DeepSpeed configs with the
code as it is now, so a changed model is judged on the same measurements.
"""

from __future__ import annotations

import os
import statistics
import sys

from ..models import config_from_dict, model_stats
from ..spec import TrialSpec
from .memory import predict

MiB = 2**20


def spec_of(rec: dict) -> TrialSpec:
    """The TrialSpec a stored record was run with (its settings part)."""
    return TrialSpec(**{k: rec[k] for k in TrialSpec.model_fields if k in rec})


def repredict(rec: dict):
    spec = spec_of(rec)
    config = config_from_dict(rec["model_config"])
    device = "cpu" if str((rec.get("devices") or ["cpu"])[0]).startswith("cpu") else "cuda"
    return predict(spec, model_stats(config), config, device, rec.get("ds_config"),
                   first_in_process=bool(rec.get("pool_start_s")))


def rows(records: list[dict]) -> list[dict]:
    out = []
    for r in records:
        if r["status"] != "ok" or r["scenario"] != "train" or r.get("activation_bytes") is None:
            continue
        p = repredict(r)
        out.append(dict(trial=r["trial_id"], act_m=r["activation_bytes"], act_p=p.activations,
                        states_m=r["model_state_bytes"], states_p=p.states_device + p.states_host,
                        alloc_m=r.get("trial_allocated_peak_bytes"), alloc_p=p.allocated_peak,
                        peak_m=r["trial_peak_mem_bytes"], peak_p=p.peak, one_time=p.one_time, phase=p.phase, ds=p.deepspeed_estimate,
                        residual=r["trial_peak_mem_bytes"] - (p.peak - p.fixed)))
    return out


def _summary(errs: list[float], what: str) -> str:
    within = sum(abs(e) <= 0.20 for e in errs)
    under = sum(e < -0.10 for e in errs)
    return (f"{what} within ±20% on {within} ({within / len(errs):.0%}), under-predicted by more than 10% on {under}, "
            f"median error {statistics.median(errs):+.1%}, largest {max(errs, key=abs):+.1%}")


def markdown(table: list[dict]) -> str:
    lines = ["| trial | activations measured / predicted MiB | model states measured / predicted MiB | DeepSpeed's estimate MiB | allocator peak measured / predicted MiB | error | RSS peak measured / predicted MiB | error | phase |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        ds = f"{r['ds'] / MiB:.1f}" if r["ds"] is not None else "—"
        alloc = (f"{r['alloc_m'] / MiB:.1f} / {r['alloc_p'] / MiB:.1f} | {r['alloc_p'] / r['alloc_m'] - 1:+.1%}"
                 if r["alloc_m"] else "— | —")
        lines.append(f"| {r['trial']} | {r['act_m'] / MiB:.2f} / {r['act_p'] / MiB:.2f} | {r['states_m'] / MiB:.2f} / "
                     f"{r['states_p'] / MiB:.2f} | {ds} | {alloc} | {r['peak_m'] / MiB:.1f} / {r['peak_p'] / MiB:.1f} | "
                     f"{r['peak_p'] / r['peak_m'] - 1:+.1%} | {r['phase']} |")
    acts = [abs(r["act_p"] / r["act_m"] - 1) for r in table]
    allocs = [r["alloc_p"] / r["alloc_m"] - 1 for r in table if r["alloc_m"]]
    if table:
        lines += ["", f"{len(table)} trials: activations within ±10% on {sum(a <= 0.10 for a in acts)} (largest {max(acts):.2%}); "
                      + (_summary(allocs, "allocator peak") + f" ({len(allocs)} measured)" if allocs else "no allocator peak measured")
                      + "; " + _summary([r["peak_p"] / r["peak_m"] - 1 for r in table], "RSS peak")
                      + f"; RSS residual beyond the modelled terms median {statistics.median(r['residual'] for r in table) / MiB:.0f} MiB."]
    return "\n".join(lines) + "\n"


def pruning(table: list[dict], margin: float | None = None, measure: str = "peak") -> str:
    """The issue's pruning test on a --no-prune run: a budget at the median measured own peak;
    which trials the planner would prune (predicted above the budget by more than the margin),
    how many of those measured above it, how many it admits measured above it. `measure`:
    "alloc" (the allocator's peak: what --memory-budget judges) or "peak" (the RSS on a CPU, shown
    for comparison)."""
    from .prune import PRUNE_MARGIN

    margin = PRUNE_MARGIN if margin is None else margin
    table = [r for r in table if r[f"{measure}_m"]]
    if not table:
        return f"{measure}: nothing measured\n"
    budget = statistics.median(r[f"{measure}_m"] for r in table)
    one_time = (lambda r: r["one_time"]) if measure == "peak" else (lambda r: 0.0)  # as prune.predicted_bytes
    pruned = [r for r in table if r[f"{measure}_p"] - one_time(r) > budget * (1 + margin)]
    admitted = [r for r in table if r not in pruned]
    right = sum(r[f"{measure}_m"] > budget for r in pruned)
    wrong_in = sum(r[f"{measure}_m"] > budget for r in admitted)
    name = {"peak": "own peak (RSS on a CPU, not judged)", "alloc": "allocator peak (what --memory-budget judges)"}[measure]
    return (f"{name}: budget {budget / MiB:.1f} MiB (the median measured over {len(table)} trials), margin {margin:.0%}: "
            f"pruned {len(pruned)} ({len(pruned) / len(table):.0%} of the grid), of which {right} measured above the "
            f"budget ({right / len(pruned):.0%}); admitted {len(admitted)}, of which {wrong_in} measured above it.\n"
            if pruned else f"{name}: budget {budget / MiB:.1f} MiB, margin {margin:.0%}: nothing pruned\n")


USAGE = "usage: python -m llmbench.plan.accuracy DB [RUN]  (RUN: a run id in the store; default: its latest run)"


def main(argv: list[str]) -> None:
    from pathlib import Path

    from ..store import Store

    if not argv or argv[0] in ("-h", "--help") or len(argv) > 2:
        print(USAGE)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    if not Path(argv[0]).is_file():
        print(f"error: {argv[0]}: no such store", file=sys.stderr)
        raise SystemExit(2)
    store = Store(argv[0])
    run = store.run(argv[1] if len(argv) > 1 else None)
    if run is None:
        print(f"error: {argv[0]}: " + (f"no run {argv[1]}" if len(argv) > 1 else "no run stored"), file=sys.stderr)
        raise SystemExit(2)
    print(f"run {run['run_id']}" + ("" if len(argv) > 1 else " (the store's latest; pass a run id to choose another)"))
    # the run's accelerator for DeepSpeed's config classes, which otherwise log their auto-detection
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if str(run["env"].get("accelerator")) == "cuda" else "cpu")
    table = rows(store.trials(run["run_id"]))
    if not table:
        print(f"run {run['run_id']}: no finished training trial with a measured activation count")
        return
    print(markdown(table))
    print("".join(pruning(table, margin, "alloc") for margin in (0.0, 0.05, None)) + pruning(table, measure="peak"))


if __name__ == "__main__":
    main(sys.argv[1:])
