"""`llmbench sweep` and `llmbench run`: spec → plan → sweep → store → report, with a progress bar."""

from __future__ import annotations

import json
import os
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..spec import SpecError
from .app import DbOpt, HostfileOpt, IncludeOpt, MasterAddrOpt, NumNodesOpt, OutOpt, app, console, error_summary, fail, ok_summary, print_table
from .results import kernels_for


def _check_slowdown(plan) -> None:
    """A malformed test-only LLMBENCH_TEST_SLOWDOWN, or one naming a trial the plan lacks, is
    bad input, refused before any rank reads it."""
    from ..trial import SLOWDOWN_ENV, parse_slowdown

    value = os.environ.get(SLOWDOWN_ENV)
    if not value:
        return
    try:
        _, ids = parse_slowdown(value)
    except ValueError as e:
        raise SpecError(str(e)) from None
    unknown = ids - {t.trial_id for t in plan.trials}
    if unknown:
        raise SpecError(f"{SLOWDOWN_ENV}={value!r}: no such trial in this plan: {', '.join(sorted(unknown))}")


def _sweep(suite_name: str, overrides: list[str], label: Optional[str], db: Path, out: Path, dry_run: bool = False,
           cpu: bool = False, hostfile: Optional[str] = None, include: Optional[str] = None,
           num_nodes: Optional[int] = None, master_addr: Optional[str] = None, base_config: Optional[Path] = None,
           resume: Optional[str] = None, warm_pool: bool = True, source_label: Optional[str] = None,
           profile: bool = False, memory_budget: Optional[str] = None, prune: bool = True, search: bool = False) -> None:
    from ..engine import axes_from_base_config, load_base_config
    from ..env import detect_hardware
    from ..launch import LaunchOptions, hostfile_slots
    from ..spec import expand, load_suite
    from ..sweep import check_resume, make_plan

    try:
        hw = detect_hardware(force_cpu=cpu)
        os.environ.setdefault("DS_ACCELERATOR", hw.accelerator)  # the driver's DeepSpeed agrees with its ranks, quietly
        suite, source = load_suite(suite_name)
        source = source_label or source
        defaults = {"model": hw.default_model, "world_size": hw.world_size}
        base = load_base_config(base_config) if base_config else None
        if base:
            defaults.update(axes_from_base_config(base))
        if hostfile:
            defaults["world_size"] = hostfile_slots(hostfile)
        from ..plan.prune import default_budget
        from ..precision import resolve

        budget = default_budget(hw, memory_budget) if prune else None
        plan = make_plan(expand(suite, source, defaults, overrides, lambda p: resolve(p, hw.caps)), hw, base, budget,
                         warm_pool=warm_pool)
        if search:
            from ..search import check_searchable

            if resume:
                raise SpecError("--search cannot --resume a run; run the search again (its trials are in the store)")
            if not warm_pool:
                raise SpecError("--search runs on one warm pool; drop --fresh-launch")
            check_searchable(plan)
        if resume:
            from ..store import Store

            if not db.exists():
                raise SpecError(f"--resume {resume}: no such run in {db}")
            resume = check_resume(Store(db), resume, plan)
        _check_slowdown(plan)
    except SpecError as e:
        fail(str(e))
    options = LaunchOptions(hostfile=hostfile, include=include, num_nodes=num_nodes, master_addr=master_addr)
    if dry_run:
        _print_plan(plan, hw)
        return
    _run_plan(plan, hw, suite.name, label, db, out, options, resume, warm_pool, profile, search)


def _print_plan(plan, hw) -> None:
    n = len(plan.trials)
    t = Table(title=f"{n} trial{'s' if n != 1 else ''} on {hw.accelerator} ({hw.comm_backend})")
    for col in ("trial", "model", "params", "precision", "zero", "micro", "accum", "global batch", "ranks", "seq"):
        t.add_column(col)
    t.add_column("note")
    for p in plan.trials:
        s = p.spec
        prec = s.precision if s.requested_precision in (None, s.precision) else f"{s.precision} ({s.requested_precision})"
        t.add_row(p.trial_id, s.model, f"{p.stats.n_params:,}", prec, str(s.zero_stage),
                  str(s.micro_batch), str(s.grad_accum), str(s.global_batch), str(s.world_size), str(s.seq_len),
                  f"skipped: {p.skip}" if p.skip else f"unsupported: {p.unsupported}" if p.unsupported else
                  f"pruned: {p.pruned}" if p.pruned else "")
    console.print(t)


