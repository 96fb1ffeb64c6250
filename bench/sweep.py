"""The driver: plan the trials, run each on a warm pool of ranks, store each as it finishes."""

from __future__ import annotations

import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .collect.memory import host_oom_kills, oom_killed
from .env import Hardware, environment
from .failures import prelaunch_unsupported
from .launch import LaunchOptions, RankPool
from .engine import ds_config
from .models import ModelNotFound, ModelStats, build_config, config_to_dict, model_stats
from .plan.memory import MemoryPrediction, predict
from .plan.prune import Budget, prune_reason
from .rank_result import InferenceResult, RankResult
from .record import aggregate, aggregate_inference, base_record, combine_rounds, failed_record, prediction_fields
from .spec import SpecError, TrialSpec
from .store import Store, StoreWriteError
from .safetext import file_part


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


@dataclass
class PlannedTrial:
    trial_id: str
    spec: TrialSpec
    skip: str | None = None  # why this grid combination is not run
    stats: ModelStats | None = None
    unsupported: str | None = None  # why this device cannot run it, known before launch (failures.py)
    model_config: dict | None = None  # the transformers config the ranks will build
    ds_config: dict | None = None  # the DeepSpeed config they will pass (None: inference, no DeepSpeed)
    memory: MemoryPrediction | None = None  # predicted memory per rank (plan/memory.py; training trials)
    pruned: str | None = None  # why the plan does not launch it: predicted not to fit (plan/prune.py)
    plan_note: str | None = None  # why it has no memory prediction (the prediction failed)
    seq: int | None = None  # its place in the whole plan when this driver runs a shard of it (shard_plan)


@dataclass
class Plan:
    """Trials in launch order (grouped by world size, so one pool serves each group)."""

    trials: list[PlannedTrial]
    base_config: dict | None = None


def make_plan(expanded: list[tuple[str, TrialSpec, str | None]], hw: Hardware, base_config: dict | None = None,
              budget: Budget | None = None, ranks_per_node: int | None = None, warm_pool: bool = True) -> Plan:
    """Check every trial's model before anything launches (bad input raises SpecError), and
    make the configs it will run with: the transformers config and the DeepSpeed config,
    which with its settings are the trial's identity (identity.py). Every training trial gets
    its memory prediction; with a `budget` (plan/prune.py), one predicted not to fit is pruned.
    The first trial a pool of ranks runs (every trial without `warm_pool`) is predicted with its
    processes' one-time costs (plan/memory.py); a pool restarted after a failure or a resume is
    not foreseen."""
    cache: dict[tuple, tuple[ModelStats, dict, object]] = {}
    trials = []
    launched: set[int] = set()  # world sizes whose pool has a trial to run before this one
    for trial_id, spec, skip in sorted(expanded, key=lambda t: t[1].world_size):
        key = (spec.model, spec.family, spec.seq_len, spec.attn_implementation)
        if key not in cache:
            try:
                config = build_config(spec.model, spec.family, spec.seq_len, spec.attn_implementation)
            except ModelNotFound as e:
                raise SpecError(f"model: {e}") from None
            cache[key] = (model_stats(config), config_to_dict(config), config)
        stats, model_config, config = cache[key]
        if hw.accelerator == "cpu" and spec.world_size > 2 * hw.cpu_cores:
            raise SpecError(f"world_size={spec.world_size}: more than twice the {hw.cpu_cores} CPU cores; timings would be noise")
        refused = prelaunch_unsupported(spec.precision, hw.accelerator) if spec.scenario == "train" and not skip else None
        planned_ds = _planned_ds_config(spec, hw, stats, base_config, ranks_per_node)
        first = not warm_pool or spec.world_size not in launched
        memory, note = None, None
        if not skip and spec.scenario == "train":  # inference runs no DeepSpeed: nothing to predict
            try:
                memory = predict(spec, stats, config, hw.accelerator, planned_ds, ranks_per_node, first)
            except Exception as e:  # noqa: BLE001  a prediction is advice: the trial is still planned
                note = f"no memory prediction: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        on_node = min(spec.world_size, ranks_per_node or spec.world_size)
        pruned = prune_reason(memory, budget, on_node) if budget and memory and not refused else None
        if not (skip or refused or pruned):
            launched.add(spec.world_size)
        trials.append(PlannedTrial(trial_id, spec, skip, stats, refused, model_config, planned_ds, memory, pruned, note))
    return Plan(trials, base_config)


