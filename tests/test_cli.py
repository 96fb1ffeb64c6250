"""The CLI: bad input is one line and exit code 2, before anything launches; a failing trial does not stop a sweep."""

import json
import os

import pytest

from helpers import llmbench, cli


@pytest.mark.parametrize("args, needle", [
    (["sweep", "nope"], "unknown suite 'nope'"),
    (["sweep", "zero", "--set", "zero_stage=5"], "zero_stage=5"),
    (["sweep", "zero", "--set", "micro_batch=0"], "micro_batch=0"),
    (["sweep", "zero", "--set", "model=/no/such/dir"], "unknown model '/no/such/dir'"),
    (["sweep", "zero", "--set", "colour=red"], "--set colour: unknown axis"),
    (["run", "--zero-stage", "1", "--set", "offload=optimizer+params"], "needs zero_stage 3"),
    (["run", "--set", "quant=int8-wo"], "quant=int8-wo is an inference method"),
    (["run", "--set", "scenario=inference", "--set", "world_size=1", "--set", "quant=zeropp-qg"], "is a training method"),
    (["results", "--db", "/no/such.db"], "no such store"),
    # choices are enums, and a usage error is one line too (llmbench.cli.main)
    (["results", "--format", "xml"], "'xml' is not one of 'table', 'csv', 'json', 'parquet'"),
    (["best", "--objective", "speed"], "'speed' is not one of 'throughput', 'memory', 'budget'"),
    (["run", "--precision", "fp8"], "'fp8' is not one of 'auto', 'fp32', 'fp16', 'bf16'"),
    (["sweep", "zero", "--no-such-option"], "No such option: --no-such-option"),
    (["kernels", "--family", "opt"], "'opt' is not one of 'llama', 'gpt2'"),
    (["sweep", "zero", "--hostfile", "/no/such/hostfile"], "--hostfile /no/such/hostfile: no such file"),
    (["sweep", "zero", "--set", "rounds=0"], "rounds"),
])
def test_bad_input_exits_2_with_one_line(args, needle, tmp_path):
    p = cli(*args, "--db", str(tmp_path / "x.db"), check=False) if "--db" not in args else cli(*args, check=False)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "x.db").exists()  # nothing was launched or stored


@pytest.mark.parametrize("args", [["sweep", "zero", "--set", "zero_stage=5"], ["results", "--format", "xml"]])
def test_the_console_script_exits_2_with_one_line(args, tmp_path):
    """The same refusals from the installed console script in its own process (a spec error, a usage error)."""
    p = llmbench(*args, "--db", str(tmp_path / "x.db"), check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "x.db").exists()


def test_a_malformed_test_slowdown_is_bad_input(tmp_path):
    import os

    p = cli("sweep", "zero", "--db", str(tmp_path / "x.db"), check=False,
                 env=dict(os.environ, LLMBENCH_TEST_SLOWDOWN="fast:z1-mb4"))
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "LLMBENCH_TEST_SLOWDOWN='fast:z1-mb4'" in lines[0], p.stderr
    assert not (tmp_path / "x.db").exists()


def test_every_option_has_help_and_choices_are_listed():
    """A thin CLI: every option of every command has help text; choices show in --help."""
    from llmbench.cli import app
    from typer.main import get_command

    group = get_command(app)
    for name, cmd in group.commands.items():
        for param in cmd.params:
            if param.param_type_name == "option":
                assert getattr(param, "help", None), f"llmbench {name} {param.opts[0]} has no help"
    out = cli("results", "--help").stdout
    assert "parquet" in out and "markdown" in out


def test_gate_bad_margin_is_one_line(tmp_path):
    p = cli("gate", "a", "b", "--margin", "speed=0.1", "--db", str(tmp_path / "x.db"), check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "--margin speed=0.1" in p.stderr


def test_dry_run_lists_trials_without_running(tmp_path):
    p = cli("sweep", "zero", "--dry-run", "--db", str(tmp_path / "x.db"))
    assert "z3-mb8" in p.stdout and "8 trials" in p.stdout
    assert not (tmp_path / "x.db").exists()


def test_env_command():
    out = llmbench("env").stdout
    assert "deepspeed" in out and "gloo" in out


@pytest.mark.parametrize("args", [["env"], ["sweep", "zero", "--dry-run"]])
def test_console_is_quiet(args, tmp_path):
    """No line the user did not cause: torchao's extension-loading warnings, torch's pytree
    deprecations and DeepSpeed's accelerator auto-detection are silenced at their source."""
    p = llmbench(*args, "--db", str(tmp_path / "x.db")) if args[0] == "sweep" else llmbench(*args)
    assert p.stderr == "", p.stderr


def test_unsupported_trial_is_recorded_and_sweep_goes_on(tmp_path):
    """fp16 on DeepSpeed's CPU accelerator is refused on a CPU without fp16 (oneDNN capped at
    AVX2, as on an AVX2-only machine: tests/test_failures.py); the next trial still runs, on a
    fresh pool."""
    suite = tmp_path / "mixed.yaml"
    suite.write_text("name: mixed\nfixed: {model: tiny, seq_len: 32, micro_batch: 2, warmup_steps: 2, steps: 2}\n"
                     "grid: {precision: [fp16, fp32]}\n")
    db = str(tmp_path / "m.db")
    llmbench("sweep", str(suite), "--db", db, "--out", str(tmp_path), env=dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2"))
    recs = [json.loads(x) for x in cli("results", "--db", db, "--format", "json").stdout.splitlines()]
    assert [r["status"] for r in recs] == ["unsupported", "ok"]
    # decided before launch from DeepSpeed's own accelerator: no rank was started for it
    assert "fp16" in recs[0]["error"] and "supported_dtypes" in recs[0]["error"]
    assert recs[0]["pool_start_s"] == 0 and recs[0]["window_s"] is None and recs[1]["pool_start_s"] > 0


def test_hung_trial_times_out_and_next_trial_runs(tmp_path):
    """A trial past its timeout_s is killed with all its processes; the sweep goes on."""
    suite = tmp_path / "hang.yaml"
    suite.write_text("name: hang\nfixed: {model: tiny, seq_len: 32, micro_batch: 2, warmup_steps: 2, timeout_s: 12}\n"
                     "grid: {steps: [1000000, 2]}\n")
    db = str(tmp_path / "h.db")
    llmbench("sweep", str(suite), "--db", db, "--out", str(tmp_path))
    recs = [json.loads(x) for x in cli("results", "--db", db, "--format", "json").stdout.splitlines()]
    assert [r["status"] for r in recs] == ["timeout", "ok"]
    assert "12s limit" in recs[0]["error"]


def test_divergence_is_recorded(tmp_path):
    db = str(tmp_path / "d.db")
    p = llmbench("run", "--precision", "fp32", "--set", "lr=1e30", "--set", "seq_len=32", "--set", "steps=3",
                 "--set", "warmup_steps=2", "--db", db, "--out", str(tmp_path), check=False)
    (rec,) = [json.loads(x) for x in cli("results", "--db", db, "--format", "json").stdout.splitlines()]
    assert rec["status"] == "diverged", rec["error"]
    assert "loss" in rec["error"] and p.returncode == 1  # no trial succeeded
