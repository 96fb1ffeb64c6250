"""`llmbench sweep SUITE --slurm`: a sweep submitted from a login node as SLURM job arrays.

One array per world size; each array task is a shard of that world size's trials
(`llmbench sweep ... --shard i/n --only-world-size W --resume RUN --no-merge`) on its own
allocation, where the pool starts its ranks with srun (launch/slurm.py). Tasks write one
file per trial into the run's results folder (resultsdir.py: a filesystem the nodes share)
and never touch SQLite; `--resume` makes a requeued task skip the trials whose files exist.
The submitter waits (a progress bar over the trial files; `--detach` returns at once), then
merges the folder into the store. Shards ran on different nodes at different times, so
before the report names a winner, the best trials (`--finalists`, default 3) are
re-measured together, interleaved, in one allocation, as a run of their own
(RUN-finalists); the winner is chosen among them by the report's tie rule (guidance.recommend).
Plain `sbatch --array` is used: submitit would add a pickled-callable layer for what is a
command line here, and a dependency.
"""

from __future__ import annotations

import math
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .spec import SpecError
from .safetext import shown


@dataclass
class SlurmSpec:
    """How the sweep's tasks are submitted (the CLI's --slurm options)."""

    partition: str | None = None
    nodes: int | None = None
    gpus_per_node: int | None = None
    time: str | None = None
    array_parallelism: int | None = None
    shards: int | None = None
    finalists: int = 3
    sbatch_args: list[str] = field(default_factory=list)
    detach: bool = False
    cpu: bool = False
    control_addr: str | None = None  # passed on to every task's `--control-addr`
    poll_s: float = 2.0
    rank_memory: str = "auto"  # passed on to every task's `--rank-memory`
    retries: int = 1  # a task SLURM ended early (time limit, preemption, node failure) or requeued: again at most this often


def check_submittable(plan, spec: SlurmSpec) -> None:
    """Bad --slurm input, refused before anything is submitted."""
    import shutil

    for tool in ("sbatch", "squeue"):
        if shutil.which(tool) is None:
            raise SpecError(f"--slurm: `{tool}` is not on PATH (run from a SLURM login node)")
    if spec.shards is not None and spec.shards < 1:
        raise SpecError(f"--shards {spec.shards}: at least 1")
    if spec.gpus_per_node is not None and spec.gpus_per_node < 1:
        raise SpecError(f"--gpus-per-node {spec.gpus_per_node}: at least 1 (leave it out for CPU tasks)")
    if not plan.trials:
        raise SpecError("--slurm: the plan has no trial")


def resources(world_size: int, spec: SlurmSpec) -> list[str]:
    """sbatch options for one task of `world_size` ranks: one task per GPU (nodes enough to
    hold them), or `--ntasks` CPU tasks."""
    out = [f"--ntasks={world_size}"]
    if spec.gpus_per_node:
        nodes = spec.nodes or math.ceil(world_size / spec.gpus_per_node)
        out += [f"--nodes={nodes}", f"--ntasks-per-node={min(world_size, spec.gpus_per_node)}",
                f"--gpus-per-node={spec.gpus_per_node}"]
    elif spec.nodes:
        out.append(f"--nodes={spec.nodes}")
    if spec.partition:
        out.append(f"--partition={spec.partition}")
    if spec.time:
        out.append(f"--time={spec.time}")
    return out + list(spec.sbatch_args)


def task_command(suite: str, overrides: list[str], label, out: Path, results: Path, run_id: str, spec: SlurmSpec,
                 base_config, memory_budget, prune: bool, shard: str | None = None, world_size: int | None = None,
                 only: list[str] | None = None) -> str:
    """The command one task runs: a shard of the sweep that writes files and merges nothing."""
    cmd = [sys.executable, "-m", "llmbench.cli", "sweep", suite, "--run-id", run_id, "--resume", run_id,
           "--results", str(results), "--out", str(out), "--no-merge"]
    for o in overrides:
        cmd += ["--set", o]
    if label:
        cmd += ["--label", label]
    if spec.cpu:
        cmd.append("--cpu")
    if spec.control_addr:
        cmd += ["--control-addr", spec.control_addr]
    if spec.rank_memory != "auto":
        cmd += ["--rank-memory", spec.rank_memory]
    if base_config:
        cmd += ["--base-config", str(Path(base_config).resolve())]
    if memory_budget:
        cmd += ["--memory-budget", memory_budget]
    if not prune:
        cmd.append("--no-prune")
    if world_size:
        cmd += ["--only-world-size", str(world_size)]
    if only:
        cmd += ["--only", ",".join(only)]
    line = " ".join(shlex.quote(c) for c in cmd)
    return line + (f" --shard {shard}" if shard else " --shard 0/1")


