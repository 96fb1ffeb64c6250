"""Reading the store: `results` (every export format, `--schema`), `report`, `best`, `runs`."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .app import DbOpt, OutOpt, app, console, fail, load_run, print_table
from ..safetext import file_part, shown


class Format(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"
    parquet = "parquet"
    markdown = "markdown"


class Objective(str, Enum):
    throughput = "throughput"
    memory = "memory"
    budget = "budget"


@app.command()
def results(
    run_id: Optional[str] = typer.Argument(None, help="Run id (or unique prefix); the latest run by default."),
    fmt: Format = typer.Option(Format.table, "--format", help="table, csv, json (one JSON object per trial per line) or parquet; with --schema: table, json or markdown."),
    output: Optional[Path] = typer.Option(None, "--output", help="Write to this file (required for parquet)."),
    schema: bool = typer.Option(False, "--schema", help="Print the record's schema (every field: part, type, unit, definition) instead of a run."),
    db: Path = DbOpt,
) -> None:
    """Print a run's trials as a table, CSV or JSON lines, or write them to a Parquet file."""
    from ..export import schema_text, write_parquet, write_records

    if schema:
        if fmt == Format.csv or fmt == Format.parquet:
            fail(f"--format {fmt.value}: with --schema choose table, json or markdown")
        if fmt == Format.table:
            _print_schema()
        elif output is not None:
            output.write_text(schema_text(fmt.value))
        else:
            sys.stdout.write(schema_text(fmt.value))
        return
    if fmt == Format.markdown:
        fail("--format markdown is for --schema; a run's trials export as table, csv, json or parquet")
    if fmt == Format.parquet and output is None:
        fail("--format parquet needs --output FILE")
    store, run = load_run(db, run_id)
    records = store.trials(run["run_id"])
    if fmt == Format.parquet:
        console.print(f"wrote {write_parquet(records, output)} trials to {output}")
        return
    if fmt == Format.table:
        print_table(records, f"run {run['run_id']} ({run['suite']}, {run['status']})")
        return
    stream = open(output, "w") if output is not None else sys.stdout
    try:
        write_records(records, fmt.value, stream)
    except BrokenPipeError:  # `llmbench results | head`: the reader has what it wanted
        sys.stdout = None
        raise typer.Exit(0)
    finally:
        if output is not None:
            stream.close()


def _print_schema() -> None:
    from ..schema import SCHEMA_VERSION, fields

    t = Table(title=f"trial record, schema version {SCHEMA_VERSION}")
    for col in ("field", "part", "type", "unit", "definition"):
        t.add_column(col, overflow="fold")
    for f in fields():
        t.add_row(f["name"], f["part"], f["type"], f["unit"], f["definition"])
    console.print(t)


@app.command()
def report(
    run_id: Optional[str] = typer.Argument(None, help="Run id (or unique prefix); the latest run by default."),
    memory_budget: Optional[str] = typer.Option(None, "--memory-budget",
                                                help="Memory per rank for the 'within budget' recommendation (e.g. 2GiB or bytes; each trial's whole measured peak, process included) \\[default: a device's memory]."),
    db: Path = DbOpt,
    out: Path = OutOpt,
) -> None:
    """Write a run's static, offline HTML report and print its path."""
    from ..report.html import write_report

    budget = _size_option(memory_budget)
    store, run = load_run(db, run_id)
    kernels, kernels_run = kernels_for(store, run)
    console.print(f"report: {write_report(run, store.trials(run['run_id']), out, budget, kernels, kernels_run)}")


def _size_option(value: str | None) -> float | None:
    """--memory-budget for report and best: a size (2GiB, 512MiB) or bytes; bad input exits 2."""
    if value is None:
        return None
    from ..plan.devices import parse_bytes

    try:
        return float(parse_bytes(value))
    except ValueError as e:
        fail(f"--memory-budget: {e}")


def kernels_for(store, run: dict) -> tuple[list[dict], str | None]:
    """A kernels run's own results, or for a sweep the newest kernels run on the same device."""
    own = store.kernels(run["run_id"])
    if own:
        return own, run["run_id"]
    other = store.latest_kernels_run(run["env"].get("device_name"))
    return (store.kernels(other), other) if other else ([], None)


