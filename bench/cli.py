"""The `llmbench` command line (Typer): thin wrappers over spec → plan → sweep → store → report."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .spec import SpecError

app = typer.Typer(help="Benchmark LLM training with real DeepSpeed: sweep, store, report.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
# Rich falls back to 80 columns when stdout is not a terminal; tables need more.
console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

DEFAULT_DB = Path("reports/llmbench.db")
DEFAULT_OUT = Path("reports")
DbOpt = typer.Option(DEFAULT_DB, "--db", help="SQLite store of runs, trials and steps.")
OutOpt = typer.Option(DEFAULT_OUT, "--out", help="Folder for HTML reports and rank logs.")


def fail(msg: str, code: int = 2) -> None:
    err.print(f"[bold red]llmbench: error:[/] {msg}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)


def error_summary(error: str | None, width: int = 160) -> str:
    """The first line of a trial's error, and its last line when the first only introduces it."""
    lines = [ln.strip() for ln in (error or "").splitlines() if ln.strip()]
    if not lines:
        return ""
    text = lines[0]
    if text.endswith(":") and len(lines) > 1:
        text += " … " + lines[-1]
    return text[:width]


def ok_summary(rec: dict) -> str:
    """One line for a finished trial: tokens/s for training; decode rate, weights and perplexity for inference."""
    if rec.get("scenario") == "inference":
        tps = rec.get("decode_tokens_per_s") or {}
        first = next(iter(tps), None)
        rate = f"decode {tps[first]:,.0f} tok/s at batch {first}" if first else "no decode"
        return (f"{rate}, prefill {1e3 * (rec.get('prefill_latency_s') or 0):.1f} ms, weights "
                f"{(rec.get('weight_bytes') or 0) / 2**20:.2f} MiB, perplexity {rec.get('perplexity') or float('nan'):.3f}")
    return f"{rec['tokens_per_s']:,.0f} tok/s"


def _hostfile_slots(path: str) -> int:
    """World size from an MPI-style hostfile (`host slots=N`), as DeepSpeed's launcher reads it."""
    total = 0
    for line in Path(path).read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        parts = dict(p.split("=", 1) for p in line.split()[1:] if "=" in p)
        total += int(parts.get("slots", 1))
    return total


def _sweep(suite_name: str, overrides: list[str], label: Optional[str], db: Path, out: Path, dry_run: bool = False,
           cpu: bool = False, hostfile: Optional[str] = None, include: Optional[str] = None,
           num_nodes: Optional[int] = None, master_addr: Optional[str] = None, base_config: Optional[Path] = None,
           resume: Optional[str] = None, warm_pool: bool = True, source_label: Optional[str] = None,
           profile: bool = False) -> None:
    from .engine import axes_from_base_config, load_base_config
    from .env import detect_hardware
    from .launch import LaunchOptions
    from .spec import expand, load_suite
    from .sweep import make_plan

    try:
        hw = detect_hardware(force_cpu=cpu)
        suite, source = load_suite(suite_name)
        source = source_label or source
        defaults = {"model": hw.default_model, "world_size": hw.world_size}
        base = load_base_config(base_config) if base_config else None
        if base:
            defaults.update(axes_from_base_config(base))
        if hostfile:
            if not Path(hostfile).is_file():
                raise SpecError(f"--hostfile {hostfile}: no such file")
            defaults["world_size"] = _hostfile_slots(hostfile)
        from .precision import resolve

        plan = make_plan(expand(suite, source, defaults, overrides, lambda p: resolve(p, hw.caps)), hw, base)
        if resume:
            from .store import Store

            run = Store(db).run(resume) if db.exists() else None
            if run is None:
                raise SpecError(f"--resume {resume}: no such run in {db}")
            resume = run["run_id"]
            stored = {r["trial_id"]: r for r in Store(db).trials(resume)}
            unknown = set(stored) - {t.trial_id for t in plan.trials}
            if unknown:
                raise SpecError(f"--resume {resume}: the run holds trials this suite does not define ({', '.join(sorted(unknown))})")
            # `auto` may resolve differently than when the run started (another host, an ISA limit):
            # never finish a run at another precision than it began with
            for t in plan.trials:
                was = stored.get(t.trial_id, {}).get("precision")
                if was and was != t.spec.precision:
                    raise SpecError(f"--resume {resume}: trial {t.trial_id} ran at precision {was}, this plan would run "
                                    f"{t.spec.precision}; pass --set precision={was} to continue the run as it began")
    except SpecError as e:
        fail(str(e))
    options = LaunchOptions(hostfile=hostfile, include=include, num_nodes=num_nodes, master_addr=master_addr)
    if dry_run:
        _print_plan(plan, hw)
        return
    _run_plan(plan, hw, suite.name, label, db, out, options, resume, warm_pool, profile)


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
                  f"skipped: {p.skip}" if p.skip else f"unsupported: {p.unsupported}" if p.unsupported else "")
    console.print(t)