def sbatch(script: Path) -> str:
    """Submit a batch script; its job id."""
    out = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"sbatch {script} failed: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout.strip().split(";")[0]


def write_script(path: Path, name: str, options: list[str], command: str, array: str | None, log: str,
                 retries: int = 1) -> Path:
    """The batch script: requeue allowed (a preempted task comes back and resumes its shard), at
    most `retries` times (the task refuses beyond: cli/sweep.MAX_RESTARTS_ENV)."""
    lines = ["#!/bin/bash", f"#SBATCH --job-name={name}", f"#SBATCH --output={log}", "#SBATCH --open-mode=append",
             "#SBATCH --requeue"]
    if array:
        lines.append(f"#SBATCH --array={array}")
    lines += [f"#SBATCH {o}" for o in options]
    lines += ["set -e", f"cd {shlex.quote(str(Path.cwd()))}", f"export LLMBENCH_SLURM_MAX_RESTARTS={retries}",
              f"exec {command}"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


# SLURM's job states (squeue(1), JOB STATE CODES) in which a task ended before its shard did,
# for a reason of the cluster's, not of the trials: worth one more try
RETRYABLE = ("TIMEOUT", "PREEMPTED", "NODE_FAIL", "BOOT_FAIL", "DEADLINE")


def task_states(job_id: str) -> dict[int, dict]:
    """{array task id: {state, restarts, job}} of an array job, from `scontrol -o show job`
    (no accounting database needed; slurmctld keeps an ended job for MinJobAge, 300 s by
    default). Empty when it cannot answer."""
    try:
        out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    states = {}
    for line in out.stdout.splitlines():
        kv = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if kv.get("ArrayTaskId", "").isdigit():
            states[int(kv["ArrayTaskId"])] = {"state": kv.get("JobState", "?"), "restarts": int(kv.get("Restarts", 0) or 0),
                                              "job": f"{job_id}_{kv['ArrayTaskId']}", "time_limit": kv.get("TimeLimit")}
    return states


def pending(job_ids: list[str]) -> int | None:
    """How many of these jobs' tasks SLURM still holds (pending or running); None when squeue
    could not answer (a busy controller: ask again later, never take it for "done")."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i"], capture_output=True, text=True,
                             timeout=60)
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0:
        # squeue refuses ids it no longer knows (all ended long ago): that, and only that, is "done"
        return 0 if "invalid job id" in out.stderr.lower() else None
    return len([ln for ln in out.stdout.splitlines() if ln.strip()])


def wait(job_ids: list[str], results_run: Path, total: int, spec: SlurmSpec, what: str,
         seen: dict[str, dict[int, dict]] | None = None) -> None:
    """Wait for the jobs, with a progress bar over the trial files they write. `seen` collects
    each array task's last state as polled (slurmctld forgets an ended task after MinJobAge,
    which may pass before the whole array ends)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .cli.app import console

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task(what, total=total)
        unanswered = 0
        while True:
            left = pending(job_ids)
            if seen is not None:
                for job in job_ids:
                    seen.setdefault(job, {}).update(task_states(job))
            progress.update(task, completed=len(list((results_run / "trials").glob("*.json"))))
            if left == 0:
                return
            unanswered = unanswered + 1 if left is None else 0
            if unanswered * spec.poll_s > 600:
                raise RuntimeError(f"squeue has not answered for 10 minutes about jobs {', '.join(job_ids)}")
            time.sleep(spec.poll_s)