@app.command()
def best(
    run_id: Optional[str] = typer.Argument(None, help="Run id (or unique prefix); the latest run by default."),
    objective: Objective = typer.Option(Objective.throughput, "--objective", help="What to optimise: throughput, memory per rank, or throughput within --memory-budget."),
    memory_budget: Optional[str] = typer.Option(None, "--memory-budget", help="Memory per rank for --objective budget (e.g. 2GiB or bytes; each trial's whole measured peak, process included)."),
    db: Path = DbOpt,
    out: Path = OutOpt,
) -> None:
    """Write the recommended trial's DeepSpeed config (JSON) and print its path and a launch command."""
    from ..report.guidance import default_memory_budget, exportable_config, recommend

    objective = objective.value
    budget = _size_option(memory_budget)
    store, run = load_run(db, run_id)
    rec = recommend(store.trials(run["run_id"]), objective, budget or default_memory_budget(run["env"]))
    if rec.winner is None:
        fail(f"run {run['run_id']}: {rec.reason}", code=1)
    w = rec.winner
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"ds_config-{file_part(run['run_id'])}-{objective}.json"
    path.write_text(json.dumps(exportable_config(w), indent=2) + "\n")
    console.print(f"best for {objective}: {shown(w['trial_id'], 80)} (ZeRO-{w['zero_stage']}, micro-batch {w['micro_batch']}, "
                  f"accumulation {w['grad_accum']}, {shown(w['precision'])}): {w['tokens_per_s']:,.0f} tokens/s; {shown(rec.reason)}")
    console.print(f"config: {path}")
    n = w["world_size"]
    # the run's accelerator: DeepSpeed's launcher takes --num_gpus as the ranks on a CPU too, but
    # its auto-detection would pick CUDA wherever a GPU is visible
    env = "DS_ACCELERATOR=cpu " if run["env"].get("accelerator") == "cpu" else ""
    console.print(f"launch: {env}deepspeed --num_gpus {n} your_train.py --deepspeed --deepspeed_config {path}", soft_wrap=True)


@app.command()
def runs(db: Path = DbOpt) -> None:
    """List the runs in the store."""
    from ..store import Store

    if not db.exists():
        fail(f"--db {db}: no such store")
    t = Table()
    for col in ("run", "suite", "label", "status", "trials"):
        t.add_column(col)
    for r in Store(db).runs():
        t.add_row(shown(r["run_id"], 100), shown(r["suite"] or "", 80), shown(r["label"] or "", 120), shown(r["status"]),
                  str(r["n_trials"]))
    console.print(t)


@app.command()
def merge(
    folders: list[Path] = typer.Argument(..., help="Results folders: a run's folder (RESULTS/RUN_ID) or a folder of runs."),
    report: bool = typer.Option(True, "--report/--no-report", help="Write each merged run's HTML report."),
    db: Path = DbOpt,
    out: Path = OutOpt,
) -> None:
    """Merge per-trial result files (shards, SLURM array tasks) into the SQLite store, idempotently."""
    from ..report.html import write_report
    from ..resultsdir import run_folders
    from ..store import Store

    missing = [str(f) for f in folders if not Path(f).exists()]
    if missing:
        fail(f"no such folder: {', '.join(missing)}")
    found = run_folders(folders)
    if not found:
        fail(f"no run folder (one holding run.json) under {', '.join(map(str, folders))}")
    store = Store(db)
    try:
        counts = store.merge(found)
    except (OSError, ValueError, KeyError) as e:
        fail(f"merge: a result file could not be read: {type(e).__name__}: {e}")
    console.print(f"merged {counts['runs']} run{'s' if counts['runs'] != 1 else ''} into {db}: {counts['added']} added, "
                  f"{counts['replaced']} replaced, {counts['unchanged']} unchanged")
    for folder in found:
        run = store.run(folder.name)
        console.print(f"  {shown(run['run_id'])}: {shown(run['status'])}, {run['n_trials']} trials")
        if report:
            console.print(f"  report: {write_report(run, store.trials(run['run_id']), out, None, *kernels_for(store, run))}")
