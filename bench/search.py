"""`llmbench sweep SUITE --search`: the best configuration from a fraction of the grid.

1. **Prune by memory**: the plan's (plan/prune.py); pruned, skipped and unsupported trials are
   recorded as in a sweep and never launched.
2. **Collectives**: α and β per kind (plan/throughput.fit_collectives) from the store's newest
   `llmbench kernels` run on this device and world size, else a short probe on the rank pool,
   stored with the run (its report shows them).
3. **Anchors**: at the lowest ZeRO stage, the trials with the most and the fewest FLOPs per step,
   each in a short window (one round of `SearchParams.rounds`: `steps / rounds` steps after two
   warmup steps, no breakdown pass).
4. **Explore**: the throughput model is calibrated on every short window measured so far
   (plan/throughput.calibrate) and predicts the rest; the unmeasured trial it ranks highest is
   run while its prediction is within `explore_margin` of the best measured tokens/s, up to
   `max_fraction` of the grid's runnable trials (at least 3). Each measurement recalibrates
   the model.
5. **Finalists**: the measured trials within `final_margin` of the best, at most `finalists`,
   run their remaining rounds interleaved (round 2 of each, then round 3, ...), so each ends
   with `rounds` × ⌈steps / rounds⌉ steps (at least 3 a round): the suite's full window when
   `steps` divides evenly; the winner, or a tie, is the report's rule
   (report/guidance.recommend) over the finalists.

Every trial keeps a record: a finalist its full window (status ok); a trial stopped after its
short window that measurement (status `stopped`, `search` says why); a trial never run its
prediction (status `stopped`). Every record of a trial the search could run carries the last
calibration's prediction (pruned, skipped and unsupported ones carry their reason only).
Interrupted (Ctrl-C), the trial in flight is stored `interrupted`; a search is not resumed but
run again.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

from .env import Hardware, environment
from .launch import LaunchOptions, RankPool
from .plan.throughput import KINDS, LinkFit, calibrate, fit_collectives, predict_step, step_flops
from .plan.throughput_accuracy import collective_links
from .record import combine_rounds, failed_record
from .spec import SpecError
from .store import Store, StoreWriteError
from .sweep import Plan, PlannedTrial, SweepResult, _Driver, new_run_id
from .safetext import file_part


@dataclass(frozen=True)
class SearchParams:
    rounds: int = 2  # a finalist's full window, measured in this many interleaved rounds; a short window is one
    explore_margin: float = 0.06  # run a trial while the model predicts it within this of the best measured
    final_margin: float = 0.05  # finalists: measured within this of the best short window
    finalists: int = 3
    max_fraction: float = 0.5  # never launch more than this fraction of the grid's runnable trials
    probe_bytes: tuple[int, ...] = (2**12, 2**16, 2**20, 2**22)
    probe_repeats: int = 5


def runnable(t: PlannedTrial) -> bool:
    return not (t.skip or t.unsupported or t.pruned) and t.spec.scenario == "train"


def check_searchable(plan: Plan) -> None:
    """Bad input for --search, refused before launch: inference trials, several world sizes,
    fewer than two trials to choose from."""
    if any(t.spec.scenario != "train" for t in plan.trials):
        raise SpecError("--search: the suite has inference trials; the search ranks training configurations only")
    if any(t.spec.lr_schedule != "constant" for t in plan.trials):
        raise SpecError("--search: it shortens each trial's window, which would change a learning-rate schedule's "
                        "length; sweep lr_schedule without --search")
    sizes = {t.spec.world_size for t in plan.trials}
    if len(sizes) > 1:
        raise SpecError(f"--search: the grid has {len(sizes)} world sizes ({', '.join(map(str, sorted(sizes)))}); "
                        "search one at a time (--set world_size=N)")
    if sum(runnable(t) for t in plan.trials) < 2:
        raise SpecError("--search: fewer than two trials to run after pruning; run the sweep without --search")


def short(t: PlannedTrial, rounds: int) -> PlannedTrial:
    """The trial as the search runs each of its rounds: steps/rounds timed steps (at least 3) after
    two warmup steps (the fewest a trial takes: its first probes the activations, its last the
    model states), no breakdown pass."""
    spec = t.spec.model_copy(update={"steps": max(3, math.ceil(t.spec.steps / rounds)),
                                     "warmup_steps": min(t.spec.warmup_steps, 2), "rounds": rounds,
                                     "breakdown_steps": 0})
    return PlannedTrial(t.trial_id, spec, t.skip, t.stats, t.unsupported, t.model_config, t.ds_config, t.memory,
                        t.pruned, t.plan_note)


def probe_links(d: _Driver, world_size: int, params: SearchParams) -> tuple[dict[str, LinkFit], str]:
    """Measure the collectives on the run's pool; the rows are stored with the run."""
    from .kernels.plan import KernelPlan
    from .microbench import merged

    if world_size < 2:
        return {}, "none: one rank communicates nothing"
    if d.pool is None:
        d.pool = RankPool(d.hw, world_size, d.log_dir / file_part(f"{d.run_id}-ws{world_size}.log"), d.options)
    starts = d.pool.starts
    plan = KernelPlan(benches=["collective"], collectives=list(KINDS), message_bytes=list(params.probe_bytes),
                      repeats=params.probe_repeats, world_size=world_size, precisions=["fp32"])
    pending: dict[str, dict[int, dict]] = {}
    rows: list[dict] = []

    def on_row(rank: int, row: dict) -> None:
        case = f"{row['bench']}/{row['case']}"
        pending.setdefault(case, {})[rank] = row
        if len(pending[case]) == world_size:
            rec = merged(pending.pop(case))
            d.store.add_kernel(d.run_id, len(rows), rec)
            rows.append(rec)

    out = d.pool.run("search-collectives", plan.model_dump(), 600, kind="kernels", on_row=on_row)
    if d.pool.starts > starts:
        d.start_times.append(d.pool.start_s)
    if out.status != "reported":
        d.pool.kill()
    what = f"probed on this run's pool ({len(rows)} cases)" + ("" if out.status == "reported" else f"; the probe {out.status}")
    return fit_collectives(rows, world_size, what), what