def _planned_ds_config(spec: TrialSpec, hw: Hardware, stats: ModelStats, base_config: dict | None,
                       ranks_per_node: int | None = None) -> dict | None:
    """The DeepSpeed config the ranks will make (trial._prepare calls the same function);
    None for inference, which runs no DeepSpeed, or where no config can be made."""
    if spec.scenario != "train":
        return None
    try:
        return ds_config(spec, hw.accelerator, stats.hidden_size, base_config, ranks_per_node)
    except (ValueError, SpecError):
        return None


def shard_plan(plan: Plan, index: int, count: int, world_size: int | None = None,
               only: list[str] | None = None) -> Plan:
    """Shard `index` of `count`: every count-th trial of the plan (of its trials of `world_size`,
    if given; of those named in `only`, if given), each keeping its place in the whole plan
    (`seq`), so that shards run anywhere merge into one run in the plan's order."""
    chosen = [t for t in plan.trials if (world_size is None or t.spec.world_size == world_size)
              and (only is None or t.trial_id in only)]
    seq = {t.trial_id: i for i, t in enumerate(plan.trials)}
    mine = [t for i, t in enumerate(chosen) if i % count == index]
    for t in mine:
        t.seq = seq[t.trial_id]
    return Plan(mine, plan.base_config)


def check_resume(store: Store, run_id: str, plan: Plan) -> str:
    """The stored run `--resume RUN` continues (its full id), or SpecError: no such run, trials
    the plan does not define, or a trial whose identity (identity.py: settings, model and
    DeepSpeed configs) differs from the plan's, naming the keys that differ (`auto` may
    resolve to another precision on another host or under an ISA limit, a `--set` may differ)."""
    from .identity import differences, same

    run = store.run(run_id)
    if run is None:
        raise SpecError(f"--resume {run_id}: no such run in {store.path}")
    run_id = run["run_id"]
    stored = {r["trial_id"]: r for r in store.trials(run_id)}
    unknown = set(stored) - {t.trial_id for t in plan.trials}
    if unknown:
        raise SpecError(f"--resume {run_id}: the run holds trials this suite does not define ({', '.join(sorted(unknown))})")
    for t in plan.trials:
        was = stored.get(t.trial_id)
        if was is None:
            continue
        if was["rounds"] != t.spec.rounds:  # not identity, but one run holds one number of rounds
            raise SpecError(f"--resume {run_id}: trial {t.trial_id} ran with rounds={was['rounds']}, this plan has "
                            f"rounds={t.spec.rounds}; pass --set rounds={was['rounds']}")
        now = base_record(run_id, t.trial_id, t.spec, t.stats, {}, None, t.model_config, t.ds_config)
        if not same(was, now):
            diff = differences(was, now)
            hint = (f"; pass --set precision={was['precision']} to continue the run as it began"
                    if was.get("precision") != t.spec.precision else "; pass the settings the run began with")
            raise SpecError(f"--resume {run_id}: trial {t.trial_id} ran with other settings than this plan's "
                            f"({'; '.join(diff[:4])}{' ...' if len(diff) > 4 else ''}){hint}")
    return run_id


INTERRUPTED_BY: list[str] = []  # the signal that stopped the driver, when not Ctrl-C (cli/sweep.py's SIGTERM handler)


def interrupt_reason() -> str:
    """Ctrl-C, or SIGTERM and, inside a SLURM job, which one (SLURM sends SIGTERM at the time
    limit, on preemption and on scancel; which of those, the submitter reads afterwards)."""
    import os

    if not INTERRUPTED_BY:
        return "Ctrl-C"
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{job}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if job else os.environ.get("SLURM_JOB_ID")
    return INTERRUPTED_BY[0] + (f" to SLURM job {job}: its time limit, a preemption or a requeue, or scancel" if job else "")