def _run_plan(plan, hw, suite_name, label, db, out, options, resume=None, warm_pool=True, profile=False) -> None:
    from .report.html import write_report
    from .store import Store
    from .sweep import run_sweep

    store = Store(db)
    sizes = "/".join(str(n) for n in sorted({t.spec.world_size for t in plan.trials}))
    console.print(f"llmbench: {len(plan.trials)} trials on {hw.accelerator} × {sizes} "
                  f"({hw.comm_backend}); store {db}" + (f"; resuming {resume}" if resume else ""))
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=False)
    task = progress.add_task("starting", total=len(plan.trials))

    def started(seq, planned):
        progress.update(task, description=planned.trial_id)

    def ended(seq, rec):
        mark = "[green]ok[/]" if rec["status"] == "ok" else f"[red]{rec['status']}[/]"
        extra = ok_summary(rec) if rec["status"] == "ok" else error_summary(rec["error"])
        progress.console.print(f"  {rec['trial_id']:<24} {mark} {extra}", highlight=False)
        for note in rec.get("notes") or []:
            progress.console.print(f"  {'':<24} [yellow]note[/] {note}", highlight=False)
        progress.advance(task)

    import signal

    def terminate(signum, frame):  # SIGTERM (a batch system, `kill`): stop as cleanly as Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    try:
        with progress:
            result = run_sweep(plan, hw, store, suite=suite_name, label=label, log_dir=Path(out) / "logs",
                               options=options, resume=resume, warm_pool=warm_pool, profile=profile,
                               on_trial_start=started, on_trial_end=ended)
    except KeyboardInterrupt:
        run = store.run()
        kept = [r for r in store.trials(run["run_id"]) if r["status"] != "interrupted"]
        console.print(f"[yellow]interrupted[/]: run {run['run_id']} keeps its {len(kept)} finished trials in {db}; "
                      f"continue with --resume {run['run_id']}")
        raise typer.Exit(130)
    run = store.run(result.run_id)
    records = store.trials(result.run_id)  # a resumed run reports all its trials
    _print_table(records, f"run {result.run_id} ({result.wall_s:.0f} s)")
    path = write_report(run, records, out, None, *_kernels_for(store, run))
    console.print(f"report: {path}")
    if not any(r["status"] == "ok" for r in records):
        fail(f"no trial of run {result.run_id} succeeded; see the errors above and the logs in {Path(out) / 'logs'}", code=1)


def _print_table(records: list[dict], title: str) -> None:
    t = Table(title=title)
    for col in ("trial", "status", "precision", "zero", "micro", "accum", "step s", "tokens/s", "model states MiB",
                "peak MiB", "final loss"):
        t.add_column(col, justify="right")
    train = [r for r in records if r.get("scenario", "train") == "train"]
    for r in train:
        ok = r["status"] == "ok"
        t.add_row(r["trial_id"], r["status"] if ok else f"[red]{r['status']}[/]", r["precision"], str(r["zero_stage"]),
                  str(r["micro_batch"]), str(r["grad_accum"]),
                  f"{r['step_time_s']:.4f}" if ok else "–", f"{r['tokens_per_s']:,.0f}" if ok else "–",
                  f"{r['model_state_bytes'] / 2**20:.2f}" if ok else "–",
                  f"{r['peak_mem_bytes'] / 2**20:.0f}" if ok and r.get("peak_mem_bytes") else "–",
                  f"{r['final_loss']:.3f}" if ok else "–")
    if train or len(train) == len(records):
        console.print(t)
    inf = [r for r in records if r.get("scenario") == "inference"]
    if inf:
        _print_inference_table(inf)


