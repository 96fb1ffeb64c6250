"""One static, offline HTML file per run: figures embedded, every string from data escaped."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

from . import ReportWriteError, figures, schedule
from .frames import MiB, loss_frame, method, quant_frame, split, trials_frame
from .guidance import OBJECTIVES, QUANT_RULE, default_memory_budget, quant_statements, recommend, statements, interval_label, tokens_ci
from .kernels import findings as kernel_findings, kernel_figures
from ..safetext import file_part, html_text
from ..store import free_space


def _fmt(v, digits=3):
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    if isinstance(v, float):
        return f"{v:,.{digits}g}" if abs(v) < 1000 else f"{v:,.0f}"
    return v


def _shown(value):
    """Every `{{ value }}` of the pages (Jinja2's finalize, before its autoescape): text from
    data (labels, suite names, model paths, errors, the environment) cut to 4,000 characters,
    its control characters and bidi overrides escaped (safetext.html_text); figures' data
    URIs and Jinja2's own Markup (tojson) as they are."""
    if isinstance(value, str) and not isinstance(value, (Markup, _Whole)) and not value.startswith("data:image/"):
        return html_text(value)
    return value


class _Whole(str):
    """Text shown whole (escaped by autoescape, not cut): JSON whose values were cut one by one."""


def _env_json(env: dict) -> str:
    def clean(v):
        if isinstance(v, str):
            return html_text(v, 1000)
        if isinstance(v, list):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        return v

    return _Whole(json.dumps(clean(env), indent=2, sort_keys=True))


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("llmbench.report", "templates"), autoescape=select_autoescape(["j2", "html"]),
                      finalize=_shown)
    env.filters["cut"] = html_text
    return env


def render(run: dict, records: list[dict], memory_budget: float | None = None, kernels: list[dict] | None = None,
           kernels_run: str | None = None) -> str:
    env = _environment()
    env.filters["fmt"] = _fmt
    env.filters["mib"] = lambda b: f"{b / MiB:,.2f}" if isinstance(b, (int, float)) else "–"
    env.filters["pct"] = lambda x: f"{x:+.1%}" if isinstance(x, (int, float)) else "–"
    all_records = records
    records, inference = split(all_records)  # training figures and recommendations: training records only
    figs: dict[str, str] = {}
    missing: dict[str, str] = {}  # a figure or section that could not be made: title -> why

    def part(title: str, make, *args, default=None):
        """One figure or section: a value it cannot draw (an overflow, an empty group, a
        string where a number belongs) leaves it out, with the reason, and the rest goes on."""
        try:
            return make(*args)
        except Exception as e:  # noqa: BLE001 - any failure of one part; the page says which and why
            import matplotlib.pyplot as plt

            plt.close("all")
            missing[title] = f"{type(e).__name__}: {e}"
            return default

    def draw(title: str, make, *args) -> None:
        uri = part(title, make, *args)
        if uri is not None:
            figs[title] = uri

    df = part("Trials table", trials_frame, records, default=None)
    ok = df[df["status"] == "ok"] if df is not None and not df.empty else None
    if ok is not None and not ok.empty:
        draw("Throughput vs micro-batch", figures.throughput_vs_micro_batch, df)
        draw("Model-state bytes per rank by ZeRO stage", figures.model_states_by_stage, df)
        draw("Memory per rank: model states and the rest", figures.memory_by_stage, df)
        if "fwd_s" in ok and ok["fwd_s"].notna().any():
            draw("Where the time goes", figures.step_breakdown, df)
        draw("Step times per rank", figures.per_rank_step_times, records)
        floors = [r["entropy_floor"] for r in records if r.get("entropy_floor") is not None]
        floor = floors[0] if floors else None
        draw("Loss curves", lambda: figures.loss_curves(loss_frame(records), floor))
        if ok["mfu"].notna().any() or ok["mfu_vs_measured_peak"].notna().any():
            draw("MFU by ZeRO stage and micro-batch", figures.mfu_heatmap, df)
        if ok["grad_accum"].nunique() > 1:
            draw("Throughput vs gradient accumulation", figures.throughput_vs_accumulation, df)
        if ok["precision"].nunique() > 1:
            draw("Loss per precision", lambda: figures.loss_by_precision(loss_frame(records), floor))
        draw("Throughput vs memory (Pareto frontier)", figures.pareto, df)
    everything = part("Failures at a glance", trials_frame, all_records)
    if everything is not None and not everything.empty and (everything["status"] != "ok").any():
        draw("Failures at a glance", figures.failures, everything)
    sched_fig = None
    if part("Learning-rate schedules", schedule.groups, records, default=None):
        sched_fig = part("Learning-rate schedules: loss per step", lambda: figures.schedule_curves(schedule.curve_frame(records)))
    quant_fig = None
    if any(method(r) != "none" for r in inference):
        quant_fig = part("Compression: speed, memory and perplexity change", lambda: figures.quant_changes(quant_frame(inference)))
    kernels = kernels or []
    budget = memory_budget or default_memory_budget(run["env"])
    recs = part("Which configuration to use", lambda: [recommend(records, o, budget) for o in OBJECTIVES], default=[]) \
        if records else []
    env.globals["tokens_ci"] = tokens_ci
    env.globals["interval_label"] = interval_label
    return env.get_template("report.html.j2").render(
        run=run, records=records, inference=inference, quant_figure=quant_fig, schedule_figure=sched_fig,
        schedule_guidance=part("Learning-rate schedule guidance", schedule.statements, records, default=[]),
        quant_guidance=part("Compression guidance", quant_statements, inference, default=[]),
        quant_rule=QUANT_RULE, figures=figs, missing=missing,
        quant_batches=sorted({b for r in inference for b in (r.get("decode_tokens_per_s") or {})}, key=int), recommendations=recs, budget=budget,
        guidance=part("Tuning guidance from this run", statements, records, default=[]),
        env_json=_env_json(run["env"]),
        generated=time.strftime("%Y-%m-%d %H:%M:%S"),
        n_trials=len(all_records), errors=[r for r in all_records if r["error"]],
        counts={s: sum(r["status"] == s for r in all_records) for s in sorted({r["status"] for r in all_records})},
        kernels=kernels, kernels_run=kernels_run or run["run_id"], kernel_figures=part("Kernel figures", kernel_figures, kernels, default={}),
        kernel_findings=part("Kernel findings", kernel_findings, kernels, default=[]),
    )


def _write_page(path: Path, text: str, again: str) -> Path:
    """Write a page whole or not at all: a temporary file beside it, then an atomic rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ReportWriteError(f"could not write the report {path}: {e.strerror or e} ({free_space(path.parent)}); "
                               f"the data it shows is unchanged in the store: {again}") from None
    return path


def write_report(run: dict, records: list[dict], out_dir: Path, memory_budget: float | None = None,
                 kernels: list[dict] | None = None, kernels_run: str | None = None) -> Path:
    path = Path(out_dir) / f"report-{file_part(run['run_id'])}.html"
    return _write_page(path, render(run, records, memory_budget, kernels, kernels_run),
                       f"`llmbench report {run['run_id']}` writes it again")


def write_compare(a_name: str, b_name: str, result, out_dir: Path) -> Path:
    """`llmbench compare`'s page: the engine's verdicts (llmbench.gate), as its table shows them."""
    env = _environment()
    env.filters["fmt"] = _fmt
    path = Path(out_dir) / f"compare-{file_part(Path(a_name).name, 60)}-{file_part(Path(b_name).name, 60)}.html"
    return _write_page(path, env.get_template("compare.html.j2").render(a=a_name, b=b_name, result=result),
                       "`llmbench compare` writes it again")