@dataclass
class SweepResult:
    run_id: str
    status: str
    records: list[dict]
    wall_s: float
    pool_starts: int
    pool_start_s: list[float]


def _run_one(pool: RankPool, t: PlannedTrial, rec: dict, base_config: dict | None, trace_dir: Path | None) -> None:
    """Run a trial on the pool and fill its record, whatever happens to it."""
    kills_before = host_oom_kills()
    if trace_dir:
        trace_dir.mkdir(parents=True, exist_ok=True)
    pids = list(pool.pids.values())
    if t.spec.scenario == "inference":
        out = pool.run(t.trial_id, t.spec.model_dump(mode="json"), t.spec.timeout_s, kind="inference")
    else:
        out = pool.run(t.trial_id, t.spec.model_dump(), t.spec.timeout_s, base_config,
                       str(trace_dir.resolve()) if trace_dir else None)
    if out.reported:
        from pydantic import ValidationError

        kind = InferenceResult if t.spec.scenario == "inference" else RankResult
        try:
            results = [kind.from_message(m) for m in out.results]
        except ValidationError as e:  # the rank's and the driver's llmbench disagree: a bug or a version skew
            failed_record(rec, "failed", f"llmbench bug: a rank's result does not fit {kind.__name__}: {e}")
            return
        if kind is InferenceResult:
            aggregate_inference(rec, results, t.spec)
        else:
            aggregate(rec, results, t.stats)
        return
    status, error = out.status, out.error or ""
    kills_after = host_oom_kills()
    kernel = oom_killed(pids or list(pool.pids.values())) if status == "failed" else None
    if kernel:
        status, error = "oom", f"the host's OOM killer ended a rank: {kernel}\n{error}"
    elif status == "failed" and kills_before is not None and kills_after is not None and kills_after > kills_before:
        status, error = "oom", f"the host's OOM killer ended a rank ({kills_after - kills_before} kill(s) in this cgroup)\n{error}"
    failed_record(rec, status, error)


def rounds_of(t: PlannedTrial) -> int:
    """How many rounds a planned trial runs: its `rounds` when it trains, else one (an
    inference trial's replicates are its `repeats`; a skipped, unsupported or pruned trial is recorded once)."""
    return t.spec.rounds if t.spec.scenario == "train" and not t.skip and not t.unsupported and not t.pruned else 1


def _groups(trials: list[PlannedTrial]) -> list[list[PlannedTrial]]:
    """Consecutive trials of one world size (the plan is sorted by it): one pool serves each."""
    out: list[list[PlannedTrial]] = []
    for t in trials:
        if out and out[-1][0].spec.world_size == t.spec.world_size:
            out[-1].append(t)
        else:
            out.append([t])
    return out


