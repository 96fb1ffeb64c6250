"""The driver: plan the trials, run each on a warm pool of ranks, store each as it finishes."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .env import Hardware, environment
from .launch import LaunchOptions, PoolError, RankPool
from .models import ModelNotFound, ModelStats, build_config, model_stats
from .record import aggregate, base_record, failed_record
from .spec import SpecError, TrialSpec
from .store import Store


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


@dataclass
class Plan:
    """Trials in launch order (grouped by world size, so one pool serves each group)."""

    trials: list[tuple[str, TrialSpec]]
    stats: dict[str, ModelStats] = field(default_factory=dict)  # by trial_id


def make_plan(trials: list[tuple[str, TrialSpec]], hw: Hardware) -> Plan:
    """Check every trial's model before anything launches; bad input raises SpecError."""
    cache: dict[tuple, ModelStats] = {}
    plan = Plan(trials=sorted(trials, key=lambda t: t[1].world_size))
    for trial_id, spec in plan.trials:
        key = (spec.model, spec.family, spec.seq_len)
        if key not in cache:
            try:
                cache[key] = model_stats(build_config(spec.model, spec.family, spec.seq_len))
            except ModelNotFound as e:
                raise SpecError(f"model: {e}") from None
        plan.stats[trial_id] = cache[key]
        if hw.accelerator == "cpu" and spec.world_size > 1 and spec.world_size > 2 * hw.cpu_cores:
            raise SpecError(f"world_size={spec.world_size}: more than twice the {hw.cpu_cores} CPU cores; timings would be noise")
    return plan


@dataclass
class SweepResult:
    run_id: str
    status: str
    records: list[dict]
    wall_s: float
    pool_starts: int
    pool_start_s: list[float]


def run_sweep(plan: Plan, hw: Hardware, store: Store, *, suite: str | None, label: str | None,
              log_dir: Path, options: LaunchOptions | None = None,
              on_trial_start: Callable[[int, str, TrialSpec], None] | None = None,
              on_trial_end: Callable[[int, dict], None] | None = None) -> SweepResult:
    """Run every planned trial; a failing trial is recorded and the sweep goes on."""
    t0 = time.perf_counter()
    env = environment(hw)
    run_id = new_run_id()
    store.create_run(run_id, suite, label, env, meta={"n_trials": len(plan.trials)})
    records: list[dict] = []
    pools: dict[int, RankPool] = {}
    start_times: list[float] = []
    status = "finished"
    seq = 0
    try:
        for seq, (trial_id, spec) in enumerate(plan.trials):
            if on_trial_start:
                on_trial_start(seq, trial_id, spec)
            t_trial = time.perf_counter()
            rec = base_record(run_id, trial_id, spec, plan.stats.get(trial_id), env)
            pool = pools.get(spec.world_size)
            if pool is None:
                # One pool alive at a time: close the previous world size's ranks first.
                for other in pools.values():
                    other.stop()
                pools = {spec.world_size: RankPool(hw, spec.world_size, log_dir / f"{run_id}-ws{spec.world_size}.log", options)}
                pool = pools[spec.world_size]
            starts_before = pool.starts
            try:
                ranks = pool.run(trial_id, spec.model_dump(), spec.timeout_s)
                aggregate(rec, ranks)
            except PoolError as e:
                failed_record(rec, e.status, str(e))
            if pool.starts > starts_before:
                start_times.append(pool.start_s)
            rec["trial_wall_s"] = time.perf_counter() - t_trial
            if rec["window_s"] is not None:
                rec["overhead_s"] = rec["trial_wall_s"] - rec["window_s"]
            store.add_trial(rec, seq)
            records.append(rec)
            if on_trial_end:
                on_trial_end(seq, rec)
    except KeyboardInterrupt:
        status = "interrupted"
        for pool in pools.values():
            pool.kill()
        if len(records) <= seq and plan.trials:
            trial_id, spec = plan.trials[seq]
            rec = failed_record(base_record(run_id, trial_id, spec, plan.stats.get(trial_id), env),
                                "interrupted", "the sweep was interrupted (Ctrl-C) during this trial")
            store.add_trial(rec, seq)
            records.append(rec)
        raise
    finally:
        for pool in pools.values():
            pool.stop()
        wall = time.perf_counter() - t0
        store.finish_run(run_id, status, meta={"n_trials": len(plan.trials), "wall_s": wall,
                                               "pool_starts": len(start_times),
                                               "pool_start_s": start_times})
    return SweepResult(run_id, status, records, wall, len(start_times), start_times)
