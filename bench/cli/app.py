"""The command line's shared parts: the Typer app, the consoles, the one-line error, the
--db/--out options, and the tables several commands print."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

class SafeConsole(Console):
    """The terminal's console: every string it renders has its control characters (ANSI
    escape sequences) and bidi overrides shown escaped (safetext.terminal; newlines kept), and
    a string whose brackets are not valid markup is printed as written instead of raising.
    Values from data are also passed through safetext.shown where they are put in markup."""

    def render_str(self, text: str, **kwargs):
        from rich.errors import MarkupError

        from ..safetext import terminal

        text = terminal(text, limit=10**9, newlines=True)
        try:
            return super().render_str(text, **kwargs)
        except MarkupError:
            return super().render_str(text, **{**kwargs, "markup": False})


app = typer.Typer(help="Benchmark LLM training with real DeepSpeed: sweep, store, report.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
# Rich falls back to 80 columns when stdout is not a terminal; tables need more.
console = SafeConsole(width=None if sys.stdout.isatty() else 160)
err = SafeConsole(stderr=True, width=None if sys.stderr.isatty() else 160)

DEFAULT_DB = Path("reports/llmbench.db")
DEFAULT_OUT = Path("reports")
DbOpt = typer.Option(DEFAULT_DB, "--db", help="SQLite store of runs, trials and steps.")
OutOpt = typer.Option(DEFAULT_OUT, "--out", help="Folder for HTML reports and rank logs.")
# DeepSpeed launcher options, passed to its runner as DeepSpeed users know them (sweep, run, kernels)
HostfileOpt = typer.Option(None, "--hostfile", help="DeepSpeed hostfile for multi-node runs.")
IncludeOpt = typer.Option(None, "--include", help="DeepSpeed --include (e.g. 'worker-0:0,1').")
NumNodesOpt = typer.Option(None, "--num-nodes", help="DeepSpeed --num_nodes.")
MasterAddrOpt = typer.Option(None, "--master-addr", help="DeepSpeed --master_addr.")
ExcludeOpt = typer.Option(None, "--exclude", help="DeepSpeed --exclude (e.g. 'worker-1:0').")
SshPortOpt = typer.Option(None, "--ssh-port", help="DeepSpeed --ssh_port: the SSH port of the hostfile's hosts.")
ControlAddrOpt = typer.Option(None, "--control-addr",
                              help="Address of this host the ranks reach llmbench's control socket on (default: loopback on one node, this host's name on several).")
LauncherOpt = typer.Option("auto", "--launcher",
                           help="auto (srun inside a SLURM allocation without a hostfile, else DeepSpeed's), deepspeed or srun.")


def launch_options(hostfile, include, exclude, num_nodes, master_addr, ssh_port, control_addr, launcher="auto"):
    """The launcher options from the command line (SpecError on a bad --launcher)."""
    from ..launch import LaunchOptions
    from ..launch.slurm import in_allocation
    from ..spec import SpecError

    if launcher not in ("auto", "deepspeed", "srun"):
        raise SpecError(f"--launcher {launcher}: choose auto, deepspeed or srun")
    if launcher == "auto":
        launcher = "srun" if in_allocation() and not (hostfile or include or exclude or num_nodes) else "deepspeed"
    if launcher == "srun" and not in_allocation():
        raise SpecError("--launcher srun: not inside a SLURM allocation (no SLURM_JOB_ID); use salloc or sbatch, or --slurm")
    return LaunchOptions(hostfile=hostfile, include=include, exclude=exclude, num_nodes=num_nodes,
                         master_addr=master_addr, ssh_port=ssh_port, control_addr=control_addr, launcher=launcher)


def error_line(msg: str) -> None:
    """`llmbench: error: MSG` on stderr, one line, as plain text: brackets in it are not markup;
    control characters (ANSI escape sequences), bidi overrides and newlines are shown escaped,
    and a message past 2,000 characters is cut (llmbench.safetext)."""
    from rich.text import Text

    from ..safetext import terminal

    err.print(Text.assemble(("llmbench: error:", "bold red"), " ", terminal(msg, 2000)), highlight=False, soft_wrap=True)


def fail(msg: str, code: int = 2) -> None:
    error_line(msg)
    raise typer.Exit(code)


def error_summary(error: str | None, width: int = 160) -> str:
    """The first line of a trial's error, and its last line when the first only introduces it."""
    lines = [ln.strip() for ln in (error or "").splitlines() if ln.strip()]
    if not lines:
        return ""
    text = lines[0]
    if text.endswith(":") and len(lines) > 1:
        text += " … " + lines[-1]
    return text[:width]


def ok_summary(rec: dict) -> str:
    """One line for a finished trial: tokens/s for training; decode rate, weights and perplexity for inference."""
    if rec.get("scenario") == "inference":
        tps = rec.get("decode_tokens_per_s") or {}
        first = next(iter(tps), None)
        rate = f"decode {tps[first]:,.0f} tok/s at batch {first}" if first else "no decode"
        return (f"{rate}, prefill {1e3 * (rec.get('prefill_latency_s') or 0):.1f} ms, weights "
                f"{(rec.get('weight_bytes') or 0) / 2**20:.2f} MiB, perplexity {rec.get('perplexity') or float('nan'):.3f}")
    return f"{rec['tokens_per_s']:,.0f} tok/s"


