"""One static, offline HTML file per run: figures embedded, every string from data escaped."""

from __future__ import annotations

import json
import time
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape

from . import figures
from .frames import MiB, loss_frame, quant_frame, split, trials_frame
from .guidance import OBJECTIVES, QUANT_RULE, default_memory_budget, quant_statements, recommend, statements, interval_label, tokens_ci
from .kernels import findings as kernel_findings, kernel_figures


def _fmt(v, digits=3):
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    if isinstance(v, float):
        return f"{v:,.{digits}g}" if abs(v) < 1000 else f"{v:,.0f}"
    return v


def render(run: dict, records: list[dict], memory_budget: float | None = None, kernels: list[dict] | None = None,
           kernels_run: str | None = None) -> str:
    env = Environment(loader=PackageLoader("llmbench.report", "templates"), autoescape=select_autoescape(["j2", "html"]))
    env.filters["fmt"] = _fmt
    env.filters["mib"] = lambda b: f"{b / MiB:,.2f}" if isinstance(b, (int, float)) else "–"
    env.filters["pct"] = lambda x: f"{x:+.1%}" if isinstance(x, (int, float)) else "–"
    all_records = records
    records, inference = split(all_records)  # training figures and recommendations: training records only
    df = trials_frame(records)
    ok = df[df["status"] == "ok"] if not df.empty else df
    figs = {}
    if not ok.empty:
        figs["Throughput vs micro-batch"] = figures.throughput_vs_micro_batch(df)
        figs["Model-state bytes per rank by ZeRO stage"] = figures.model_states_by_stage(df)
        figs["Memory per rank: model states and the rest"] = figures.memory_by_stage(df)
        if "fwd_s" in ok and ok["fwd_s"].notna().any():
            figs["Where the time goes"] = figures.step_breakdown(df)
        figs["Step times per rank"] = figures.per_rank_step_times(records)
        floors = [r["entropy_floor"] for r in records if r.get("entropy_floor") is not None]
        floor = floors[0] if floors else None
        figs["Loss curves"] = figures.loss_curves(loss_frame(records), floor)
        if ok["mfu"].notna().any() or ok["mfu_vs_measured_peak"].notna().any():
            figs["MFU by ZeRO stage and micro-batch"] = figures.mfu_heatmap(df)
        if ok["grad_accum"].nunique() > 1:
            figs["Throughput vs gradient accumulation"] = figures.throughput_vs_accumulation(df)
        if ok["precision"].nunique() > 1:
            figs["Loss per precision"] = figures.loss_by_precision(loss_frame(records), floor)
        figs["Throughput vs memory (Pareto frontier)"] = figures.pareto(df)
    everything = trials_frame(all_records)
    if not everything.empty and (everything["status"] != "ok").any():
        figs["Failures at a glance"] = figures.failures(everything)
    quant_fig = None
    if any(r["quant"] != "none" for r in inference):
        quant_fig = figures.quant_changes(quant_frame(inference))
    kernels = kernels or []
    budget = memory_budget or default_memory_budget(run["env"])
    recs = [recommend(records, o, budget) for o in OBJECTIVES] if records else []
    env.globals["tokens_ci"] = tokens_ci
    env.globals["interval_label"] = interval_label
    return env.get_template("report.html.j2").render(
        run=run, records=records, inference=inference, quant_figure=quant_fig, quant_guidance=quant_statements(inference),
        quant_rule=QUANT_RULE, figures=figs,
        quant_batches=sorted({b for r in inference for b in (r.get("decode_tokens_per_s") or {})}, key=int), recommendations=recs, budget=budget, guidance=statements(records),
        env_json=json.dumps(run["env"], indent=2, sort_keys=True),
        generated=time.strftime("%Y-%m-%d %H:%M:%S"),
        n_trials=len(all_records), errors=[r for r in all_records if r["error"]],
        counts={s: sum(r["status"] == s for r in all_records) for s in sorted({r["status"] for r in all_records})},
        kernels=kernels, kernels_run=kernels_run or run["run_id"], kernel_figures=kernel_figures(kernels),
        kernel_findings=kernel_findings(kernels),
    )


def write_report(run: dict, records: list[dict], out_dir: Path, memory_budget: float | None = None,
                 kernels: list[dict] | None = None, kernels_run: str | None = None) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"report-{run['run_id']}.html"
    path.write_text(render(run, records, memory_budget, kernels, kernels_run), encoding="utf-8")
    return path


def write_compare(a_name: str, b_name: str, result, out_dir: Path) -> Path:
    """`llmbench compare`'s page: the engine's verdicts (llmbench.gate), as its table shows them."""
    env = Environment(loader=PackageLoader("llmbench.report", "templates"), autoescape=select_autoescape(["j2", "html"]))
    env.filters["fmt"] = _fmt
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    safe = lambda s: "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in Path(s).name)  # noqa: E731
    path = out_dir / f"compare-{safe(a_name)}-{safe(b_name)}.html"
    path.write_text(env.get_template("compare.html.j2").render(a=a_name, b=b_name, result=result), encoding="utf-8")
    return path
