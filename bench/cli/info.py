"""`llmbench suites` and `llmbench env`: what is there to run, and on what."""

from __future__ import annotations

import typer
from rich.table import Table

from ..safetext import shown
from .app import app, console


@app.command()
def suites() -> None:
    """List the built-in suites."""
    from ..spec import builtin_suites, load_suite

    t = Table()
    for col in ("suite", "grid", "description"):
        t.add_column(col)
    for name, path in sorted(builtin_suites().items()):
        s, _ = load_suite(str(path))
        t.add_row(name, shown(", ".join(f"{k}={v}" for k, v in s.grid.items())), shown(s.description))
    console.print(t)


@app.command()
def env(cpu: bool = typer.Option(False, "--cpu", help="Describe the CPU fallback even if GPUs are visible.")) -> None:
    """Versions, devices, accelerator and communication backend that a sweep would use."""
    from ..env import detect_hardware, environment, matmul_rates

    hw = detect_hardware(force_cpu=cpu)
    info = environment(hw)
    t = Table(show_header=False)
    for k, v in info.items():
        t.add_row(k, shown(v))
    for p, r in matmul_rates(hw).items():
        t.add_row(f"matmul {p}", f"{r['tflops'] * 1e3:,.1f} GFLOP/s (best linear-layer GEMM of the {r['shapes']}, "
                                 f"{r['threads']} thread{'s' if r['threads'] != 1 else ''}; {r['source']})")
    console.print(t)


if __name__ == "__main__":
    app()