def load_run(db: Path, run_id: Optional[str]):
    from ..store import Store

    if not db.exists():
        fail(f"--db {db}: no such store; run `llmbench sweep zero` first")
    store = Store(db)
    run = store.run(run_id)
    if run is None:
        fail(f"run {run_id!r} not found in {db}" if run_id else f"the store {db} holds no run yet")
    return store, run


def print_table(records: list[dict], title: str) -> None:
    from ..safetext import shown

    t = Table(title=shown(title))
    for col in ("trial", "status", "precision", "zero", "micro", "accum", "step s", "tokens/s", "model states MiB",
                "peak MiB", "final loss"):
        t.add_column(col, justify="right")
    train = [r for r in records if r.get("scenario", "train") == "train"]
    for r in train:
        ok = r["status"] == "ok"
        # a trial the search stopped after its short window keeps that window's measurement
        ok = ok or (r["status"] == "stopped" and r.get("step_time_s") is not None)
        status = r["status"] if r["status"] == "ok" else f"[yellow]{r['status']}[/]" if r["status"] == "stopped" \
            else f"[red]{r['status']}[/]"
        t.add_row(shown(r["trial_id"], 80), status, shown(r["precision"]), str(r["zero_stage"]),
                  str(r["micro_batch"]), str(r["grad_accum"]),
                  f"{r['step_time_s']:.4f}" if ok else "–", f"{r['tokens_per_s']:,.0f}" if ok else "–",
                  f"{r['model_state_bytes'] / 2**20:.2f}" if ok else "–",
                  f"{r['peak_mem_bytes'] / 2**20:.0f}" if ok and r.get("peak_mem_bytes") else "–",
                  f"{r['final_loss']:.3f}" if ok else "–")
    if train or len(train) == len(records):
        console.print(t)
    inf = [r for r in records if r.get("scenario") == "inference"]
    if inf:
        print_inference_table(inf)


def print_inference_table(records: list[dict]) -> None:
    from ..safetext import shown

    t = Table(title="inference")
    batches = sorted({b for r in records for b in (r.get("decode_tokens_per_s") or {})}, key=int)
    from ..spec import compression

    for col in ("trial", "status", "method", "precision", "prefill ms", *[f"decode tok/s b{b}" for b in batches],
                "weights MiB", "perplexity", "peak RSS MiB"):
        t.add_column(col, justify="right", overflow="fold" if col in ("trial", "method") else "ellipsis")
    for r in records:
        ok = r["status"] == "ok"
        tps = r.get("decode_tokens_per_s") or {}
        t.add_row(shown(r["trial_id"], 80), r["status"] if ok else f"[red]{r['status']}[/]", shown(compression(r.get("prune"), r["quant"])),
                  shown(r["precision"]),
                  f"{1e3 * r['prefill_latency_s']:.2f}" if ok and r.get("prefill_latency_s") else "–",
                  *[f"{tps[b]:,.0f}" if b in tps else "–" for b in batches],
                  f"{r['weight_bytes'] / 2**20:.3f}" if r.get("weight_bytes") else "–",
                  f"{r['perplexity']:.4f}" if ok and r.get("perplexity") else "–",
                  f"{r['peak_rss_bytes'] / 2**20:.0f}" if ok and r.get("peak_rss_bytes") else "–")
    console.print(t)


def main() -> None:
    """The console script: usage errors become one line and exit code 2, like all bad input."""
    try:  # typer >= 0.2x vendors click as typer._click; before, it used click itself
        from typer._click import exceptions as cx
    except ImportError:
        from click import exceptions as cx

    from ..report import ReportWriteError
    from ..store import StoreError

    try:
        code = app(standalone_mode=False)  # a command's typer.Exit comes back as its code
    except getattr(cx, "NoArgsIsHelpError", ()) as e:  # `llmbench` alone: the help (click >= 8.2; rich prints it)
        text = e.format_message()
        if text.strip():
            console.print(text, highlight=False, markup=False)
        raise SystemExit(0) from None
    except cx.UsageError as e:
        hint = f" (see llmbench {e.ctx.info_name} --help)" if e.ctx is not None and e.ctx.parent is not None else ""
        msg = e.format_message().replace("Value error, ", "")
        error_line(msg + hint)
        raise SystemExit(2) from None
    except typer.Exit as e:
        raise SystemExit(e.exit_code) from None
    except (StoreError, ReportWriteError) as e:  # not a store (2); locked past the timeout, a full disk (1)
        error_line(str(e))
        raise SystemExit(e.code) from None
    except typer.Abort:
        raise SystemExit(130) from None
    except BrokenPipeError:  # `llmbench ... | head`: the reader has what it wanted
        sys.stdout = None
        raise SystemExit(0) from None
    raise SystemExit(code if isinstance(code, int) else 0)
