"""`llmbench kernels`: run the kernel micro-benchmarks (llmbench.kernels) on the warm rank
pool and keep them in the store, beside the sweeps they explain.

Every rank runs every case at once (on a CPU each on its share of the cores, as in a
trial); the stored record is rank 0's, with each rank's median beside it, so a slow device
shows up. Collectives report the slowest rank's time on every rank.
"""

from __future__ import annotations

import time
from pathlib import Path

from .env import Hardware, environment
from .kernels.plan import KernelPlan
from .launch import LaunchOptions, PoolError, RankPool
from .store import Store
from .sweep import new_run_id


def merge_ranks(per_rank: list[list[dict]]) -> list[dict]:
    """Rank 0's records, each with every rank's median (`rank_median_s`)."""
    by_case: dict[str, list] = {}
    for rows in per_rank:
        for r in rows:
            by_case.setdefault(r["case"], []).append(r.get("median_s"))
    out = []
    for r in per_rank[0]:
        r = dict(r)
        r["rank_median_s"] = by_case[r["case"]]
        out.append(r)
    return out


def run_kernels_on_pool(plan: KernelPlan, hw: Hardware, store: Store, *, label: str | None, log_dir: Path,
                        options: LaunchOptions | None = None, timeout_s: float = 1800.0) -> tuple[str, list[dict], float]:
    """Run the plan on a pool of `plan.world_size` ranks; store and return (run_id, records, wall s).
    A pool failure (a crashed rank, a timeout) marks the run failed with its cause."""
    t0 = time.perf_counter()
    env = environment(hw)
    run_id = new_run_id()
    store.create_run(run_id, "kernels", label, env, meta={"kernel_plan": plan.model_dump()})
    pool = RankPool(hw, plan.world_size, log_dir / f"{run_id}-kernels.log", options)
    status, records, error = "finished", [], None
    try:
        ranks = pool.run("kernels", plan.model_dump(), timeout_s, kind="kernels")
        failed = [r for r in ranks if r["status"] != "ok"]
        if failed:
            status, error = "failed", f"rank {failed[0].get('rank', '?')}: {failed[0].get('error')}"
        else:
            records = merge_ranks([r["rows"] for r in ranks])
            store.add_kernels(run_id, records)
    except PoolError as e:
        status, error = "failed", f"{e.status}: {e}"
    except KeyboardInterrupt:
        pool.kill()
        store.finish_run(run_id, "interrupted", meta={"kernel_plan": plan.model_dump()})
        raise
    finally:
        pool.stop()
    wall = time.perf_counter() - t0
    store.finish_run(run_id, status, meta={"kernel_plan": plan.model_dump(), "wall_s": wall, "error": error,
                                           "pool_start_s": pool.start_s})
    return run_id, records, wall