def _run_plan(plan, hw, suite_name, label, db, out, options, resume=None, warm_pool=True, profile=False,
              search=False) -> None:
    from ..report.html import write_report
    from ..store import Store
    from ..sweep import run_sweep

    store = Store(db)
    sizes = "/".join(str(n) for n in sorted({t.spec.world_size for t in plan.trials}))
    console.print(f"llmbench: {len(plan.trials)} trials on {hw.accelerator} × {sizes} "
                  f"({hw.comm_backend}); store {db}" + (f"; resuming {resume}" if resume else ""))
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=False)
    from ..sweep import rounds_of

    # every round of every trial; a search decides as it goes how many it runs
    task = progress.add_task("starting", total=None if search else sum(rounds_of(t) for t in plan.trials))

    def started(seq, planned):
        progress.update(task, description=planned.trial_id)

    def ended(seq, rec):
        mark = "[green]ok[/]" if rec["status"] == "ok" else f"[red]{rec['status']}[/]"
        extra = ok_summary(rec) if rec["status"] == "ok" else error_summary(rec["error"])
        train = rec["scenario"] == "train"
        rounds = f" (round {rec['rounds_done']} of {rec['rounds']})" if train and rec["rounds"] > 1 and rec["status"] == "ok" else ""
        progress.console.print(f"  {rec['trial_id']:<24} {mark} {extra}{rounds}", highlight=False)
        final = rec["status"] != "ok" or not train or rec["rounds_done"] >= rec["rounds"]
        for note in (rec.get("notes") or []) if final else []:
            progress.console.print(f"  {'':<24} [yellow]note[/] {note}", highlight=False)
        progress.advance(task)

    import signal

    def terminate(signum, frame):  # SIGTERM (a batch system, `kill`): stop as cleanly as Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    try:
        with progress:
            if search:
                from ..search import run_search

                result = run_search(plan, hw, store, suite=suite_name, label=label, log_dir=Path(out) / "logs",
                                    options=options, on_trial_start=started, on_trial_end=ended)
            else:
                result = run_sweep(plan, hw, store, suite=suite_name, label=label, log_dir=Path(out) / "logs",
                                   options=options, resume=resume, warm_pool=warm_pool, profile=profile,
                                   on_trial_start=started, on_trial_end=ended)
    except KeyboardInterrupt:
        run = store.run()
        kept = [r for r in store.trials(run["run_id"]) if r["status"] != "interrupted"]
        again = "run the search again (a search is not resumed)" if search else f"continue with --resume {run['run_id']}"
        console.print(f"[yellow]interrupted[/]: run {run['run_id']} keeps its {len(kept)} finished trials in {db}; {again}")
        raise typer.Exit(130)
    run = store.run(result.run_id)
    records = store.trials(result.run_id)  # a resumed run reports all its trials
    print_table(records, f"run {result.run_id} ({result.wall_s:.0f} s)")
    if search:
        _print_search(run["meta"].get("search") or {})
    path = write_report(run, records, out, None, *kernels_for(store, run))
    console.print(f"report: {path}")
    if not any(r["status"] == "ok" for r in records):
        if all(r["status"] in ("pruned", "skipped", "unsupported") for r in records):
            fail(f"run {result.run_id} launched nothing: every trial was pruned, skipped or unsupported (the reasons "
                 f"are in its records: llmbench results {result.run_id}); --no-prune runs the pruned ones", code=1)
        fail(f"no trial of run {result.run_id} succeeded; see the errors above and the logs in {Path(out) / 'logs'}", code=1)


def _print_search(s: dict) -> None:
    """The search's outcome in a few lines (the report has the whole of it)."""
    if not s.get("order"):
        return
    console.print(f"search: launched {s['launched']} of the grid's {s['grid']} trials ({s['runnable']} runnable after "
                  f"pruning), {s['rounds_run']} windows in {s['wall_s']:.0f} s; finalists {', '.join(s['finalists']) or 'none'}")
    if s.get("winner"):
        tied = f", tied with {', '.join(s['tied'])}" if s.get("tied") else ""
        console.print(f"search: winner [bold]{s['winner']}[/]{tied} ({s['reason']})")


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


