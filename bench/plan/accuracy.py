"""The memory model against a stored run: `python -m llmbench.plan.accuracy DB [RUN]` prints, per
trial, each predicted term beside what the trial measured (docs/plan.md's tables).

Predictions are made again from each record's settings, model and DeepSpeed configs with the
code as it is now, so a changed model is judged on the same measurements.
"""

from __future__ import annotations

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
                        peak_m=r["trial_peak_mem_bytes"], peak_p=p.peak, one_time=p.one_time, phase=p.phase, ds=p.deepspeed_estimate,
                        residual=r["trial_peak_mem_bytes"] - (p.peak - p.fixed)))
    return out


def markdown(table: list[dict]) -> str:
    lines = ["| trial | activations measured / predicted MiB | model states measured / predicted MiB | DeepSpeed's estimate MiB | own peak measured / predicted MiB | peak error | phase |",
             "|---|---|---|---|---|---|---|"]
    for r in table:
        ds = f"{r['ds'] / MiB:.1f}" if r["ds"] is not None else "—"
        lines.append(f"| {r['trial']} | {r['act_m'] / MiB:.2f} / {r['act_p'] / MiB:.2f} | {r['states_m'] / MiB:.2f} / "
                     f"{r['states_p'] / MiB:.2f} | {ds} | {r['peak_m'] / MiB:.1f} / {r['peak_p'] / MiB:.1f} | "
                     f"{r['peak_p'] / r['peak_m'] - 1:+.1%} | {r['phase']} |")
    errs = [r["peak_p"] / r["peak_m"] - 1 for r in table]
    acts = [abs(r["act_p"] / r["act_m"] - 1) for r in table]
    if errs:
        within = sum(abs(e) <= 0.20 for e in errs)
        under = sum(e < -0.10 for e in errs)
        lines += ["", f"{len(table)} trials: activations within ±10% on {sum(a <= 0.10 for a in acts)} (largest "
                      f"{max(acts):.2%}); own peak within ±20% on {within} ({within / len(errs):.0%}); under-predicted by more "
                      f"than 10% on {under}; median peak error {statistics.median(errs):+.1%}, residual beyond the modelled "
                      f"terms median {statistics.median(r['residual'] for r in table) / MiB:.0f} MiB."]
    return "\n".join(lines) + "\n"


def pruning(table: list[dict], margin: float | None = None) -> str:
    """The issue's pruning test on a --no-prune run: a budget at the median measured own peak;
    which trials the planner would prune (predicted above the budget by more than the margin),
    how many of those measured above it, how many it admits measured above it."""
    from .prune import PRUNE_MARGIN

    margin = PRUNE_MARGIN if margin is None else margin
    budget = statistics.median(r["peak_m"] for r in table)
    pruned = [r for r in table if r["peak_p"] - r["one_time"] > budget * (1 + margin)]  # as prune.predicted_bytes
    admitted = [r for r in table if r not in pruned]
    right = sum(r["peak_m"] > budget for r in pruned)
    wrong_in = sum(r["peak_m"] > budget for r in admitted)
    return (f"budget {budget / MiB:.1f} MiB (median measured own peak of {len(table)} trials), margin {margin:.0%}: "
            f"pruned {len(pruned)} ({len(pruned) / len(table):.0%} of the grid), of which {right} measured above the "
            f"budget ({right / len(pruned):.0%}); admitted {len(admitted)}, of which {wrong_in} measured above it.\n"
            if pruned else f"budget {budget / MiB:.1f} MiB: nothing pruned\n")


def main(argv: list[str]) -> None:
    from ..store import Store

    store = Store(argv[0])
    run = store.run(argv[1] if len(argv) > 1 else None)
    table = rows(store.trials(run["run_id"]))
    if not table:
        print(f"run {run['run_id']}: no finished training trial with a measured activation count")
        return
    print(markdown(table))
    print(pruning(table))


if __name__ == "__main__":
    main(sys.argv[1:])