def run_search(plan: Plan, hw: Hardware, store: Store, *, suite: str | None, label: str | None, log_dir,
               options: LaunchOptions | None = None, params: SearchParams = SearchParams(),
               on_trial_start: Callable[[int, PlannedTrial], None] | None = None,
               on_trial_end: Callable[[int, dict], None] | None = None) -> SweepResult:
    """The guided search (module docstring) over a plan that `check_searchable` accepted."""
    from .report.guidance import recommend

    t0 = time.perf_counter()
    env = environment(hw)
    run_id = new_run_id()
    store.create_run(run_id, suite, label, env, meta={"n_trials": len(plan.trials), "base_config": plan.base_config,
                                                      "search": {"params": asdict(params)}})
    d = _Driver(plan, hw, store, run_id, env, label, log_dir, options, True, None)
    records: dict[str, dict] = {}
    rounds: dict[str, list[dict]] = {}
    seqs: dict[str, int] = {}
    order: list[dict] = []
    state = {"seq": 0}
    status = "finished"
    by_id = {t.trial_id: t for t in plan.trials}
    cand = [t for t in plan.trials if runnable(t)]
    shorts = {t.trial_id: short(t, params.rounds) for t in cand}  # each trial as the search runs it
    world_size = cand[0].spec.world_size
    summary: dict = {"params": asdict(params), "grid": len(plan.trials), "runnable": len(cand)}

    def store_rec(t: PlannedTrial, rec: dict, replace: bool) -> dict:
        if t.trial_id not in seqs:
            seqs[t.trial_id], state["seq"] = state["seq"], state["seq"] + 1
        records[t.trial_id] = d.store_trial(t, rec, seqs[t.trial_id], replace=replace)
        return records[t.trial_id]

    def launch(t: PlannedTrial, phase: str, why: str, round_no: int = 0) -> dict:
        s = shorts[t.trial_id]
        if on_trial_start:
            on_trial_start(state["seq"], s)
        state["current"] = (s, round_no)
        rounds.setdefault(t.trial_id, []).append(d.run_round(s, round_no))
        state["current"] = None
        rec = combine_rounds(rounds[t.trial_id], t.stats)
        rec["trial_wall_s"] = sum(r["trial_wall_s"] for r in rounds[t.trial_id])
        rec["search"] = {**(records.get(t.trial_id, {}).get("search") or {}), "phase": phase, "why": why,
                         "order": len(order)}
        order.append({"trial": t.trial_id, "phase": phase, "round": round_no + 1, "status": rec["status"],
                      "tokens_per_s": rec.get("tokens_per_s")})
        rec = store_rec(s, rec, replace=round_no > 0)
        if on_trial_end:
            on_trial_end(seqs[t.trial_id] + 1, rec)
        return rec

    def measured_ok() -> list[dict]:
        return [records[k] for k in rounds if records[k]["status"] == "ok"]

    store_failed = False
    try:
        for t in plan.trials:  # what the plan does not launch is recorded as a sweep records it
            if not runnable(t):
                rec = d.run_round(t, 0)
                rec["search"] = {"phase": "not run", "why": rec["error"]}
                store_rec(t, rec, replace=False)
        links, source = collective_links(store, hw.device_name, world_size)
        if not links:
            links, source = probe_links(d, world_size, params)
        summary["collectives"] = {"source": source, **{k: asdict(v) for k, v in links.items()}}
        lowest = min(t.spec.zero_stage for t in cand)
        at = sorted((t for t in cand if t.spec.zero_stage == lowest), key=lambda t: (step_flops(t.spec, t.stats), t.trial_id))
        for t in ([at[-1], at[0]] if len(at) > 1 else at):
            launch(t, "anchor", f"anchor of the model: the {'most' if t is at[-1] else 'fewest'} FLOPs per step at ZeRO-{lowest}")
        cap = max(3, math.ceil(params.max_fraction * len(cand)))
        while True:
            fit = _fit(measured_ok(), shorts, links)
            best = max((r["tokens_per_s"] for r in measured_ok()), default=0.0)
            preds = {t.trial_id: predict_step(shorts[t.trial_id].spec, t.stats, t.ds_config, links, fit, hw.accelerator)
                     for t in cand}
            todo = [t for t in cand if t.trial_id not in rounds
                    and preds[t.trial_id].tokens_per_s >= (1 - params.explore_margin) * best]
            if not todo or len(rounds) >= cap:
                break
            nxt = max(todo, key=lambda t: (preds[t.trial_id].tokens_per_s, t.trial_id))
            p = preds[nxt.trial_id].tokens_per_s
            launch(nxt, "explore", f"predicted {p:,.0f} tokens/s, {p / best - 1:+.1%} against the best measured "
                                   f"({best:,.0f})" if best else f"predicted {p:,.0f} tokens/s; nothing measured yet")
        ok = sorted(measured_ok(), key=lambda r: -r["tokens_per_s"])
        finalists = [r["trial_id"] for r in ok if r["tokens_per_s"] >= (1 - params.final_margin) * ok[0]["tokens_per_s"]][
            :params.finalists] if ok else []
        for round_no in range(1, params.rounds):
            for tid in finalists:
                if records[tid]["status"] == "ok":
                    launch(by_id[tid], "final", f"finalist: its short window within {params.final_margin:.0%} of the best",
                           round_no)
        fit = _fit(measured_ok(), shorts, links)
        best = ok[0]["tokens_per_s"] if ok else 0.0
        for t in cand:  # every record: the last calibration's prediction; the stopped ones say why
            s = shorts[t.trial_id]
            p = predict_step(s.spec, t.stats, t.ds_config, links, fit, hw.accelerator)
            rec = records.get(t.trial_id)
            if rec is None:
                rec = d.record(s)
                failed_record(rec, "stopped", f"search: not run; the model predicted {p.tokens_per_s:,.0f} tokens/s, "
                                              f"{p.tokens_per_s / best - 1:+.1%} against the best measured ({best:,.0f}), "
                                              f"beyond the {params.explore_margin:.0%} margin" if best else
                              "search: not run (nothing was measured)")
                rec["search"] = {"phase": "not run", "why": rec["error"]}
                replace = False
            else:
                replace = True
                if t.trial_id not in finalists and rec["status"] == "ok":
                    failed_record(rec, "stopped", f"search: stopped after its short window ({rec['steps']} steps): "
                                                  f"{rec['tokens_per_s']:,.0f} tokens/s, {rec['tokens_per_s'] / best - 1:+.1%} "
                                                  f"against the best; not a finalist (within {params.final_margin:.0%}, "
                                                  f"at most {params.finalists})")
            rec.update(predicted_step_s=p.step_s, predicted_tokens_per_s=p.tokens_per_s)
            store_rec(s, rec, replace=replace)
        win = recommend([records[f] for f in finalists], "throughput")
        summary.update(order=order, finalists=finalists, launched=len(rounds), rounds_run=len(order),
                       fit=asdict(fit), winner=win.winner["trial_id"] if win.winner else None,
                       tied=[r["trial_id"] for r in win.tied], reason=win.reason)
    except KeyboardInterrupt:
        status = "interrupted"
        if d.pool is not None:
            d.pool.kill()
        current = state.get("current")
        if current is not None and current[1] == 0:  # a later round's trial keeps its rounds so far
            s = current[0]
            rec = failed_record(d.record(s), "interrupted", "the search was interrupted (Ctrl-C) during this trial")
            rec["search"] = {"phase": "interrupted", "why": rec["error"]}
            try:
                store_rec(s, rec, replace=False)
            except StoreWriteError:  # (the interrupt goes on)
                store_failed = True
        raise
    except StoreWriteError as e:  # locked past the timeout, a full disk: stop; what is stored stays
        store_failed = True
        e.run_id, e.stored = run_id, len(records)
        raise
    except Exception:
        status = "failed"
        raise
    finally:
        if d.pool is not None:
            d.pool.stop()
        wall = time.perf_counter() - t0
        summary["wall_s"] = wall
        if not store_failed:  # (a store that failed would only fail again, after another timeout)
            meta = store.run(run_id)["meta"]
            meta.update(n_trials=len(plan.trials), wall_s=wall, pool_starts=len(d.start_times), pool_start_s=d.start_times,
                        warm_pool=True, search=summary)
            store.finish_run(run_id, status, meta=meta)
    return SweepResult(run_id, status, [records[t.trial_id] for t in plan.trials if t.trial_id in records], wall,
                       len(d.start_times), d.start_times)


def _fit(ok: list[dict], shorts: dict[str, PlannedTrial], links: dict[str, LinkFit]):
    """The model calibrated on the short windows measured so far."""
    samples = [(r["trial_id"], shorts[r["trial_id"]].spec, shorts[r["trial_id"]].stats, shorts[r["trial_id"]].ds_config,
                float(r["step_time_s"])) for r in ok if r.get("step_time_s")]
    return calibrate(samples, links)