@app.command()
def sweep(
    suite: str = typer.Argument(..., help="A built-in suite name (see `llmbench suites`) or a path to a YAML suite."),
    set_: list[str] = typer.Option([], "--set", help="Override an axis: axis=v1,v2 (repeatable)."),
    label: Optional[str] = typer.Option(None, "--label", help="A label stored with the run and shown in reports."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the trials without running them."),
    cpu: bool = typer.Option(False, "--cpu", help="Use DeepSpeed's CPU accelerator and gloo even if GPUs are visible."),
    hostfile: Optional[str] = HostfileOpt,
    include: Optional[str] = IncludeOpt,
    num_nodes: Optional[int] = NumNodesOpt,
    master_addr: Optional[str] = MasterAddrOpt,
    base_config: Optional[Path] = typer.Option(None, "--base-config",
                                               help="Your DeepSpeed config JSON: the starting point of every trial; swept axes override only what they define."),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue a stored run: run only its unfinished trials."),
    fresh_launch: bool = typer.Option(False, "--fresh-launch",
                                      help="Start a new DeepSpeed launch for every trial instead of the warm pool (slower)."),
    comms: bool = typer.Option(False, "--comms",
                               help="After each window, record 2 steps of collectives: calls, bytes, algbw and busbw per kind (synchronising; never in the window)."),
    profile: bool = typer.Option(False, "--profile",
                                 help="Record a torch.profiler trace of 2 steps per rank (after the timed window) under OUT/traces/RUN/ (open in Perfetto)."),
    memory_budget: Optional[str] = typer.Option(None, "--memory-budget",
                                                help="Prune trials whose predicted own peak per rank exceeds this (e.g. 2GiB) by more than 10%; default: the device's memory."),
    no_prune: bool = typer.Option(False, "--no-prune", help="Launch every trial, even those predicted not to fit."),
    search: bool = typer.Option(False, "--search",
                                help="Guided search instead of the whole grid: prune by memory, rank by the calibrated throughput model, short windows, finalists in interleaved rounds (docs/search.md)."),
    db: Path = DbOpt,
    out: Path = OutOpt,
) -> None:
    """Sweep a suite's grid: train each configuration with real DeepSpeed, store every trial, write an HTML report."""
    _sweep(suite, set_ + (["comms_steps=2"] if comms else []), label, db, out, dry_run, cpu, hostfile, include,
           num_nodes, master_addr, base_config, resume, not fresh_launch, profile=profile,
           memory_budget=memory_budget, prune=not no_prune, search=search)


@app.command()
def run(
    model: Optional[str] = typer.Option(None, "--model", help="Catalog size (tiny, 125m, ... 70b) or a local model directory."),
    zero_stage: Optional[int] = typer.Option(None, "--zero-stage", help="ZeRO stage 0-3 \\[default: 0]."),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", help="Micro-batch per rank \\[default: 4]."),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="Gradient accumulation steps \\[default: 1]."),
    precision: Optional[Precision] = typer.Option(None, "--precision", help="auto, fp32, fp16 or bf16 \\[default: auto: bf16 where the device computes it natively, else fp32 on a CPU and fp16 on a pre-Ampere GPU]."),
    set_: list[str] = typer.Option([], "--set", help="Any other axis: axis=value (repeatable)."),
    label: Optional[str] = typer.Option(None, "--label", help="A label stored with the run."),
    cpu: bool = typer.Option(False, "--cpu", help="Use DeepSpeed's CPU accelerator even if GPUs are visible."),
    base_config: Optional[Path] = typer.Option(None, "--base-config", help="Your DeepSpeed config JSON as the starting point."),
    db: Path = DbOpt,
    out: Path = OutOpt,
) -> None:
    """Run one trial from flags, store it and write its report."""
    import tempfile

    given = {"zero_stage": zero_stage, "micro_batch": micro_batch, "grad_accum": grad_accum, "model": model}
    if precision is not None:  # an override, so that `--precision auto` beats a base config's precision too
        set_ = [f"precision={precision.value}"] + list(set_)
    fixed = {k: v for k, v in given.items() if v is not None}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        json.dump({"name": "run", "fixed": fixed, "grid": {}}, f)
    # one trial asked for by name is launched even if predicted not to fit (its record keeps the prediction)
    _sweep(f.name, set_, label, db, out, cpu=cpu, base_config=base_config, source_label="llmbench run", prune=False)
