"""`llmbench sweep` and `llmbench run`: spec → plan → sweep → store → report, with a progress bar."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..safetext import shown
from ..spec import SpecError
from .app import (ControlAddrOpt, DbOpt, ExcludeOpt, HostfileOpt, IncludeOpt, LauncherOpt, MasterAddrOpt, NumNodesOpt, OutOpt,
                  SshPortOpt, app, console, error_summary, fail, launch_options, ok_summary, print_table)
from .results import kernels_for


@dataclass
class Placement:
    """Where this sweep's trials go and where its results land (several machines: docs/cluster.md).

    `shard` (i, n): run every n-th trial of the plan (of `world_size`'s, if given; of `only`'s, if
    given); `run_id`: the run the shards share; `results`: the folder of per-trial files;
    `merge`: merge them into the SQLite store at the end (not on a compute node of a cluster)."""

    shard: tuple[int, int] | None = None
    run_id: str | None = None
    results: Path | None = None
    merge: bool = True
    world_size: int | None = None
    only: list[str] | None = None

    def key(self) -> str | None:
        from ..resultsdir import shard_key

        return shard_key(*self.shard, self.world_size) if self.shard else None


def parse_shard(value: str | None) -> tuple[int, int] | None:
    """`i/n` with 0 <= i < n, or SpecError."""
    if value is None:
        return None
    i, sep, n = value.partition("/")
    if not sep or not i.strip().isdigit() or not n.strip().isdigit() or not 0 <= int(i) < int(n):
        raise SpecError(f"--shard {value}: expected i/n with 0 <= i < n (e.g. 0/2)")
    return int(i), int(n)


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
           cpu: bool = False, options=None, base_config: Optional[Path] = None,
           resume: Optional[str] = None, warm_pool: bool = True, source_label: Optional[str] = None,
           profile: bool = False, memory_budget: Optional[str] = None, prune: bool = True, search: bool = False,
           place: Placement | None = None, slurm=None) -> None:
    from ..engine import axes_from_base_config, load_base_config
    from ..env import detect_hardware
    from ..launch import LaunchOptions, launch_world_size
    from ..spec import expand, load_suite
    from ..sweep import check_resume, make_plan, shard_plan

    options = options or LaunchOptions()
    place = place or Placement()
    try:
        hw = detect_hardware(force_cpu=cpu)
        os.environ.setdefault("DS_ACCELERATOR", hw.accelerator)  # the driver's DeepSpeed agrees with its ranks, quietly
        suite, source = load_suite(suite_name)
        source = source_label or source
        defaults = {"model": hw.default_model, "world_size": hw.world_size}
        base = load_base_config(base_config) if base_config else None
        if base:
            defaults.update(axes_from_base_config(base))
        fixed_ws = launch_world_size(options)  # the ranks DeepSpeed's launcher will start, if its options say
        if fixed_ws:
            defaults["world_size"] = fixed_ws
        allocated = None
        if options.launcher == "srun":
            from ..launch.slurm import allocation_ranks

            allocated = allocation_ranks()
            if allocated:
                defaults["world_size"] = allocated
        from ..plan.prune import default_budget
        from ..precision import resolve

        budget = default_budget(hw, memory_budget) if prune else None
        expanded = expand(suite, source, defaults, overrides, lambda p: resolve(p, hw.caps))
        if fixed_ws and not any(o.replace(" ", "").startswith("world_size=") for o in overrides) \
                and all(spec.scenario == "train" for _, spec, _ in expanded):
            # the ranks the launcher starts rule over a suite's own world_size (an inference
            # trial runs one process, whatever the launcher options)
            expanded = expand(suite, source, defaults, list(overrides) + [f"world_size={fixed_ws}"],
                              lambda p: resolve(p, hw.caps))
        plan = make_plan(expanded, hw, base, budget, warm_pool=warm_pool)
        if place.only:
            unknown = set(place.only) - {t.trial_id for t in plan.trials}
            if unknown:
                raise SpecError(f"--only: no such trial in this plan: {', '.join(sorted(unknown))}")
        if place.run_id and resume and place.run_id != resume:
            raise SpecError(f"--run-id {place.run_id} and --resume {resume} name two runs; pass one")
        if place.run_id and search:
            raise SpecError("--search names its own run; drop --run-id")
        if place.run_id and not resume and not place.shard and slurm is None and db.exists():
            from ..store import Store

            held = Store(db).run(place.run_id)
            if held is not None and held["run_id"] == place.run_id:
                raise SpecError(f"--run-id {place.run_id}: {db} holds that run already; continue it with --resume")
        if (place.shard or slurm) and (search or not warm_pool):
            raise SpecError("--shard and --slurm run the plan's grid on warm pools; drop --search and --fresh-launch")
        if resume and place.shard:
            place.run_id = place.run_id or resume
        if place.shard and not place.run_id:
            raise SpecError("--shard needs --run-id NAME: the shards of one plan join one run by its id")
        if search:
            from ..search import check_searchable

            if resume:
                raise SpecError("--search cannot --resume a run; run the search again (its trials are in the store)")
            if not warm_pool:
                raise SpecError("--search runs on one warm pool; drop --fresh-launch")
            check_searchable(plan)
        place.results = place.results or Path(out) / "results"
        if resume:
            from ..store import Store

            if place.shard:  # a shard's trials are files: those written are done
                from ..resultsdir import FolderStore

                resume = check_resume(FolderStore(place.results), resume, plan)
            else:
                if not db.exists():
                    raise SpecError(f"--resume {resume}: no such run in {db}")
                resume = check_resume(Store(db), resume, plan)
        _check_slowdown(plan)
        if slurm is not None:
            from ..slurm_sweep import check_submittable

            check_submittable(plan, slurm)
        full = plan
        if place.shard or place.only or place.world_size:
            plan = shard_plan(plan, *(place.shard or (0, 1)), place.world_size, place.only)
        # (a shard of one world size, or the finalists, run in an allocation sized for them alone)
        _check_world_sizes(full if slurm is not None else plan, options, fixed_ws, allocated)
    except SpecError as e:
        fail(str(e))
    if dry_run:
        _print_plan(plan, hw)
        return
    if slurm is not None:
        from ..slurm_sweep import submit_and_wait

        submit_and_wait(plan, hw, suite_name, overrides, label, db, out, place, slurm, base_config, memory_budget, prune)
        return
    _run_plan(plan, hw, suite.name, label, db, out, options, resume, warm_pool, profile, search, place)


def _check_world_sizes(plan, options, fixed: int | None, allocated: int | None) -> None:
    """Every trial starts the ranks the launcher starts: DeepSpeed's options fix one world size
    (hostfile, --include/--exclude, --num-nodes), a SLURM allocation an upper bound."""
    sizes = sorted({t.spec.world_size for t in plan.trials if t.spec.scenario == "train"})
    if not sizes:
        return
    if fixed and sizes != [fixed]:
        raise SpecError(f"world_size={'/'.join(map(str, sizes))}: the launcher options start {fixed} ranks "
                        f"(DeepSpeed's reading of --hostfile/--include/--exclude/--num-nodes); drop the world_size override")
    if allocated and sizes[-1] > allocated:
        raise SpecError(f"world_size={sizes[-1]}: this SLURM allocation has {allocated} tasks (SLURM_NTASKS)")


def _print_plan(plan, hw) -> None:
    n = len(plan.trials)
    t = Table(title=f"{n} trial{'s' if n != 1 else ''} on {hw.accelerator} ({hw.comm_backend})")
    for col in ("trial", "model", "params", "precision", "zero", "micro", "accum", "global batch", "ranks", "seq"):
        t.add_column(col)
    t.add_column("note")
    for p in plan.trials:
        s = p.spec
        prec = s.precision if s.requested_precision in (None, s.precision) else f"{s.precision} ({s.requested_precision})"
        t.add_row(shown(p.trial_id, 80), shown(s.model, 80), f"{p.stats.n_params:,}", prec, str(s.zero_stage),
                  str(s.micro_batch), str(s.grad_accum), str(s.global_batch), str(s.world_size), str(s.seq_len),
                  shown(f"skipped: {p.skip}" if p.skip else f"unsupported: {p.unsupported}" if p.unsupported else
                        f"pruned: {p.pruned}" if p.pruned else ""))
    console.print(t)


MAX_RESTARTS_ENV = "LLMBENCH_SLURM_MAX_RESTARTS"  # set by --slurm's batch script (slurm_sweep.write_script)


def _run_plan(plan, hw, suite_name, label, db, out, options, resume=None, warm_pool=True, profile=False,
              search=False, place: Placement | None = None) -> None:
    from ..report.html import write_report
    from ..resultsdir import FolderStore
    from ..store import Store, StoreWriteError
    from ..sweep import run_sweep

    place = place or Placement(results=Path(out) / "results")
    from ..sweep import INTERRUPTED_BY

    INTERRUPTED_BY.clear()  # (this process's earlier sweep, in tests)
    restarts, limit = os.environ.get("SLURM_RESTART_COUNT", ""), os.environ.get(MAX_RESTARTS_ENV, "")
    if restarts.isdigit() and limit.isdigit() and int(restarts) > int(limit):
        fail(f"SLURM requeued this task {restarts} times (preemption or requeue; limit {limit}, --retries): it runs "
             f"no more; its interrupted trial keeps its record, and the submitter reports the task", code=1)
    if place.shard:  # files only: SQLite is for one writer on a local disk
        from ..env import environment
        from ..resultsdir import shard_key

        store = FolderStore(place.results, shard=place.key())
        store.create_run(place.run_id, suite_name, label, environment(hw), {"n_trials": None},
                         shards=[shard_key(i, place.shard[1], place.world_size) for i in range(place.shard[1])])
        db_shown = place.results / place.run_id
    else:
        store = Store(db, mirror=FolderStore(place.results))
        db_shown = db
    sizes = "/".join(str(n) for n in sorted({t.spec.world_size for t in plan.trials}))
    where = ""
    if options.launcher == "srun":
        where = " (srun, in SLURM allocation " + os.environ.get("SLURM_JOB_ID", "?") + ")"
    elif options.multi_node:
        from ..launch import resolve_resources

        nodes = resolve_resources(options)
        where = f" over {len(nodes)} nodes ({', '.join(nodes)})"
    console.print(f"llmbench: {len(plan.trials)} trial{'s' if len(plan.trials) != 1 else ''} on {hw.accelerator} × {sizes}{where} "
                  f"({hw.comm_backend}); store {shown(db_shown)}" + (f"; resuming {shown(resume)}" if resume else "")
                  + (f"; shard {place.shard[0]}/{place.shard[1]} of run {place.run_id}" if place.shard else ""))
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=False)
    from ..sweep import rounds_of

    # every round of every trial; a search decides as it goes how many it runs
    task = progress.add_task("starting", total=None if search else sum(rounds_of(t) for t in plan.trials))

    def started(seq, planned):
        progress.update(task, description=shown(planned.trial_id, 60))

    def ended(seq, rec):
        mark = "[green]ok[/]" if rec["status"] == "ok" else f"[red]{rec['status']}[/]"
        # a prune's reason is one sentence, its numbers at the end (and `--no-prune runs it`): whole
        extra = ok_summary(rec) if rec["status"] == "ok" else error_summary(rec["error"], 400 if rec["status"] == "pruned" else 160)
        train = rec["scenario"] == "train"
        rounds = f" (round {rec['rounds_done']} of {rec['rounds']})" if train and rec["rounds"] > 1 and rec["status"] == "ok" else ""
        progress.console.print(f"  {shown(rec['trial_id'], 80):<24} {mark} {shown(extra)}{rounds}", highlight=False)
        final = rec["status"] != "ok" or not train or rec["rounds_done"] >= rec["rounds"]
        for note in (rec.get("notes") or []) if final else []:
            progress.console.print(f"  {'':<24} [yellow]note[/] {shown(note)}", highlight=False)
        progress.advance(task)

    import signal

    def terminate(signum, frame):  # SIGTERM (a batch system, `kill`): stop as cleanly as Ctrl-C
        from ..sweep import INTERRUPTED_BY

        INTERRUPTED_BY.append("SIGTERM")
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
                                   run_id=place.run_id, on_trial_start=started, on_trial_end=ended)
    except StoreWriteError as e:
        fail(_store_failed(e, db), code=1)
    except KeyboardInterrupt:
        run = store.run(place.run_id or resume) if (place.run_id or resume) else store.run()
        kept = [r for r in store.trials(run["run_id"]) if r["status"] != "interrupted"]
        again = "run the search again (a search is not resumed)" if search else f"continue with --resume {run['run_id']}"
        console.print(f"[yellow]interrupted[/]: run {run['run_id']} keeps its {len(kept)} finished trials in {db_shown}; {again}")
        raise typer.Exit(130)
    if place.shard:
        done = store.trials(result.run_id)
        if not place.merge:
            console.print(f"shard {place.key()} of run {result.run_id}: {len(done)} trial files in "
                          f"{place.results / result.run_id}; merge them with `llmbench merge {place.results / result.run_id}`")
            return
        store = Store(db)
        counts = store.merge([place.results / result.run_id])
        console.print(f"merged {place.results / result.run_id} into {db}: {counts['added']} added, "
                      f"{counts['replaced']} replaced, {counts['unchanged']} unchanged")
    run = store.run(result.run_id)
    records = store.trials(result.run_id)  # a resumed run reports all its trials
    print_table(records, f"run {result.run_id} ({result.wall_s:.0f} s)")
    if search:
        _print_search(run["meta"].get("search") or {})
    path = write_report(run, records, out, None, *kernels_for(store, run))
    console.print(f"report: {shown(path, 2000)}")
    if not any(r["status"] == "ok" for r in records):
        if all(r["status"] in ("pruned", "skipped", "unsupported") for r in records):
            fail(f"run {result.run_id} launched nothing: every trial was pruned, skipped or unsupported (the reasons "
                 f"are in its records: llmbench results {result.run_id}); --no-prune runs the pruned ones", code=1)
        fail(f"no trial of run {result.run_id} succeeded; see the errors above and the logs in {Path(out) / 'logs'}", code=1)


def _store_failed(e, db: Path) -> str:
    """The one line of a sweep stopped by its store (locked past the timeout, a full disk): why,
    what is intact, where the trial that could not be stored went, how to go on."""
    line = str(e)
    if e.stored is not None:
        line += f"; the {e.stored} trial{'s' if e.stored != 1 else ''} stored before {'are' if e.stored != 1 else 'is'} intact"
    if e.trial_id and e.kept:
        line += (f"; {e.trial_id}'s record is kept in {e.kept} (`llmbench merge {e.kept.parent.parent} --db {db}` "
                 f"stores it)")
    elif e.trial_id:
        line += f"; {e.trial_id}'s record could not be kept anywhere (--resume runs it again)"
    if e.run_id:
        line += f"; continue with --resume {e.run_id} once the store can be written"
    return line


def _print_search(s: dict) -> None:
    """The search's outcome in a few lines (the report has the whole of it)."""
    if not s.get("order"):
        return
    console.print(f"search: launched {s['launched']} of the grid's {s['grid']} trials ({s['runnable']} runnable after "
                  f"pruning), {s['rounds_run']} windows in {s['wall_s']:.0f} s; finalists {shown(', '.join(s['finalists']) or 'none')}")
    if s.get("winner"):
        tied = f", tied with {shown(', '.join(s['tied']))}" if s.get("tied") else ""
        console.print(f"search: winner [bold]{shown(s['winner'])}[/]{tied} ({shown(s['reason'])})")


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
    exclude: Optional[str] = ExcludeOpt,
    num_nodes: Optional[int] = NumNodesOpt,
    master_addr: Optional[str] = MasterAddrOpt,
    ssh_port: Optional[int] = SshPortOpt,
    control_addr: Optional[str] = ControlAddrOpt,
    launcher: str = LauncherOpt,
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
                                                help="Prune trials whose predicted allocator peak per rank (the tensors, buckets whole: what a GPU's allocator holds; on a CPU llmbench's counting allocator) exceeds this (e.g. 2GiB) by more than 10%; default: the device's memory."),
    no_prune: bool = typer.Option(False, "--no-prune", help="Launch every trial, even those predicted not to fit."),
    rank_memory: str = typer.Option("auto", "--rank-memory",
                                    help="CPU ranks' memory limit (RLIMIT_DATA, address space): auto (a guard against a runaway trial: what the rank maps plus the larger of 90% of the host's memory over its ranks and 8 GiB), off, or a size (12GiB). A trial past it is recorded oom."),
    search: bool = typer.Option(False, "--search",
                                help="Guided search instead of the whole grid: prune by memory, rank by the calibrated throughput model, short windows, finalists in interleaved rounds (docs/search.md)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="i/n: run every n-th trial of the plan, from the i-th (0-based); shards share one run (--run-id), write trial files and merge at the end."),
    run_id: Optional[str] = typer.Option(None, "--run-id", help="The run's id (shards of one plan pass the same)."),
    results: Optional[Path] = typer.Option(None, "--results", help="Folder of per-trial result files (default OUT/results); on a cluster, a shared one."),
    no_merge: bool = typer.Option(False, "--no-merge", help="A shard leaves its files unmerged (SQLite on a shared filesystem is unsafe); `llmbench merge` later."),
    only: Optional[str] = typer.Option(None, "--only", help="Comma-separated trial ids: run only these of the plan."),
    only_world_size: Optional[int] = typer.Option(None, "--only-world-size", help="Run only the plan's trials of this world size (a SLURM array per world size)."),
    slurm: bool = typer.Option(False, "--slurm", help="From a login node: submit the sweep as SLURM job arrays, wait, merge, re-measure the finalists together (docs/cluster.md)."),
    partition: Optional[str] = typer.Option(None, "--partition", help="--slurm: the partition."),
    nodes: Optional[int] = typer.Option(None, "--nodes", help="--slurm: nodes per task (default: what the world size needs)."),
    gpus_per_node: Optional[int] = typer.Option(None, "--gpus-per-node", help="--slurm: GPUs per node (one rank each); none: CPU tasks."),
    time_limit: Optional[str] = typer.Option(None, "--time", help="--slurm: each task's time limit (SLURM's format, e.g. 1:00:00)."),
    array_parallelism: Optional[int] = typer.Option(None, "--array-parallelism", help="--slurm: array tasks running at once (%N)."),
    shards: Optional[int] = typer.Option(None, "--shards", help="--slurm: array tasks per world size (default: one per trial, at most 16)."),
    finalists: int = typer.Option(3, "--finalists", help="--slurm: the best trials re-measured together in one allocation (0: none)."),
    sbatch_arg: list[str] = typer.Option([], "--sbatch-arg", help="--slurm: one more sbatch option, passed as given (repeatable)."),
    retries: int = typer.Option(1, "--retries", help="--slurm: a task SLURM cut short (time limit, preemption, node failure) or requeued runs again at most this often, resuming its shard."),
    detach: bool = typer.Option(False, "--detach", help="--slurm: return once submitted; merge later with `llmbench merge`."),
    db: Path = DbOpt,
    out: Path = OutOpt,
) -> None:
    """Sweep a suite's grid: train each configuration with real DeepSpeed, store every trial, write an HTML report."""
    try:
        options = launch_options(hostfile, include, exclude, num_nodes, master_addr, ssh_port, control_addr, launcher)
        if rank_memory not in ("auto", "off"):
            from ..plan.devices import parse_bytes

            try:
                parse_bytes(rank_memory)
            except ValueError as e:
                raise SpecError(f"--rank-memory {rank_memory}: {e}") from None
        options.rank_memory = rank_memory
        if run_id is not None:
            from ..safetext import check_run_id

            try:
                check_run_id(run_id)
            except ValueError as e:
                raise SpecError(f"--run-id: {e}") from None
        place = Placement(parse_shard(shard), run_id, results, not no_merge, only_world_size,
                          [t for t in only.split(",") if t] if only else None)
        if place.shard and not (run_id or resume):
            raise SpecError("--shard needs --run-id NAME: the shards of one plan join one run by its id")
        spec = None
        if slurm:
            from ..slurm_sweep import SlurmSpec

            spec = SlurmSpec(partition=partition, nodes=nodes, gpus_per_node=gpus_per_node, time=time_limit,
                             array_parallelism=array_parallelism, shards=shards, finalists=finalists,
                             sbatch_args=sbatch_arg, detach=detach, cpu=cpu, control_addr=control_addr, retries=retries,
                             rank_memory=rank_memory)
            if retries < 0:
                raise SpecError(f"--retries {retries}: 0 or more")
    except SpecError as e:
        fail(str(e))
    _sweep(suite, set_ + (["comms_steps=2"] if comms else []), label, db, out, dry_run, cpu, options, base_config,
           resume, not fresh_launch, profile=profile, memory_budget=memory_budget, prune=not no_prune, search=search,
           place=place, slurm=spec)


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
