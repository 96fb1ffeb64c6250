"""`llmbench kernels`: the kernel micro-benchmarks on the rank pool, into the store and a report."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..spec import SpecError
from ..safetext import shown
from .app import DbOpt, HostfileOpt, IncludeOpt, MasterAddrOpt, NumNodesOpt, OutOpt, app, console, error_summary, fail


class Family(str, Enum):
    llama = "llama"
    gpt2 = "gpt2"


def _items(text: str) -> list[str]:
    """`a,b,c` → [a, b, c]: the one list syntax of every option (as `--set axis=v1,v2`)."""
    return [x.strip() for x in text.split(",") if x.strip()]


@app.command()
def kernels(
    model: Optional[str] = typer.Option(None, "--model", help="Catalog size whose shapes to use \\[default: as a sweep picks]."),
    family: Family = typer.Option(Family.llama, "--family", help="Model family whose layers to use."),
    seq_len: int = typer.Option(128, "--seq-len", help="Sequence length of the shapes (tokens per sample)."),
    micro_batch: int = typer.Option(4, "--micro-batch", help="Samples per micro-batch of the shapes."),
    precision: Optional[str] = typer.Option(None, "--precision", help="Comma-separated: fp32, bf16, fp16 \\[default: fp32, plus bf16 where the device computes it natively; on GPU also fp16]."),
    only: Optional[str] = typer.Option(None, "--only", help="Comma-separated benches: gemm, attention, norm, mlp, optimizer, collective."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="Comma-separated: adamw-foreach, adamw-forloop, adamw-fused, deepspeed."),
    world_size: Optional[int] = typer.Option(None, "--world-size", help="Ranks \\[default: as a sweep uses]."),
    repeats: int = typer.Option(15, "--repeats", help="Samples per case."),
    quick: bool = typer.Option(False, "--quick", help="Fewer and smaller sizes (a smoke run in well under a minute)."),
    cpu: bool = typer.Option(False, "--cpu", help="Use the CPU accelerator even if GPUs are visible."),
    label: Optional[str] = typer.Option(None, "--label", help="A label stored with the run."),
    hostfile: Optional[str] = HostfileOpt,
    include: Optional[str] = IncludeOpt,
    num_nodes: Optional[int] = NumNodesOpt,
    master_addr: Optional[str] = MasterAddrOpt,
    db: Path = DbOpt,
    out: Path = OutOpt,
) -> None:
    """Kernel micro-benchmarks: GEMM, attention backends, norms, MLP, optimizer step, collectives."""
    from pydantic import ValidationError

    from ..env import detect_hardware
    from ..kernels.plan import KernelPlan
    from ..launch import launch_world_size
    from .app import launch_options
    from ..microbench import run_kernels_on_pool
    from ..models import CATALOG, ModelNotFound, build_config
    from ..report.html import write_report
    from ..store import Store

    hw = detect_hardware(force_cpu=cpu)
    os.environ.setdefault("DS_ACCELERATOR", hw.accelerator)  # the driver's DeepSpeed agrees with its ranks, quietly
    cuda = hw.accelerator == "cuda"
    try:
        options = launch_options(hostfile, include, None, num_nodes, master_addr, None, None)
        ranks = world_size or launch_world_size(options) or hw.world_size
    except SpecError as e:
        fail(str(e))
    fields: dict = dict(model=model or hw.default_model, family=family.value, seq_len=seq_len, micro_batch=micro_batch,
                        repeats=repeats, world_size=ranks,
                        precisions=_items(precision) if precision else default_kernel_precisions(hw))
    if only:
        fields["benches"] = _items(only)
    if optimizer:
        fields["optimizers"] = _items(optimizer)
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
        from ..spec import _first_error

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
    run_id, records, wall = run_kernels_on_pool(plan, hw, store, label=label, log_dir=Path(out) / "logs", options=options)
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
            t.add_row(r["bench"], r["case"], r["shape"], "–", "", "", f"[yellow]{r['status']}[/] {shown(error_summary(r['reason'], 70))}")
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
