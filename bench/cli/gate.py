"""`llmbench gate`: a noise-aware regression check of a candidate run against a baseline."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .app import DbOpt, app, console, fail


class TimeBasis(str, Enum):
    auto = "auto"
    wall = "wall"
    rel = "rel"
    cpu = "cpu"
    cpu_rel = "cpu-rel"


class Decide(str, Enum):
    auto = "auto"
    trial = "trial"
    run = "run"


@app.command("gate")
def gate_cmd(
    baseline: str = typer.Argument(..., help="Baseline: a run id (or unique prefix) in --db, or a `results` export (.json, .csv, .parquet)."),
    candidate: str = typer.Argument(..., help="Candidate, the same way."),
    margin: Optional[list[str]] = typer.Option(None, "--margin", help="METRIC=FRACTION, repeatable (e.g. step_times_s=0.2, peak_mem_bytes=0.05)."),
    alpha: float = typer.Option(0.002, "--alpha", help="Significance level of the Mann-Whitney U test (asv's default)."),
    time_basis: TimeBasis = typer.Option(TimeBasis.auto, "--time", help="Gate wall-clock step time (wall), step time ÷ the in-run reference (rel), CPU seconds per step (cpu) or CPU seconds ÷ the reference's (cpu-rel); auto: cpu-rel on CPU, wall on GPU."),
    decide: Decide = typer.Option(Decide.auto, "--decide", help="Who decides on time: each trial (trial) or the whole run (run); auto: run on CPU, trial on GPU."),
    db: Path = DbOpt,
) -> None:
    """Noise-aware regression check of CANDIDATE against BASELINE: prints a table, exits 1 on a regression."""
    from ..gate import GateInputError, gate, load_side, parse_margins

    try:
        margins = parse_margins(margin or [])
        a_name, a = load_side(baseline, db)
        b_name, b = load_side(candidate, db)
    except GateInputError as e:
        fail(str(e))
    result = gate(a, b, margins, alpha, time_basis.value, decide.value)
    t = Table(title=f"gate: {a_name} (baseline) → {b_name} (candidate)")
    for col in ("trial", "metric", "baseline", "candidate", "change", "margin", "test", "p", "verdict"):
        t.add_column(col, justify="left" if col in ("trial", "metric", "test", "verdict") else "right")
    colour = {"regression": "red", "improvement": "green", "reported": "dim", "slower": "yellow", "faster": "cyan"}
    fmt = lambda v: f"{v:,.4g}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)  # noqa: E731
    for v in result.verdicts:
        change = "–" if v.change is None else f"{100 * v.change:+.1f}%"
        verdict = v.outcome if not v.why else f"{v.outcome} ({v.why})"
        if v.outcome in colour:
            verdict = f"[{colour[v.outcome]}]{verdict}[/]"
        t.add_row(v.trial_id, v.metric, fmt(v.baseline), fmt(v.candidate), change,
                  "–" if v.margin is None else f"±{100 * v.margin:.0f}%", v.test,
                  "–" if v.p_value is None else f"{v.p_value:.2g}", verdict)
    console.print(t)
    n = len(result.regressions)
    if n:
        console.print(f"[red]FAIL[/]: {n} regression{'s' if n > 1 else ''} ({', '.join(sorted({v.trial_id for v in result.regressions}))})")
        raise typer.Exit(1)
    n_trials = len({v.trial_id for v in result.verdicts} - {"(all trials)"})
    console.print(f"[green]PASS[/]: no regression in {n_trials} matched trials")
