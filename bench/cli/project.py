"""`llmbench project`: a measured trial projected to more ranks and nodes (plan/projection.py)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..safetext import shown
from .app import DbOpt, app, console, fail, load_run


class Fmt(str, Enum):
    table = "table"
    json = "json"


def _nodes(text: str) -> list[int]:
    try:
        out = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        out = []
    if not out or out[0] < 1:
        fail(f"--nodes {text!r}: give node counts, e.g. 1,2,4,8,16,32,64")
    return out


@app.command()
def project(
    run_id: Optional[str] = typer.Argument(None, help="Run id (or unique prefix); the latest run by default."),
    trial: Optional[str] = typer.Option(None, "--trial", help="The trial to project \\[default: the run's recommended one]."),
    nodes: str = typer.Option("1,2,4,8,16,32,64", "--nodes", help="Node counts to project to."),
    gpus_per_node: int = typer.Option(8, "--gpus-per-node", min=1, help="Ranks per node."),
    intra: Optional[str] = typer.Option(None, "--intra", help="Within a node: bus bandwidth in GB/s or an nccl-tests all_reduce_perf output file \\[default: this run's measured collectives]."),
    inter: Optional[str] = typer.Option(None, "--inter", help="Across nodes: bus bandwidth in GB/s or an nccl-tests output file (required beyond one node)."),
    alpha_us: float = typer.Option(10.0, "--alpha-us", min=0, help="Latency per ring hop (µs) for a bandwidth given as a number."),
    overlap: float = typer.Option(0.0, "--overlap", min=0, max=1, help="Fraction of the communication hidden behind compute."),
    fmt: Fmt = typer.Option(Fmt.table, "--format", help="table or json."),
    db: Path = DbOpt,
) -> None:
    """Project a measured trial's step time and tokens/s to more nodes (alpha-beta ring model): a projection, not a measurement."""
    from ..models import config_from_dict, model_stats
    from ..plan.projection import Link, compute_time, parse_link, project as do_project
    from ..plan.throughput_accuracy import links_for
    from ..report.guidance import recommend

    node_counts = _nodes(nodes)
    store, run = load_run(db, run_id)
    import os

    # DeepSpeed's config classes are read below: its accelerator named, it does not log its guess on stdout
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if str(run["env"].get("accelerator")) == "cuda" else "cpu")
    records = store.trials(run["run_id"])
    if trial is None:
        rec = recommend(records, "throughput").winner
        if rec is None:
            fail(f"run {run['run_id']}: no successful training trial to project")
    else:
        rec = next((r for r in records if r["trial_id"] == trial), None)
        if rec is None:
            fail(f"--trial {trial}: no such trial in run {run['run_id']}")
    if rec["status"] not in ("ok", "stopped") or not rec.get("step_time_s") or rec.get("scenario") != "train":
        fail(f"--trial {rec['trial_id']}: {rec['status']}, no measured training step to project from")
    links, kid = links_for(store, run)
    try:
        inter_link = parse_link(inter, alpha_us) if inter else None
        if intra:
            intra_link = parse_link(intra, alpha_us)
        elif "all_reduce" in links:
            ar = links["all_reduce"]
            intra_link = Link(ar.alpha_s, ar.beta_Bps, f"measured: kernels run {kid} (all-reduce fit, {ar.world_size} ranks)")
        else:
            raise ValueError("--intra: this run has no measured collectives (run `llmbench kernels --only collective`); "
                             "give a bus bandwidth in GB/s or an nccl-tests output file")
    except ValueError as e:
        fail(str(e))
    if max(node_counts) > 1 and inter_link is None:
        fail("--inter: beyond one node the projection needs the inter-node bus bandwidth (GB/s, or an nccl-tests "
             "output file); llmbench measures only this machine")
    stats = model_stats(config_from_dict(rec["model_config"]))
    compute_s, source = compute_time(rec, stats, links)
    p = do_project(rec, stats, compute_s, source, node_counts, gpus_per_node, intra_link, inter_link, overlap)
    meta = dict(run["meta"])
    meta.setdefault("projections", {})[rec["trial_id"]] = p.to_dict()
    store.set_meta(run["run_id"], meta)  # the report shows it, apart from the measurements
    if fmt == Fmt.json:
        typer.echo(json.dumps(p.to_dict(), indent=2))
        return
    console.print(f"[bold]PROJECTION, not a measurement[/]: {shown(rec['trial_id'], 80)} of run {shown(run['run_id'])}, measured "
                  f"{p.measured_tokens_per_s:,.0f} tokens/s on {p.measured_ranks} ranks; compute {compute_s * 1e3:.1f} ms "
                  f"per step ({source}); overlap {overlap:.0%}")
    t = Table(title="projected with the alpha-beta ring model")
    for col in ("scaling", "nodes", "ranks", "micro-batch", "compute s", "comm s", "step s", "tokens/s", "efficiency"):
        t.add_column(col, justify="right")
    for q in p.points:
        t.add_row(q.scaling, str(q.nodes), str(q.ranks), f"{q.micro_batch:g}", f"{q.compute_s:.4f}", f"{q.comm_s:.4f}",
                  f"{q.step_s:.4f}", f"{q.tokens_per_s:,.0f}", f"{q.scaling_efficiency:.0%}")
    console.print(t)
    console.print(f"links: within a node {intra_link.source}; across nodes {inter_link.source if inter_link else '—'}")
    console.print("weak: micro-batch per rank kept (global batch grows); strong: the trial's global batch split over "
                  "the ranks. Ignored: " + ", ".join(p.ignores) + ".")