@dataclass
class _Driver:
    """What every round of every trial shares: the run, its store and the pool of ranks."""

    plan: Plan
    hw: Hardware
    store: Store
    run_id: str
    env: dict
    label: str | None
    log_dir: Path
    options: LaunchOptions | None
    warm_pool: bool
    trace_dir: Path | None
    pool: RankPool | None = None
    start_times: list = field(default_factory=list)
    refused: list = field(default_factory=list)  # strangers turned away by the pools' control channels

    def record(self, t: PlannedTrial) -> dict:
        rec = base_record(self.run_id, t.trial_id, t.spec, t.stats, self.env, self.label, t.model_config, t.ds_config)
        rec.update(prediction_fields(t.memory))
        if t.plan_note:
            rec["notes"] = rec["notes"] + [t.plan_note]
        return rec

    def run_round(self, t: PlannedTrial, round_no: int) -> dict:
        """One round of a trial (the first: the trial) on a pool of its world size: its record."""
        t_trial = time.perf_counter()
        rec = self.record(t)
        if t.skip:
            failed_record(rec, "skipped", t.skip)
        elif t.unsupported:  # nothing launched for it
            failed_record(rec, "unsupported", t.unsupported)
        elif t.pruned:  # nor for this: predicted not to fit
            failed_record(rec, "pruned", t.pruned)
        else:
            if self.pool is None or self.pool.world_size != t.spec.world_size:
                if self.pool is not None:
                    self.pool.stop()  # one pool alive at a time
                    self.refused += self.pool.refused
                shard = getattr(self.store, "shard", None)  # shards of one run may share a log folder
                name = file_part(f"{self.run_id}-ws{t.spec.world_size}" + (f"-{shard}-{socket.gethostname()}" if shard else ""))
                self.pool = RankPool(self.hw, t.spec.world_size, self.log_dir / f"{name}.log", self.options)
            starts_before = self.pool.starts
            # the extra passes (breakdown, comms, profile) run in the first round only
            run = t if round_no == 0 else PlannedTrial(t.trial_id, t.spec.model_copy(update={"breakdown_steps": 0, "comms_steps": 0}),
                                                       stats=t.stats)
            _run_one(self.pool, run, rec, self.plan.base_config, self.trace_dir if round_no == 0 else None)
            if self.pool.starts > starts_before:
                self.start_times.append(self.pool.start_s)
                rec["pool_start_s"] = self.pool.start_s  # this trial paid for starting the ranks
            if not self.warm_pool:
                self.pool.stop()
        rec["trial_wall_s"] = time.perf_counter() - t_trial
        return rec

    def store_trial(self, t: PlannedTrial, rec: dict, seq: int, replace: bool) -> dict:
        if rec["window_s"] is not None:
            rec["overhead_s"] = rec["trial_wall_s"] - rec["window_s"]
        return _store_trial(self.store, rec, seq, lambda: self.record(t), replace)


def _store_trial(store: Store, rec: dict, seq: int, fallback: Callable[[], dict], replace: bool = False) -> dict:
    """Store a trial's record (`replace`: in place of its earlier rounds' record); one that
    does not fit the schema (an llmbench bug) is stored as `failed` with the reason instead,
    so the sweep goes on and nothing is lost silently."""
    from pydantic import ValidationError

    try:
        store.add_trial(rec, seq, replace=replace)
        return rec
    except ValidationError as e:
        rec = failed_record(fallback(), "failed", f"llmbench bug: the trial's record does not fit the schema: {e}")
        store.add_trial(rec, seq, replace=replace)
        return rec