def _print_inference_table(records: list[dict]) -> None:
    t = Table(title="inference")
    batches = sorted({b for r in records for b in (r.get("decode_tokens_per_s") or {})}, key=int)
    for col in ("trial", "status", "quant", "precision", "prefill ms", *[f"decode tok/s b{b}" for b in batches],
                "weights MiB", "perplexity", "peak RSS MiB"):
        t.add_column(col, justify="right")
    for r in records:
        ok = r["status"] == "ok"
        tps = r.get("decode_tokens_per_s") or {}
        t.add_row(r["trial_id"], r["status"] if ok else f"[red]{r['status']}[/]", r["quant"], r["precision"],
                  f"{1e3 * r['prefill_latency_s']:.2f}" if ok and r.get("prefill_latency_s") else "–",
                  *[f"{tps[b]:,.0f}" if b in tps else "–" for b in batches],
                  f"{r['weight_bytes'] / 2**20:.3f}" if r.get("weight_bytes") else "–",
                  f"{r['perplexity']:.4f}" if ok and r.get("perplexity") else "–",
                  f"{r['peak_rss_bytes'] / 2**20:.0f}" if ok and r.get("peak_rss_bytes") else "–")
    console.print(t)


@app.command()
def sweep(
    suite: str = typer.Argument(..., help="A built-in suite name (see `llmbench suites`) or a path to a YAML suite."),
    set_: list[str] = typer.Option([], "--set", help="Override an axis: axis=v1,v2 (repeatable)."),
    label: Optional[str] = typer.Option(None, "--label", help="A label stored with the run and shown in reports."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the trials without running them."),
    cpu: bool = typer.Option(False, "--cpu", help="Use DeepSpeed's CPU accelerator and gloo even if GPUs are visible."),
    hostfile: Optional[str] = typer.Option(None, "--hostfile", help="DeepSpeed hostfile for multi-node runs."),
    include: Optional[str] = typer.Option(None, "--include", help="DeepSpeed --include (e.g. 'worker-0:0,1')."),
    num_nodes: Optional[int] = typer.Option(None, "--num-nodes", help="DeepSpeed --num_nodes."),
    master_addr: Optional[str] = typer.Option(None, "--master-addr", help="DeepSpeed --master_addr."),
    base_config: Optional[Path] = typer.Option(None, "--base-config",
                                               help="Your DeepSpeed config JSON: the starting point of every trial; swept axes override only what they define."),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue a stored run: run only its unfinished trials."),
    fresh_launch: bool = typer.Option(False, "--fresh-launch",
                                      help="Start a new DeepSpeed launch for every trial instead of the warm pool (slower)."),
    comms: bool = typer.Option(False, "--comms",
                               help="After each window, record 2 steps of collectives: calls, bytes, algbw and busbw per kind (synchronising; never in the window)."),
    profile: bool = typer.Option(False, "--profile",
                                 help="Record a torch.profiler trace of 2 steps per rank (after the timed window) under OUT/traces/RUN/ (open in Perfetto)."),
    db: Path = DbOpt,
    out: Path = OutOpt,
) -> None:
    """Sweep a suite's grid: train each configuration with real DeepSpeed, store every trial, write an HTML report."""
    _sweep(suite, set_ + (["comms_steps=2"] if comms else []), label, db, out, dry_run, cpu, hostfile, include,
           num_nodes, master_addr, base_config, resume, not fresh_launch, profile=profile)


@app.command()
def run(
    model: Optional[str] = typer.Option(None, "--model", help="Catalog size (tiny, 125m, ... 70b) or a local model directory."),
    zero_stage: Optional[int] = typer.Option(None, "--zero-stage", help="ZeRO stage 0-3 \\[default: 0]."),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", help="Micro-batch per rank \\[default: 4]."),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="Gradient accumulation steps \\[default: 1]."),
    precision: Optional[str] = typer.Option(None, "--precision", help="auto, fp32, fp16 or bf16 \\[default: auto: bf16 where the device computes it natively, else fp32 on a CPU and fp16 on a pre-Ampere GPU]."),
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
        set_ = [f"precision={precision}"] + list(set_)
    fixed = {k: v for k, v in given.items() if v is not None}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        json.dump({"name": "run", "fixed": fixed, "grid": {}}, f)
    _sweep(f.name, set_, label, db, out, cpu=cpu, base_config=base_config, source_label="llmbench run")


def _load_run(db: Path, run_id: Optional[str]):
    from .store import Store

    if not db.exists():
        fail(f"--db {db}: no such store; run `llmbench sweep zero` first")
    store = Store(db)
    run = store.run(run_id)
    if run is None:
        fail(f"run {run_id!r} not found in {db}" if run_id else f"the store {db} holds no run yet")
    return store, run


@app.command()
def results(
    run_id: Optional[str] = typer.Argument(None, help="Run id (or unique prefix); the latest run by default."),
    fmt: str = typer.Option("table", "--format", help="table, csv, json (one JSON object per trial per line) or parquet; with --schema: table, json or markdown."),
    output: Optional[Path] = typer.Option(None, "--output", help="Write to this file (required for parquet)."),
    schema: bool = typer.Option(False, "--schema", help="Print the record's schema (every field: part, type, unit, definition) instead of a run."),
    db: Path = DbOpt,
) -> None:
    """Print a run's trials as a table, CSV or JSON lines, or write them to a Parquet file."""
    if schema:
        _print_schema(fmt, output)
        return
    if fmt not in ("table", "csv", "json", "parquet"):
        fail(f"--format {fmt}: choose table, csv, json or parquet")
    if fmt == "parquet" and output is None:
        fail("--format parquet needs --output FILE")
    store, run = _load_run(db, run_id)
    records = store.trials(run["run_id"])
    if fmt == "parquet":
        from .api import load_trials

        df = load_trials(db, run["run_id"])
        for col in df.columns:  # nested fields (lists, dicts) as JSON text
            if df[col].map(lambda v: isinstance(v, (list, dict, tuple))).any():
                df[col] = df[col].map(json.dumps)
        df.to_parquet(output, index=False)
        console.print(f"wrote {len(df)} trials to {output}")
        return
    if output is not None:
        sys.stdout = open(output, "w")
    try:
        _write_results(records, fmt, run)
    except BrokenPipeError:  # `llmbench results | head`: the reader has what it wanted
        sys.stdout = None
        raise typer.Exit(0)


def _print_schema(fmt: str, output: Optional[Path]) -> None:
    from .schema import SCHEMA_VERSION, fields, markdown

    if fmt not in ("table", "json", "markdown"):
        fail(f"--format {fmt}: with --schema choose table, json or markdown")
    if fmt == "markdown":
        text = markdown()
    elif fmt == "json":
        text = json.dumps({"schema_version": SCHEMA_VERSION, "fields": fields()}, indent=1) + "\n"
    else:
        t = Table(title=f"trial record, schema version {SCHEMA_VERSION}")
        for col in ("field", "part", "type", "unit", "definition"):
            t.add_column(col, overflow="fold")
        for f in fields():
            t.add_row(f["name"], f["part"], f["type"], f["unit"], f["definition"])
        console.print(t)
        return
    if output is not None:
        output.write_text(text)
    else:
        sys.stdout.write(text)


def _write_results(records: list[dict], fmt: str, run: dict) -> None:
    if fmt == "json":
        for r in records:
            sys.stdout.write(json.dumps(r) + "\n")
    elif fmt == "csv":
        from .report.frames import trials_frame

        buf = io.StringIO()
        df = trials_frame(records)
        df = df[[c for c in df.columns if not df[c].map(lambda v: isinstance(v, (dict, list, tuple))).any()]]
        df.to_csv(buf, index=False, quoting=csv.QUOTE_MINIMAL)
        sys.stdout.write(buf.getvalue())
    else:
        _print_table(records, f"run {run['run_id']} ({run['suite']}, {run['status']})")


@app.command()
def report(
    run_id: Optional[str] = typer.Argument(None, help="Run id (or unique prefix); the latest run by default."),
    memory_budget: Optional[float] = typer.Option(None, "--memory-budget",
                                                  help="Bytes per rank for the 'within budget' recommendation [default: a device's memory]."),
    db: Path = DbOpt,
    out: Path = OutOpt,
) -> None:
    """Write a run's static, offline HTML report and print its path."""
    from .report.html import write_report

    store, run = _load_run(db, run_id)
    kernels, kernels_run = _kernels_for(store, run)
    console.print(f"report: {write_report(run, store.trials(run['run_id']), out, memory_budget, kernels, kernels_run)}")


def _kernels_for(store, run: dict) -> tuple[list[dict], str | None]:
    """A kernels run's own results, or for a sweep the newest kernels run on the same device."""
    own = store.kernels(run["run_id"])
    if own:
        return own, run["run_id"]
    other = store.latest_kernels_run(run["env"].get("device_name"))
    return (store.kernels(other), other) if other else ([], None)


@app.command()
def best(
    run_id: Optional[str] = typer.Argument(None, help="Run id (or unique prefix); the latest run by default."),
    objective: str = typer.Option("throughput", "--objective", help="throughput, memory or budget."),
    memory_budget: Optional[float] = typer.Option(None, "--memory-budget", help="Bytes per rank, for --objective budget."),
    db: Path = DbOpt,
    out: Path = OutOpt,
) -> None:
    """Write the recommended trial's DeepSpeed config (JSON) and print its path and a launch command."""
    from .report.guidance import OBJECTIVES, default_memory_budget, exportable_config, recommend

    if objective not in OBJECTIVES:
        fail(f"--objective {objective}: choose {', '.join(OBJECTIVES)}")
    store, run = _load_run(db, run_id)
    rec = recommend(store.trials(run["run_id"]), objective, memory_budget or default_memory_budget(run["env"]))
    if rec.winner is None:
        fail(f"run {run['run_id']}: {rec.reason}", code=1)
    w = rec.winner
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"ds_config-{run['run_id']}-{objective}.json"
    path.write_text(json.dumps(exportable_config(w), indent=2) + "\n")
    console.print(f"best for {objective}: {w['trial_id']} (ZeRO-{w['zero_stage']}, micro-batch {w['micro_batch']}, "
                  f"accumulation {w['grad_accum']}, {w['precision']}): {w['tokens_per_s']:,.0f} tokens/s; {rec.reason}")
    console.print(f"config: {path}")
    n = w["world_size"]
    console.print(f"launch: deepspeed --num_gpus {n} your_train.py --deepspeed --deepspeed_config {path}", soft_wrap=True)


@app.command("compare")
def compare_cmd(
    run_a: str = typer.Argument(..., help="The baseline run (id or unique prefix)."),
    run_b: str = typer.Argument(..., help="The run compared with it."),
    db: Path = DbOpt,
    out: Path = OutOpt,
) -> None:
    """Matched trials of two runs side by side: each figure's change, and whether it exceeds the noise."""
    from .report.compare import compare
    from .report.html import write_compare

    store, a = _load_run(db, run_a)
    _, b = _load_run(db, run_b)
    rows = compare(store.trials(a["run_id"]), store.trials(b["run_id"]))
    t = Table(title=f"{a['run_id']} → {b['run_id']}")
    for col in ("trial", "figure", "A", "B", "change", "beyond noise"):
        t.add_column(col, justify="right")
    for r in rows:
        change = "–" if r["change"] is None else f"{100 * r['change']:+.1f}%"
        if r["significant"]:
            change = f"[{'green' if r['better'] else 'red'}]{change}[/]"
        fmt = lambda v: f"{v:,.4g}" if isinstance(v, float) else str(v)  # noqa: E731
        t.add_row(r["trial_id"], r["figure"], fmt(r["a"]), fmt(r["b"]), change,
                  {True: "yes", False: "no", None: "–"}[r["significant"]])
    console.print(t)
    console.print(f"report: {write_compare(a, b, rows, out)}")


@app.command()
def kernels(
    model: Optional[str] = typer.Option(None, "--model", help="Catalog size whose shapes to use [default: as a sweep picks]."),
    family: str = typer.Option("llama", "--family", help="llama or gpt2."),
    seq_len: int = typer.Option(128, "--seq-len"),
    micro_batch: int = typer.Option(4, "--micro-batch"),
    precision: Optional[list[str]] = typer.Option(None, "--precision", help="Repeatable [default: fp32, plus bf16 where the device computes it natively; on GPU also fp16]."),
    only: Optional[str] = typer.Option(None, "--only", help="Comma-separated benches: gemm, attention, norm, mlp, optimizer, collective."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="Comma-separated: adamw-foreach, adamw-forloop, adamw-fused, deepspeed."),
    world_size: Optional[int] = typer.Option(None, "--world-size", help="Ranks [default: as a sweep uses]."),
    repeats: int = typer.Option(15, "--repeats", help="Samples per case."),
    quick: bool = typer.Option(False, "--quick", help="Fewer and smaller sizes (a smoke run in well under a minute)."),
    cpu: bool = typer.Option(False, "--cpu", help="Use the CPU accelerator even if GPUs are visible."),
    label: Optional[str] = typer.Option(None, "--label"),
    db: Path = DbOpt,
    out: Path = OutOpt,
) -> None:
    """Kernel micro-benchmarks: GEMM, attention backends, norms, MLP, optimizer step, collectives."""
    from pydantic import ValidationError

    from .env import detect_hardware
    from .kernels.plan import KernelPlan
    from .microbench import run_kernels_on_pool
    from .models import CATALOG, ModelNotFound, build_config
    from .report.html import write_report
    from .store import Store

    hw = detect_hardware(force_cpu=cpu)
    cuda = hw.accelerator == "cuda"
    fields: dict = dict(model=model or hw.default_model, family=family, seq_len=seq_len, micro_batch=micro_batch,
                        repeats=repeats, world_size=world_size or hw.world_size,
                        precisions=precision or default_kernel_precisions(hw))
    if only:
        fields["benches"] = [b.strip() for b in only.split(",") if b.strip()]
    if optimizer:
        fields["optimizers"] = [o.strip() for o in optimizer.split(",") if o.strip()]
    if cuda:
        fields.update(square_sizes=[2048, 4096, 8192, 16384], message_bytes=[2**k for k in range(10, 31, 2)])
    if quick:
        fields.update(square_sizes=[256, 512], message_bytes=[2**10, 2**16, 2**20], repeats=min(repeats, 7))
    try:
        plan = KernelPlan(**fields)
        if plan.model not in CATALOG:
            build_config(plan.model, plan.family, plan.seq_len)  # a local model directory must hold a config
        if not cuda and "fp16" in plan.precisions:
            raise SpecError("--precision fp16: the CPU accelerator has no fp16 kernels; use fp32 or bf16")
    except ValidationError as e:
        from .spec import _first_error

        fail(f"llmbench kernels: {_first_error(e)}")
    except (SpecError, ModelNotFound) as e:
        fail(str(e))
    store = Store(db)
    console.print(f"llmbench kernels: {', '.join(plan.benches)} at {plan.model} shapes on {hw.accelerator} × "
                  f"{plan.world_size} ({hw.comm_backend}); store {db}")
    import signal

    def terminate(signum, frame):  # SIGTERM: stop as cleanly as Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    run_id, records, wall = run_kernels_on_pool(plan, hw, store, label=label, log_dir=Path(out) / "logs")
    run = store.run(run_id)
    if run["status"] == "interrupted":
        console.print(f"[yellow]interrupted[/]: kernels run {run_id} keeps its {len(records)} finished cases in {db}")
        raise typer.Exit(130)
    if run["status"] != "finished":
        fail(f"kernels run {run_id} failed: {run['meta'].get('error')}", code=1)
    _print_kernels(records, f"kernels run {run_id} ({wall:.0f} s)")
    console.print(f"report: {write_report(run, [], out, kernels=records)}")


def default_kernel_precisions(hw) -> list[str]:
    """What `llmbench kernels` measures unless told: never a precision the device only emulates
    (on an AVX2-only CPU bf16 GEMMs run ~30x slower than fp32, and the run took 9+ minutes)."""
    if hw.accelerator == "cuda":
        return (["bf16"] if hw.bf16_native else []) + ["fp16", "fp32"]
    return ["fp32"] + (["bf16"] if hw.bf16_native else [])


def _print_kernels(records: list[dict], title: str) -> None:
    t = Table(title=title)
    for col in ("bench", "case", "shape", "median", "±CV", "rate", "note"):
        t.add_column(col, overflow="fold")
    for r in records:
        if r["status"] != "ok":
            t.add_row(r["bench"], r["case"], r["shape"], "–", "", "", f"[yellow]{r['status']}[/] {error_summary(r['reason'], 70)}")
            continue
        if r.get("tflops"):
            rate = f"{r['tflops']:.3g} TFLOP/s"
        elif r.get("busbw_gbs") is not None:
            rate = f"bus {r['busbw_gbs']:.3g} GB/s (alg {r['algbw_gbs']:.3g})"
        elif r.get("gbytes_per_s"):
            rate = f"{r['gbytes_per_s']:.3g} GB/s"
        elif r.get("params_per_s"):
            rate = f"{r['params_per_s'] / 1e6:,.0f} M params/s"
        else:
            rate = ""
        note = f"{r['datasheet_peak_tflops']:.0f} datasheet" if r.get("datasheet_peak_tflops") else ""
        t.add_row(r["bench"], r["case"], r["shape"], f"{r['median_s'] * 1e3:.3g} ms", f"{100 * (r['cv'] or 0):.0f}%", rate, note)
    console.print(t)


@app.command("gate")
def gate_cmd(
    baseline: str = typer.Argument(..., help="Baseline: a run id (or unique prefix) in --db, or a `results` export (.json, .csv, .parquet)."),
    candidate: str = typer.Argument(..., help="Candidate, the same way."),
    margin: Optional[list[str]] = typer.Option(None, "--margin", help="METRIC=FRACTION, repeatable (e.g. step_times_s=0.2, peak_mem_bytes=0.05)."),
    alpha: float = typer.Option(0.002, "--alpha", help="Significance level of the Mann-Whitney U test (asv's default)."),
    time_basis: str = typer.Option("auto", "--time", help="Gate wall-clock step time (wall), step time ÷ the in-run reference (rel), CPU seconds per step (cpu) or CPU seconds ÷ the reference's (cpu-rel); auto: cpu-rel on CPU, wall on GPU."),
    decide: str = typer.Option("auto", "--decide", help="Who decides on time: each trial (trial) or the whole run (run); auto: run on CPU, trial on GPU."),
    db: Path = DbOpt,
) -> None:
    """Noise-aware regression check of CANDIDATE against BASELINE: prints a table, exits 1 on a regression."""
    from .gate import METRICS, GateInputError, gate, load_side

    if decide not in ("auto", "trial", "run"):
        fail(f"--decide {decide}: choose auto, trial or run")
    if time_basis not in ("auto", "wall", "rel", "cpu", "cpu-rel"):
        fail(f"--time {time_basis}: choose auto, wall, rel, cpu or cpu-rel")
    known = {m[0] for m in METRICS} | {m[1] for m in METRICS} | {"run"}
    margins = {}
    for m in margin or []:
        key, eq, val = m.partition("=")
        try:
            if not eq or key not in known:
                raise ValueError
            margins[key] = float(val)
        except ValueError:
            fail(f"--margin {m}: use METRIC=FRACTION with METRIC one of {', '.join(x[0] for x in METRICS)}, run")
    try:
        a_name, a = load_side(baseline, db)
        b_name, b = load_side(candidate, db)
    except GateInputError as e:
        fail(str(e))
    result = gate(a, b, margins, alpha, time_basis, decide)
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


@app.command()
def runs(db: Path = DbOpt) -> None:
    """List the runs in the store."""
    from .store import Store

    if not db.exists():
        fail(f"--db {db}: no such store")
    t = Table()
    for col in ("run", "suite", "label", "status", "trials"):
        t.add_column(col)
    for r in Store(db).runs():
        t.add_row(r["run_id"], r["suite"] or "", r["label"] or "", r["status"], str(r["n_trials"]))
    console.print(t)


@app.command()
def suites() -> None:
    """List the built-in suites."""
    from .spec import builtin_suites, load_suite

    t = Table()
    for col in ("suite", "grid", "description"):
        t.add_column(col)
    for name, path in sorted(builtin_suites().items()):
        s, _ = load_suite(str(path))
        t.add_row(name, ", ".join(f"{k}={v}" for k, v in s.grid.items()), s.description)
    console.print(t)


@app.command()
def env(cpu: bool = typer.Option(False, "--cpu", help="Describe the CPU fallback even if GPUs are visible.")) -> None:
    """Versions, devices, accelerator and communication backend that a sweep would use."""
    from .env import detect_hardware, environment, matmul_rates

    hw = detect_hardware(force_cpu=cpu)
    info = environment(hw)
    t = Table(show_header=False)
    for k, v in info.items():
        t.add_row(k, str(v))
    for p, r in matmul_rates(hw).items():
        t.add_row(f"matmul {p}", f"{r['tflops'] * 1e3:,.1f} GFLOP/s (best linear-layer GEMM of the {r['shapes']}, "
                                 f"{r['threads']} thread{'s' if r['threads'] != 1 else ''}; {r['source']})")
    console.print(t)


if __name__ == "__main__":
    app()
