"""The throughput model against a stored run: `python -m llmbench.plan.throughput_accuracy DB [RUN]
[--calibrate TRIAL,...] [--kernels-db DB]` prints, per trial, the predicted and measured step
time, the rank correlation within each micro-batch and the error on the trials the model was
not calibrated on (docs/search.md's throughput tables).

The calibration set, unless named: the corners of the grid, the lowest and highest ZeRO stage
at the smallest and largest FLOPs per step (4 trials); every other trial is held out. The
collectives are the run's own (a search's probe), or the newest `llmbench kernels` run on the
same device with collectives at the run's world size (`collective_links`).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from ..models import config_from_dict, model_stats
from .accuracy import spec_of
from .throughput import ComputeFit, LinkFit, calibrate, fit_collectives, predict_step, spearman, step_flops


def corners(samples: list[tuple]) -> list[str]:
    """The lowest and highest stage at the smallest and largest FLOPs per step."""
    lo, hi = min(s[1].zero_stage for s in samples), max(s[1].zero_stage for s in samples)
    out = []
    for stage in sorted({lo, hi}):
        at = [s for s in samples if s[1].zero_stage == stage]
        for pick in (min, max):
            out.append(pick(at, key=lambda s: (step_flops(s[1], s[2]), s[0]))[0])
    return list(dict.fromkeys(out))


def evaluate(records: list[dict], links: dict[str, LinkFit], calibration: list[str] | None = None,
             accelerator: str = "cpu") -> dict:
    """Predict every ok training trial of `records` from a fit on `calibration` (default: corners)."""
    samples = []
    for r in records:
        if r["status"] != "ok" or r["scenario"] != "train" or not r.get("step_time_s"):
            continue
        samples.append((r["trial_id"], spec_of(r), model_stats(config_from_dict(r["model_config"])), r.get("ds_config"),
                        float(r["step_time_s"])))
    if not samples:
        return {"rows": [], "fit": ComputeFit(), "by_micro_batch": {}, "held_out_errors": []}
    names = calibration or corners(samples)
    fit = calibrate([s for s in samples if s[0] in names], links)
    rows = []
    for tid, spec, stats, dsc, measured in samples:
        p = predict_step(spec, stats, dsc, links, fit, accelerator)
        rows.append(dict(trial=tid, micro_batch=spec.micro_batch, stage=spec.zero_stage, measured_s=measured,
                         predicted_s=p.step_s, error=p.step_s / measured - 1, calibration=tid in names,
                         compute_s=p.compute_s, comm_s=p.comm_s, calls_s=p.call_overhead_s,
                         measured_tps=spec.micro_batch * spec.seq_len * spec.grad_accum * spec.world_size / measured,
                         predicted_tps=p.tokens_per_s))
    by_mb: dict[int, float | None] = {}
    for mb in sorted({r["micro_batch"] for r in rows}):
        g = [r for r in rows if r["micro_batch"] == mb]
        by_mb[mb] = spearman([r["predicted_tps"] for r in g], [r["measured_tps"] for r in g])
    return {"rows": rows, "fit": fit, "by_micro_batch": by_mb,
            "held_out_errors": [r["error"] for r in rows if not r["calibration"]]}


def stage_deltas(result: dict, records: list[dict]) -> list[dict]:
    """The communication term's check at a fixed world size: for each group of trials that
    differ only in their ZeRO stage, the change in step time from the lowest stage, predicted
    and measured (compute cancels; what is left is the collectives and their calls)."""
    from ..identity import settings_fields

    keys = [k for k in settings_fields("train") if k not in ("zero_stage", "param_persistence_threshold")]
    by_id = {r["trial_id"]: r for r in records}
    groups: dict[tuple, list[dict]] = {}
    for row in result["rows"]:
        rec = by_id[row["trial"]]
        groups.setdefault(tuple(repr(rec.get(k)) for k in keys), []).append(row)
    out = []
    for rows in groups.values():
        base = min(rows, key=lambda r: r["stage"])
        for r in rows:
            if r is not base:
                out.append(dict(trial=r["trial"], base=base["trial"], measured=r["measured_s"] - base["measured_s"],
                                predicted=r["predicted_s"] - base["predicted_s"]))
    return out


def markdown(result: dict) -> str:
    fit: ComputeFit = result["fit"]
    lines = ["| trial | step measured s | predicted s | error | compute / wire / per-call s | calibration |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['trial']} | {r['measured_s']:.4f} | {r['predicted_s']:.4f} | {r['error']:+.1%} | "
                     f"{r['compute_s']:.4f} / {r['comm_s']:.4f} / {r['calls_s']:.4f} | {'yes' if r['calibration'] else ''} |")
    rho = [v for v in result["by_micro_batch"].values() if v is not None]
    errs = sorted(abs(e) for e in result["held_out_errors"])
    lines += ["", f"fit: a = {fit.a_s * 1e3:.2f} ms per step, {fit.tflops or 0:.4f} TFLOP/s achieved, "
                  f"γ = {fit.gamma_s * 1e3:.2f} ms per collective call ({fit.source}: {', '.join(fit.trials)})",
              "rank correlation (Spearman) of predicted with measured tokens/s within each micro-batch: "
              + ", ".join(f"mb {mb}: {v:.2f}" if v is not None else f"mb {mb}: —" for mb, v in result["by_micro_batch"].items())
              + (f"; median {statistics.median(rho):.2f}, lowest {min(rho):.2f}" if rho else "")]
    if errs:
        q = lambda f: errs[min(len(errs) - 1, int(f * len(errs)))]  # noqa: E731
        lines.append(f"step-time error on {len(errs)} held-out trials: median |error| {statistics.median(errs):.1%}, "
                     f"90th percentile {q(0.9):.1%}, largest {errs[-1]:.1%}; within ±10%: "
                     f"{sum(e <= 0.10 for e in errs)}, within ±20%: {sum(e <= 0.20 for e in errs)}")
    return "\n".join(lines) + "\n"


def collective_links(store, device_name: str | None, world_size: int) -> tuple[dict[str, LinkFit], str | None]:
    """α and β from the newest `llmbench kernels` run on this device with collectives at this world size."""
    for run_id in store.kernels_runs(device_name):
        rows = [r for r in store.kernels(run_id) if r.get("bench") == "collective" and r.get("world_size") == world_size]
        if rows:
            return fit_collectives(rows, world_size, f"kernels run {run_id}"), run_id
    return {}, None


def links_for(store, run: dict, kernels_db: Path | None = None) -> tuple[dict[str, LinkFit], str | None]:
    """A run's collectives: its own (a search's probe), else `collective_links` at the run's
    world size, in this store or `kernels_db`."""
    from ..store import Store

    own = [r for r in store.kernels(run["run_id"]) if r.get("bench") == "collective"] if kernels_db is None else []
    if own:
        return fit_collectives(own, own[0]["world_size"], f"kernels run {run['run_id']}"), run["run_id"]
    n = max((r.get("world_size") or 0 for r in store.trials(run["run_id"])), default=0) or 2
    return collective_links(Store(kernels_db) if kernels_db else store, run["env"].get("device_name"), n)


def main(argv: list[str]) -> None:
    import argparse

    from ..store import Store

    ap = argparse.ArgumentParser(prog="python -m llmbench.plan.throughput_accuracy")
    ap.add_argument("db", type=Path)
    ap.add_argument("run", nargs="?")
    ap.add_argument("--calibrate", help="comma-separated trial ids to calibrate on (default: the grid's corners)")
    ap.add_argument("--kernels-db", type=Path, help="a store holding a `llmbench kernels` run with collectives")
    a = ap.parse_args(argv)
    store = Store(a.db)
    run = store.run(a.run) if a.run else store.run()
    links, kid = links_for(store, run, a.kernels_db)
    print(f"run {run['run_id']}; collectives: {kid or 'none (wire time left out)'}")
    for k, v in links.items():
        print(f"  {k}: α {v.alpha_s * 1e6:.1f} µs per hop, β {v.beta_Bps / 1e9:.3f} GB/s ({v.points} sizes)")
    records = store.trials(run["run_id"])
    result = evaluate(records, links, a.calibrate.split(",") if a.calibrate else None,
                      "cuda" if str(run["env"].get("accelerator", "cpu")) == "cuda" else "cpu")
    print(markdown(result))
    deltas = stage_deltas(result, records)
    if deltas:
        print("| trial | against | measured Δ step ms | predicted Δ step ms |\n|---|---|---|---|")
        for d in deltas:
            print(f"| {d['trial']} | {d['base']} | {d['measured'] * 1e3:+.1f} | {d['predicted'] * 1e3:+.1f} |")
        m, p = [d["measured"] for d in deltas], [d["predicted"] for d in deltas]
        rho = spearman(p, m)
        print(f"\n{len(deltas)} stage changes: rank correlation of predicted with measured Δ "
              f"{rho:.2f}" if rho is not None else "")


if __name__ == "__main__":
    main(sys.argv[1:])