def run_sweep(plan: Plan, hw: Hardware, store: Store, *, suite: str | None, label: str | None,
              log_dir: Path, options: LaunchOptions | None = None, resume: str | None = None,
              warm_pool: bool = True, profile: bool = False, run_id: str | None = None,
              on_trial_start: Callable[[int, PlannedTrial], None] | None = None,
              on_trial_end: Callable[[int, dict], None] | None = None) -> SweepResult:
    """Run every planned trial; a failing trial is recorded and the sweep goes on.

    Rounds are interleaved: round 1 of every trial of a world size, then round 2 of those
    that ask for more, ... (a slow drift of the machine then spreads over the trials instead
    of landing on one); after each round the trial's record is stored again with every round
    so far (record.combine_rounds), so a trial interrupted between rounds keeps them stored.
    `resume` continues a stored run: finished trials are kept, an `interrupted` one or one
    with fewer rounds than asked is run again whole (and replaces its record).
    `warm_pool=False` starts a fresh DeepSpeed launch for every round (to measure what the pool saves).
    `run_id`: the id of a new run (a shard joins its run: the run is created by whichever shard
    comes first; a trial with a `seq` keeps it). `on_trial_start` and `on_trial_end` are called
    for every round.
    """
    t0 = time.perf_counter()
    env = environment(hw)
    done: set[str] = set()
    if resume:
        run_id = resume
        label = store.run(run_id)["label"]
        mine = {t.trial_id for t in plan.trials}  # (a shard leaves the other shards' trials alone)
        existing = [r for r in store.trials(run_id) if r["trial_id"] in mine]
        pruned_now = {t.trial_id for t in plan.trials if t.pruned}
        # a trial pruned before and not by this plan (--no-prune, another budget) runs now
        done = {r["trial_id"] for r in existing if r["status"] != "interrupted"
                and not (r["status"] == "ok" and r["scenario"] == "train" and r["rounds_done"] < r["rounds"])
                and not (r["status"] == "pruned" and r["trial_id"] not in pruned_now)}
        for r in existing:
            if r["trial_id"] not in done:
                store.delete_trial(run_id, r["trial_id"])
        store.set_run_status(run_id, "running")
        seq = store.next_seq(run_id)
    else:
        run_id = run_id or new_run_id()
        held = store.run(run_id)
        if held is None or held["run_id"] != run_id:
            store.create_run(run_id, suite, label, env, meta={"n_trials": len(plan.trials), "base_config": plan.base_config})
        seq = 0
    todo = [t for t in plan.trials if t.trial_id not in done]
    d = _Driver(plan, hw, store, run_id, env, label, log_dir, options, warm_pool,
                log_dir.parent / "traces" / file_part(run_id) if profile else None)
    records: dict[str, dict] = {}
    status = "finished"
    current: tuple[PlannedTrial, int] | None = None
    store_failed = False
    try:
        for group in _groups(todo):
            rounds: dict[str, list[dict]] = {t.trial_id: [] for t in group}
            seqs: dict[str, int] = {}
            for round_no in range(max(rounds_of(t) for t in group)):
                for t in group:
                    so_far = rounds[t.trial_id]
                    if round_no >= rounds_of(t) or (so_far and so_far[-1]["status"] != "ok"):
                        continue
                    current = (t, round_no)
                    if on_trial_start:
                        on_trial_start(seq, t)
                    so_far.append(d.run_round(t, round_no))
                    rec = combine_rounds(so_far, t.stats)
                    rec["trial_wall_s"] = sum(r["trial_wall_s"] for r in so_far)
                    if round_no == 0:
                        seqs[t.trial_id], seq = (t.seq, seq) if t.seq is not None else (seq, seq + 1)
                    records[t.trial_id] = d.store_trial(t, rec, seqs[t.trial_id], replace=round_no > 0)
                    current = None
                    if on_trial_end:
                        on_trial_end(seqs[t.trial_id] + 1, records[t.trial_id])
    except StoreWriteError as e:  # locked past the timeout, a full disk: stop; what is stored stays
        store_failed = True
        e.run_id = run_id
        e.stored = len(done) + len(records)  # (a trial fails before it is in `records`, or keeps its rounds so far)
        raise
    except Exception:
        status = "failed"  # a bug in the driver: the run is not "finished"; its stored trials stay
        raise
    except KeyboardInterrupt:
        status = "interrupted"
        if d.pool is not None:
            d.pool.kill()
        if current is not None and current[1] == 0:  # a later round's trial keeps its rounds so far
            t = current[0]
            rec = failed_record(d.record(t), "interrupted", f"the sweep was interrupted ({interrupt_reason()}) during this trial")
            try:
                store.add_trial(rec, t.seq if t.seq is not None else seq)
                records[t.trial_id] = rec
            except StoreWriteError:  # (the interrupt goes on; --resume runs the trial again anyway)
                store_failed = True
        raise
    finally:
        if d.pool is not None:
            d.pool.stop()
        wall = time.perf_counter() - t0
        refused = d.refused + (d.pool.refused if d.pool is not None else [])
        if not store_failed:  # (a store that failed would only fail again, after another timeout)
            if getattr(store, "shard", None):  # a shard reports only its own part (resultsdir.run_status adds them up)
                meta = dict(n_trials=len(plan.trials), wall_s=wall, pool_starts=len(d.start_times),
                            pool_start_s=d.start_times, warm_pool=warm_pool)
            else:
                meta = store.run(run_id)["meta"]
                meta.update(n_trials=len(plan.trials), wall_s=meta.get("wall_s", 0) + wall,
                            pool_starts=meta.get("pool_starts", 0) + len(d.start_times),
                            pool_start_s=meta.get("pool_start_s", []) + d.start_times, warm_pool=warm_pool)
            if refused:
                meta["control_refused"] = meta.get("control_refused", []) + refused
            store.finish_run(run_id, status, meta=meta)
    ordered = [records[t.trial_id] for t in todo if t.trial_id in records]
    return SweepResult(run_id, status, ordered, wall, len(d.start_times), d.start_times)
