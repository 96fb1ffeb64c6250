"""`llmbench gate` and `llmbench compare`: one engine (llmbench.gate) matches two runs' trials and
judges them; gate decides (exit 1 on a regression), compare shows the same verdicts with more figures."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..gate import ALPHA
from ..safetext import shown
from .app import DbOpt, OutOpt, app, console, fail


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


BaselineArg = typer.Argument(..., help="Baseline: a run id (or unique prefix) in --db, or a `results` export (.json, .csv, .parquet).")
CandidateArg = typer.Argument(..., help="Candidate, the same way.")
MarginOpt = typer.Option(None, "--margin", help="METRIC=FRACTION, repeatable (e.g. step_times_s=0.2, peak_mem_bytes=0.05).")
AlphaOpt = typer.Option(ALPHA, "--alpha", help="Significance level of the Welch t test on rounds or batch means.")
TimeOpt = typer.Option(TimeBasis.auto, "--time", help="Gate wall-clock step time (wall), step time ÷ the in-run reference (rel), CPU seconds per step (cpu) or CPU seconds ÷ the reference's (cpu-rel); auto: cpu-rel on CPU, wall on GPU.")
DecideOpt = typer.Option(Decide.auto, "--decide", help="Who decides on time: each trial (trial) or the whole run (run); auto: run on CPU, trial on GPU.")
JsonOpt = typer.Option(None, "--json", help="Also write the decision and every verdict to this JSON file (for CI).")


def _judge(command: str, baseline: str, candidate: str, margin, alpha: float, time_basis: TimeBasis, decide: Decide,
           db: Path, detail: bool, json_path: Optional[Path] = None):
    """Both sides loaded and judged by the one engine, the table printed and the JSON written;
    bad input (or runs that are not comparable) exits 2."""
    from ..gate import GateInputError, gate, load_side, parse_margins

    try:
        margins = parse_margins(margin or [])
        a_name, a = load_side(baseline, db)
        b_name, b = load_side(candidate, db)
        result = gate(a, b, margins, alpha, time_basis.value, decide.value, detail=detail)
    except GateInputError as e:
        if json_path is not None:  # CI reads the file: it says why there is no decision
            import json

            json_path.write_text(json.dumps({"baseline": baseline, "candidate": candidate, "comparable": False,
                                             "passed": False, "error": str(e)}, indent=1) + "\n")
        fail(str(e))
    console.print(_table(result, f"{command}: {shown(a_name, 100)} (baseline) → {shown(b_name, 100)} (candidate)"))
    _write_json(json_path, result, a_name, b_name)
    return a_name, b_name, result


def _table(result, title: str) -> Table:
    t = Table(title=title)
    for col in ("trial", "metric", "baseline", "candidate", "change", "margin", "test", "p", "verdict"):
        t.add_column(col, justify="left" if col in ("trial", "metric", "test", "verdict") else "right")
    colour = {"regression": "red", "improvement": "green", "reported": "dim", "slower": "yellow", "faster": "cyan"}
    fmt = lambda v: f"{v:,.4g}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)  # noqa: E731
    for v in result.verdicts:
        change = "–" if v.change is None else f"{100 * v.change:+.1f}%"
        verdict = shown(v.outcome if not v.why else f"{v.outcome} ({v.why})")
        if v.outcome in colour:
            verdict = f"[{colour[v.outcome]}]{verdict}[/]"
        t.add_row(shown(v.trial_id, 80), shown(v.metric), fmt(v.baseline), fmt(v.candidate), change,
                  "–" if v.margin is None else f"±{100 * v.margin:.0f}%", v.test,
                  "–" if v.p_value is None else f"{v.p_value:.2g}", verdict)
    return t


def _write_json(path: Optional[Path], result, a_name: str, b_name: str) -> None:
    if path is not None:
        import json

        path.write_text(json.dumps(result.to_json(a_name, b_name), indent=1, default=str) + "\n")


@app.command("gate")
def gate_cmd(
    baseline: str = BaselineArg,
    candidate: str = CandidateArg,
    margin: Optional[list[str]] = MarginOpt,
    alpha: float = AlphaOpt,
    time_basis: TimeBasis = TimeOpt,
    decide: Decide = DecideOpt,
    json_path: Optional[Path] = JsonOpt,
    db: Path = DbOpt,
) -> None:
    """Noise-aware regression check of CANDIDATE against BASELINE: prints a table, exits 1 on a regression."""
    _, _, result = _judge("gate", baseline, candidate, margin, alpha, time_basis, decide, db, False, json_path)
    n = len(result.regressions)
    if n:
        console.print(f"[red]FAIL[/]: {n} regression{'s' if n > 1 else ''}: {shown(', '.join(result.regressed_trials))}")
        raise typer.Exit(1)
    n_trials = len({v.trial_id for v in result.verdicts} - {"(all trials)"})
    console.print(f"[green]PASS[/]: no regression in {n_trials} matched trials")


@app.command("compare")
def compare_cmd(
    baseline: str = BaselineArg,
    candidate: str = CandidateArg,
    margin: Optional[list[str]] = MarginOpt,
    alpha: float = AlphaOpt,
    time_basis: TimeBasis = TimeOpt,
    decide: Decide = DecideOpt,
    json_path: Optional[Path] = JsonOpt,
    db: Path = DbOpt,
    out: Path = OutOpt,
) -> None:
    """Two runs side by side: gate's verdicts for every matched trial, with throughput and MFU beside them, and an HTML page."""
    from ..report.html import write_compare

    a_name, b_name, result = _judge("compare", baseline, candidate, margin, alpha, time_basis, decide, db, True, json_path)
    n = len(result.regressions)
    console.print(f"gate's rule finds {n} regression{'s' if n != 1 else ''}" + (f": {shown(', '.join(result.regressed_trials))}" if n else ""))
    console.print(f"report: {shown(write_compare(a_name, b_name, result, out), 2000)}")
