"""`llmbench plan`: predicted memory per rank for every trial of a suite, launching nothing."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..spec import SpecError
from ..safetext import shown
from .app import app, console, fail


class Format(str, Enum):
    table = "table"
    json = "json"


def _hardware(device: Optional[str], gpu_memory: Optional[str], gpus_per_node: Optional[int], nodes: int, cpu: bool):
    """The local hardware, or the one described (a named device or --gpu-memory: CUDA GPUs)."""
    from ..env import Hardware, detect_hardware, usable_cores
    from ..plan.devices import DEVICES, parse_bytes
    from ..precision import Capabilities

    if device is None and gpu_memory is None:
        hw = detect_hardware(force_cpu=cpu)
        if gpus_per_node or nodes > 1:
            ranks = (gpus_per_node or hw.world_size) * nodes
            hw = Hardware(hw.accelerator, hw.comm_backend, ranks, hw.device_name, hw.device_memory_bytes, hw.cpu_cores, hw.caps)
        return hw, None
    if cpu:
        raise SpecError("--cpu plans for this machine's CPU accelerator; it cannot be combined with --device or --gpu-memory")
    named = None
    if device is not None:
        named = DEVICES.get(device.lower())
        if named is None:
            raise SpecError(f"--device {device}: unknown; choose one of {', '.join(DEVICES)} or give --gpu-memory")
    try:
        memory = parse_bytes(gpu_memory) if gpu_memory else named.memory_bytes
    except ValueError as e:
        raise SpecError(f"--gpu-memory: {e}") from None
    ranks = (gpus_per_node or 8) * nodes
    caps = Capabilities("cuda", cuda_capability=(9, 0) if named is None or "a100" not in named.name else (8, 0))
    name = f"{named.name} with {gpu_memory}" if named and gpu_memory else named.name if named else f"GPU with {gpu_memory}"
    return Hardware("cuda", "nccl", ranks, name, memory, usable_cores(), caps), named


def _gib(x: float | None) -> str:
    return "" if x is None else f"{x / 2**30:.2f}"


@app.command()
def plan(
    suite: str = typer.Argument(..., help="A built-in suite name or a path to a YAML suite."),
    set_: list[str] = typer.Option([], "--set", help="Override an axis: axis=v1,v2 (repeatable)."),
    device: Optional[str] = typer.Option(None, "--device", help="A named GPU to plan for: a100-40g, a100-80g, h100-sxm, h100-pcie, h100-nvl, h200."),
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="GPU memory to plan for (e.g. 80GiB), instead of a named device."),
    gpus_per_node: Optional[int] = typer.Option(None, "--gpus-per-node", min=1, help="GPUs (ranks) per node \\[default: 8 for a described GPU, else the local ranks]."),
    nodes: int = typer.Option(1, "--nodes", min=1, help="Nodes; world size = GPUs per node × nodes."),
    memory_budget: Optional[str] = typer.Option(None, "--memory-budget", help="Judge each trial's allocator peak per rank (its tensors, buckets whole: what a GPU's allocator holds; on a CPU llmbench's counting allocator) against this (e.g. 2GiB) instead of the device's memory."),
    base_config: Optional[Path] = typer.Option(None, "--base-config", help="Your DeepSpeed config JSON as every trial's starting point."),
    cpu: bool = typer.Option(False, "--cpu", help="Plan for DeepSpeed's CPU accelerator even if GPUs are visible."),
    format: Format = typer.Option(Format.table, "--format", help="table or json."),
) -> None:
    """Predict memory per rank for a suite's trials (states, buffers, activations, fixed), and which would not fit; launches nothing."""
    from ..engine import axes_from_base_config, load_base_config
    from ..plan.prune import default_budget, judged_peak, predicted_bytes
    from ..precision import resolve
    from ..spec import expand, load_suite
    from ..sweep import make_plan

    try:
        hw, named = _hardware(device, gpu_memory, gpus_per_node, nodes, cpu)
        s, source = load_suite(suite)
        defaults = {"model": hw.default_model, "world_size": hw.world_size}
        base = load_base_config(base_config) if base_config else None
        if base:
            defaults.update(axes_from_base_config(base))
        budget = default_budget(hw, memory_budget)
        per_node = gpus_per_node or (hw.world_size // nodes if hw.accelerator == "cuda" else None)
        the_plan = make_plan(expand(s, source, defaults, set_, lambda p: resolve(p, hw.caps)), hw, base, budget,
                             ranks_per_node=per_node)
    except SpecError as e:
        fail(str(e))
    rows = []
    for t in the_plan.trials:
        pred = t.memory
        row = {"trial_id": t.trial_id, **{k: getattr(t.spec, k) for k in ("model", "family", "precision", "zero_stage", "offload",
                                                                             "micro_batch", "grad_accum", "seq_len", "world_size",
                                                                             "activation_checkpointing")},
               "status": "skipped" if t.skip else "unsupported" if t.unsupported else "pruned" if t.pruned else "planned",
               "reason": t.skip or t.unsupported or t.pruned, "prediction": pred.to_dict() if pred else None}
        if pred:
            have = budget.per_rank(min(t.spec.world_size, per_node or t.spec.world_size))
            need = predicted_bytes(pred, budget)
            row.update(budget_bytes=have, judged=budget.what, needs_bytes=need, fits=need <= have, headroom=1 - need / have)
        rows.append(row)
    hw_desc = {"accelerator": hw.accelerator, "device": hw.device_name, "memory_bytes": hw.device_memory_bytes,
               "ranks": hw.world_size, "nodes": nodes,
               "peak_tflops_bf16": named.peak_tflops("bf16") if named else None}
    if format == Format.json:
        print(json.dumps({"hardware": hw_desc, "budget": {"bytes_per_rank": budget.bytes_per_rank, "what": budget.what,
                                                          "margin": budget.margin, "shared_by_ranks": budget.shared},
                          "trials": rows}, indent=1, default=str))
        return
    title = (f"{len(rows)} trials planned for {hw.world_size} × {hw.device_name} ({_gib(hw.device_memory_bytes)} GiB"
             f"{' shared' if budget.shared else ' each'})"
             + (f", judged against --memory-budget {_gib(budget.bytes_per_rank)} GiB" if budget.what == "budget" else "")
             + "; GiB per rank")
    table = Table(title=title)
    # with --memory-budget the table shows the allocator's peak (buckets whole), which is judged;
    # else the own peak (on a CPU its RSS: buckets as pages written, fixed costs)
    alloc = budget.what == "budget"
    for col in ("trial", "zero", "micro", "seq", "states dev", "states host", "at peak: states", "buffers", "activations",
                "temporaries", "fixed", "allocator peak" if alloc else "own peak", "needs", "fits", "headroom"):
        table.add_column(col, justify="right")
    table.add_column("note")
    for r, t in zip(rows, the_plan.trials):
        p = t.memory
        if p is None:
            table.add_row(shown(r["trial_id"], 80), str(t.spec.zero_stage), str(t.spec.micro_batch), str(t.spec.seq_len),
                          *[""] * 11, shown(f"{r['status']}: {r['reason'] or t.plan_note or 'no prediction (inference)'}"))
            continue
        peak, phase, terms = judged_peak(p, budget)
        if t.pruned:
            note = f"pruned; peak in {phase}"
        elif r["reason"]:
            note = f"{r['status']}: {r['reason']}"
        elif not r["fits"]:
            note = f"over by {-r['headroom']:.0%}, within the {budget.margin:.0%} margin: launched"
        else:
            note = f"peak in {phase}"
        table.add_row(shown(r["trial_id"], 80), str(t.spec.zero_stage), str(t.spec.micro_batch), str(t.spec.seq_len),
                      _gib(p.states_device), _gib(p.states_host), _gib(terms.get("states")), _gib(terms.get("buffers")),
                      _gib(terms.get("activations")), _gib(terms.get("temporaries")), _gib(terms.get("fixed")), _gib(peak),
                      _gib(predicted_bytes(p, budget)), "[green]yes[/]" if r["fits"] else "[red]no[/]", f"{r['headroom']:+.0%}", shown(note))
    console.print(table)
    console.print(f"states dev/host: the model states held; at peak: the parts of the {'allocator' if alloc else 'own'} peak in its phase. needs = "
                  f"{'the allocator peak, buckets whole (--memory-budget)' if alloc else 'own peak + process/context, NCCL, allocator slack'}; "
                  f"a trial is pruned above {1 + budget.margin:.0%} of the budget. Terms: docs/plan.md.")