def submit_and_wait(plan, hw, suite: str, overrides: list[str], label, db: Path, out: Path, place, spec: SlurmSpec,
                    base_config, memory_budget, prune: bool) -> None:
    """Submit one array per world size, wait, merge, re-measure the finalists, report."""
    from .cli.app import console, fail
    from .report.html import write_report
    from .resultsdir import FolderStore, shard_key
    from .store import Store
    from .sweep import new_run_id

    run_id = place.run_id or new_run_id()
    results = Path(place.results).resolve()
    out = Path(out).resolve()
    by_ws: dict[int, list] = {}
    for t in plan.trials:
        by_ws.setdefault(t.spec.world_size, []).append(t)
    arrays = {ws: min(spec.shards or 16, len(ts)) for ws, ts in by_ws.items()}  # tasks per world size
    keys = [shard_key(i, n, ws) for ws, n in arrays.items() for i in range(n)]
    folder = FolderStore(results)
    folder.create_run(run_id, suite, label, {}, {"n_trials": len(plan.trials), "slurm": {}}, shards=keys)
    jobs: dict[int, str] = {}
    slurm_dir = results / run_id / "slurm"
    for ws, n in arrays.items():
        cmd = task_command(suite, overrides, label, out, results, run_id, spec, base_config, memory_budget, prune,
                           shard=f"$SLURM_ARRAY_TASK_ID/{n}", world_size=ws)
        array = f"0-{n - 1}" + (f"%{spec.array_parallelism}" if spec.array_parallelism else "")
        script = write_script(slurm_dir / f"ws{ws}.sbatch", f"llmbench-{run_id}-ws{ws}", resources(ws, spec), cmd,
                              array, str(slurm_dir / f"ws{ws}-%a.out"), spec.retries)
        try:
            jobs[ws] = sbatch(script)
        except RuntimeError as e:
            fail(str(e), code=1)
        console.print(f"submitted job array {jobs[ws]} ({n} task{'s' if n > 1 else ''} × {ws} ranks): {script}")
    run = folder.run(run_id)
    run["meta"]["slurm"] = {str(ws): j for ws, j in jobs.items()}
    folder.set_meta(run_id, run["meta"])
    if spec.detach:
        console.print(f"detached; when the jobs end: llmbench merge {results / run_id} --db {db}")
        return
    try:
        tasks = _wait_and_retry(jobs, arrays, slurm_dir, results / run_id, len(plan.trials), spec, run_id)
    except KeyboardInterrupt:
        console.print(f"[yellow]stopped waiting[/]: jobs {', '.join(jobs.values())} go on (scancel to end them); "
                      f"merge later with: llmbench merge {results / run_id} --db {db}")
        raise SystemExit(130)
    _mark_cut_short(tasks, plan, arrays, results, run_id, spec)
    run = folder.run(run_id)
    run["meta"]["slurm_tasks"] = {f"ws{ws}-{i}": attempts for (ws, i), attempts in sorted(tasks.items())}
    folder.set_meta(run_id, run["meta"])
    store = Store(db)
    counts = store.merge([results / run_id])
    records = store.trials(run_id)
    console.print(f"merged {results / run_id}: {counts['added']} added, {counts['replaced']} replaced, "
                  f"{counts['unchanged']} unchanged; {len(records)} of {len(plan.trials)} trials stored")
    final_run = _finalists(store, run_id, records, suite, overrides, label, db, out, results, spec, base_config,
                           memory_budget, prune, slurm_dir)
    run = store.run(run_id)
    from .cli.results import kernels_for

    console.print(f"report: {write_report(run, store.trials(run_id), out, None, *kernels_for(store, run))}")
    if final_run:
        fr = store.run(final_run)
        console.print(f"finalists' report: {write_report(fr, store.trials(final_run), out, None, *kernels_for(store, fr))}")
    if not any(r["status"] == "ok" for r in records):
        fail(f"no trial of run {run_id} succeeded; see {slurm_dir} and the logs under {out / 'logs'}", code=1)


def _wait_and_retry(jobs: dict[int, str], arrays: dict[int, int], slurm_dir: Path, results_run: Path, total: int,
                    spec: SlurmSpec, run_id: str) -> dict[tuple[int, int], list[dict]]:
    """Wait for the arrays; a task SLURM ended early (RETRYABLE: a time limit, a preemption
    without requeue, a node failure) is submitted again, its shard resuming, at most
    `spec.retries` times. (A requeued task SLURM restarts by itself, counted in its `restarts`.)
    Returns every attempt's end per (world size, task)."""
    from .cli.app import console

    tasks: dict[tuple[int, int], list[dict]] = {}
    current = dict(jobs)
    for attempt in range(spec.retries + 1):
        seen: dict[str, dict[int, dict]] = {}
        wait(list(current.values()), results_run, total, spec, f"run {run_id}" + (f" (retry {attempt})" if attempt else ""),
             seen)
        again: dict[int, list[int]] = {}
        for ws, job in current.items():
            states = {**seen.get(job, {}), **task_states(job)}  # the last word: after the end, where still known
            for i, st in states.items():
                tasks.setdefault((ws, i), []).append(st)
                if st["state"] in RETRYABLE:
                    again.setdefault(ws, []).append(i)
        if not again or attempt == spec.retries:
            return tasks
        current = {}
        for ws, ids in again.items():
            script = slurm_dir / f"ws{ws}.sbatch"
            out = subprocess.run(["sbatch", "--parsable", f"--array={','.join(map(str, ids))}", str(script)],
                                 capture_output=True, text=True, timeout=60)
            if out.returncode != 0:
                console.print(f"[red]could not resubmit[/] tasks {ids} of {script}: {out.stderr.strip()}")
                continue
            current[ws] = out.stdout.strip().split(";")[0]
            ended = ", ".join(f"{tasks[(ws, i)][-1]['job']} {tasks[(ws, i)][-1]['state']}" for i in ids)
            console.print(f"[yellow]SLURM ended[/] {ended}: resubmitted as job {current[ws]} (retry {attempt + 1} of "
                          f"{spec.retries}; the shards resume)")
        if not current:
            return tasks
    return tasks


