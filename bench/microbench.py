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
from .launch import LaunchOptions, RankPool
from .store import Store
from .sweep import new_run_id
from .safetext import file_part


def merged(rows_by_rank: dict[int, dict]) -> dict:
    """Rank 0's record of a case, with every rank's median (`rank_median_s`, in rank order)."""
    r = dict(rows_by_rank[min(rows_by_rank)])
    r["rank_median_s"] = [rows_by_rank[k].get("median_s") for k in sorted(rows_by_rank)]
    return r


def run_kernels_on_pool(plan: KernelPlan, hw: Hardware, store: Store, *, label: str | None, log_dir: Path,
                        options: LaunchOptions | None = None, timeout_s: float = 1800.0) -> tuple[str, list[dict], float]:
    """Run the plan on a pool of `plan.world_size` ranks; store and return (run_id, records, wall s).

    Each case is stored as soon as every rank has finished it, so an interrupted or failed run
    keeps what it measured. A pool failure (a crashed rank, a timeout) marks the run failed with
    its cause; Ctrl-C marks it `interrupted` and returns normally."""
    t0 = time.perf_counter()
    env = environment(hw)
    run_id = new_run_id()
    store.create_run(run_id, "kernels", label, env, meta={"kernel_plan": plan.model_dump()})
    pool = RankPool(hw, plan.world_size, log_dir / file_part(f"{run_id}-kernels.log"), options)
    status, error = "finished", None
    pending: dict[str, dict[int, dict]] = {}
    records: list[dict] = []

    def on_row(rank: int, row: dict) -> None:
        case = f"{row['bench']}/{row['case']}"
        pending.setdefault(case, {})[rank] = row
        if len(pending[case]) == plan.world_size:
            rec = merged(pending.pop(case))
            store.add_kernel(run_id, len(records), rec)
            records.append(rec)

    try:
        out = pool.run("kernels", plan.model_dump(), timeout_s, kind="kernels", on_row=on_row)
        ranks = out.results
        failed = [r for r in ranks if r["status"] != "ok"]
        if not out.reported:
            status, error = "failed", f"{out.status}: {out.error}"
        elif failed:
            status, error = "failed", f"rank {failed[0].get('rank', '?')}: {failed[0].get('error')}"
        elif pending or any(r.get("n_rows") != len(records) for r in ranks):
            status, error = "failed", (f"the ranks reported {[r.get('n_rows') for r in ranks]} cases; "
                                       f"{len(records)} were complete on every rank")
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM turned into it: the run keeps what it stored
        pool.kill()
        status, error = "interrupted", "interrupted (Ctrl-C or SIGTERM)"
    finally:
        pool.stop()
    wall = time.perf_counter() - t0
    store.finish_run(run_id, status, meta={"kernel_plan": plan.model_dump(), "wall_s": wall, "error": error,
                                           "pool_start_s": pool.start_s, "stored_cases": len(records)})
    return run_id, records, wall