def _mark_cut_short(tasks: dict[tuple[int, int], list[dict]], plan, arrays: dict[int, int], results: Path, run_id: str,
                    spec: SlurmSpec) -> None:
    """After the last attempt: a trial its task's end interrupted carries SLURM's reason. A time
    limit makes it `timeout`; a preemption or node failure leaves it `interrupted`, named."""
    from .resultsdir import FolderStore, shard_key
    from .sweep import shard_plan

    for (ws, i), attempts in tasks.items():
        last = attempts[-1]
        if last["state"] not in RETRYABLE and last["restarts"] <= spec.retries:
            continue
        fs = FolderStore(results, shard=shard_key(i, arrays[ws], ws))
        mine = {t.trial_id for t in shard_plan(plan, i, arrays[ws], ws).trials}
        for seq, rec in fs.entries(run_id):
            if rec["trial_id"] not in mine or rec["status"] != "interrupted":
                continue
            why = (f"SLURM {last['state']}: array task {last['job']} (time limit {last['time_limit']}) ended during this trial"
                   if last["state"] in RETRYABLE else
                   f"SLURM requeued array task {last['job']} {last['restarts']} times, past the limit")
            tries = f"{len(attempts)} submission(s), {sum(a['restarts'] for a in attempts)} requeue(s); --retries {spec.retries}"
            rec = dict(rec, status="timeout" if last["state"] == "TIMEOUT" else "interrupted",
                       error=f"{why}; {tries}\n{rec.get('error') or ''}".strip())
            fs.add_trial(rec, seq, replace=True)


def _finalists(store, run_id, records, suite, overrides, label, db, out, results, spec: SlurmSpec, base_config,
               memory_budget, prune, slurm_dir) -> str | None:
    """Re-measure the best trials together in one allocation (a run of their own, interleaved
    rounds), pick the winner among them with the report's tie rule, and note it on the run."""
    from .cli.app import console
    from .report.guidance import recommend

    ok = sorted((r for r in records if r["status"] == "ok" and r.get("scenario", "train") == "train"
                 and r.get("tokens_per_s")), key=lambda r: -r["tokens_per_s"])
    chosen = ok[:spec.finalists]
    if len(chosen) < 2:
        return None
    final_id = f"{run_id}-finalists"
    ws = max(r["world_size"] for r in chosen)
    rounds = max(2, max(r["rounds"] for r in chosen))
    cmd = task_command(suite, [o for o in overrides if not o.startswith("rounds=")] + [f"rounds={rounds}"], label,
                       out, results, final_id, spec, base_config, memory_budget, prune,
                       only=[r["trial_id"] for r in chosen])
    from .resultsdir import FolderStore

    FolderStore(results).create_run(final_id, suite, label, {}, {"finalists_of": run_id}, shards=["0-of-1"])
    script = write_script(slurm_dir / "finalists.sbatch", f"llmbench-{final_id}", resources(ws, spec), cmd, None,
                          str(slurm_dir / "finalists.out"), spec.retries)
    job = sbatch(script)
    console.print(f"re-measuring the finalists {shown(', '.join(r['trial_id'] for r in chosen))} together "
                  f"({rounds} interleaved rounds) in one allocation: job {job}")
    wait([job], results / final_id, len(chosen), spec, "finalists")
    store.merge([results / final_id])
    again = store.trials(final_id)
    win = recommend(again, "throughput")
    run = store.run(run_id)
    meta = dict(run["meta"])
    meta["finalists"] = {"run_id": final_id, "trials": [r["trial_id"] for r in chosen], "job": job,
                         "winner": win.winner["trial_id"] if win.winner else None,
                         "tied": [r["trial_id"] for r in win.tied], "reason": win.reason}
    store.set_meta(run_id, meta)
    if win.winner:
        tied = f", tied with {shown(', '.join(r['trial_id'] for r in win.tied))}" if win.tied else ""
        console.print(f"winner (finalists re-measured together): [bold]{shown(win.winner['trial_id'])}[/]{tied} "
                      f"({shown(win.reason)})")
    return final_id
