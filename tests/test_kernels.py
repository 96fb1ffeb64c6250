"""Kernel micro-benchmarks: FLOP formulas against torch's FLOP counter, and a real
`llmbench kernels` run on 2 gloo ranks into the store and the report."""

import json
import sqlite3

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from helpers import llmbench, cli
from llmbench.collect.comms import bus_factor
from llmbench.kernels.attention import attention_flops, eager_attention
from llmbench.kernels.gemm import model_gemm_shapes
from llmbench.kernels.layers import mlp_flops, mlp_module
from llmbench.models import intermediate_size
from llmbench.models import build_config, config_shape


def default_precisions() -> list[str]:
    """fp32, and bf16 where this CPU computes it natively (the resolver's table is tested in test_precision)."""
    from llmbench.env import detect_hardware

    return ["fp32"] + (["bf16"] if detect_hardware(force_cpu=True).bf16_native else [])


def counted(fn) -> int:
    with FlopCounterMode(display=False) as c:
        fn()
    return c.get_total_flops()


def test_attention_flops_match_torch_flop_counter():
    b, h, s, d = 2, 4, 64, 32
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
    fwd = counted(lambda: eager_attention(q, k, v, causal=False))
    assert attention_flops(b, h, s, d, causal=False, op="fwd") == fwd == 4 * b * h * s * s * d
    out = eager_attention(q, k, v, causal=False)
    bwd = counted(lambda: out.sum().backward())
    # the eager backward does 4 matmuls (2× the forward); FlashAttention's convention counts
    # 2.5× because its backward recomputes QKᵀ: fwd+bwd = 3.5× forward
    assert bwd == 2 * fwd
    assert attention_flops(b, h, s, d, False, "fwd+bwd") == fwd + bwd + fwd / 2
    assert attention_flops(b, h, s, d, True, "fwd") == fwd / 2


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_mlp_flops_match_torch_flop_counter(family):
    config = build_config("tiny", family, 128)
    shape = config_shape(config)
    m = mlp_module(config)
    x = torch.randn(64, shape["hidden_size"], requires_grad=True)
    fwd = counted(lambda: m(x))
    assert mlp_flops(config, shape["hidden_size"], intermediate_size(config), 64, "fwd") == fwd
    y = m(x)
    assert mlp_flops(config, shape["hidden_size"], intermediate_size(config), 64, "fwd+bwd") == fwd + counted(
        lambda: y.sum().backward())


def test_model_gemm_shapes_cover_the_models_matmul_flops():
    """The model's GEMMs (LM head once) and the attention matmuls add up to the FLOPs torch
    counts in a forward (eager attention, whose QKᵀ and PV the counter sees as matmuls)."""
    config = build_config("tiny", "llama", 128, attn_implementation="eager")
    shape = config_shape(config)
    gemms = model_gemm_shapes(shape, intermediate_size(config), 128)
    from llmbench.models import build_model

    model = build_model(config).eval()
    x = torch.randint(0, shape["vocab_size"], (1, 128))
    total = counted(lambda: model(input_ids=x))
    per_layer = sum(2 * m * k * n for name, (m, k, n) in gemms.items() if name != "lm_head")
    # mlp_up stands for gate and up (both h→i); attention's QKᵀ and PV: 4·s²·h per layer
    per_layer += 2 * 128 * shape["hidden_size"] * intermediate_size(config)
    attn = 4 * 128 * 128 * shape["hidden_size"]
    m, k, n = gemms["lm_head"]
    assert total == shape["n_layers"] * (per_layer + attn) + 2 * m * k * n


def test_kernels_bad_input_exits_2_before_launching(tmp_path):
    for args, needle in ((["--only", "gemm,warp"], "warp"), (["--precision", "fp16"], "fp16"),
                         (["--optimizer", "lion"], "lion"), (["--model", "nope"], "nope")):
        p = cli("kernels", *args, "--db", str(tmp_path / "db"), check=False)
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        assert needle in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "db").exists()


@pytest.fixture(scope="session")
def kernels_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("kernels")
    db, out = root / "llmbench.db", root / "reports"
    # DeepSpeedCPUAdam is left out: its first JIT build takes minutes on a fresh machine
    p = llmbench("kernels", "--quick", "--optimizer", "adamw-foreach,adamw-fused", "--db", str(db), "--out", str(out))
    con = sqlite3.connect(db)
    (run_id, suite, status), = con.execute("SELECT run_id, suite, status FROM runs").fetchall()
    rows = [json.loads(r) for (r,) in con.execute("SELECT record_json FROM kernels WHERE run_id=? ORDER BY seq", (run_id,))]
    return {"stdout": p.stdout, "rows": rows, "run_id": run_id, "suite": suite, "status": status, "db": db, "out": out}


def test_kernels_run_stores_every_bench(kernels_run):
    assert kernels_run["suite"] == "kernels" and kernels_run["status"] == "finished"
    rows = kernels_run["rows"]
    assert {r["bench"] for r in rows} == {"gemm", "attention", "norm", "mlp", "optimizer", "collective"}
    ok = [r for r in rows if r["status"] == "ok"]
    for r in ok:
        assert r["median_s"] > 0 and len(r["samples_s"]) >= 3 and len(r["rank_median_s"]) == 2
    gemm = [r for r in ok if r["bench"] == "gemm"]
    assert {r["dtype"] for r in gemm} == set(default_precisions())  # fp32, and bf16 only where it is native
    for r in gemm:  # the rate is the work over the median time
        assert r["tflops"] == pytest.approx(r["flops"] / r["median_s"] / 1e12)
    opt = {r["case"]: r for r in ok if r["bench"] == "optimizer"}
    assert set(opt) == {"adamw-foreach", "adamw-fused"}
    assert opt["adamw-fused"]["params_per_s"] == pytest.approx(opt["adamw-fused"]["params"] / opt["adamw-fused"]["median_s"])


def test_kernels_attention_backends_vs_eager(kernels_run):
    att = {(r["backend"], r["op"], r["dtype"]): r for r in kernels_run["rows"] if r["bench"] == "attention"}
    for dtype in default_precisions():
        for op in ("fwd", "fwd+bwd"):
            assert att[("eager", op, dtype)]["status"] == "ok"
            assert att[("sdpa-math", op, dtype)]["status"] == "ok"
        # same numbers as the eager formula, to the dtype's precision
        assert att[("sdpa-math", "fwd", dtype)]["max_abs_err"] < (1e-4 if dtype == "fp32" else 0.05)
    # backends this CPU lacks are recorded, with the reason, not dropped
    cudnn = att[("sdpa-cudnn_attention", "fwd", "fp32")]
    assert cudnn["status"] == "unsupported" and cudnn["reason"]


def test_kernels_collectives_bandwidth(kernels_run):
    coll = [r for r in kernels_run["rows"] if r["bench"] == "collective"]
    assert {r["op"] for r in coll} == {"all_reduce", "all_gather", "reduce_scatter", "broadcast"}
    for r in coll:
        assert r["status"] == "ok" and r["backend"] == "gloo" and r["world_size"] == 2
        from llmbench.collect.stats import median

        assert r["algbw_gbs"] == pytest.approx(r["bytes"] / median(r["samples_s"]) / 1e9)
        assert r["busbw_gbs"] == pytest.approx(r["algbw_gbs"] * bus_factor(r["op"], 2))
        # both ranks report the slowest rank's samples
        assert r["rank_median_s"][0] == pytest.approx(r["rank_median_s"][1])


def test_kernels_report_section(kernels_run, tmp_path):
    html = next(kernels_run["out"].glob("report-*.html")).read_text()
    assert 'id="kernels"' in html and "achievable peak" in html and "busbw" in html
    assert html.count('src="data:image/png;base64,') >= 4
    assert "Which configuration to use" not in html  # a kernels run has no trials to recommend
    p = cli("report", kernels_run["run_id"], "--db", str(kernels_run["db"]), "--out", str(tmp_path))
    assert "report:" in p.stdout and 'id="kernels"' in next(tmp_path.glob("report-*.html")).read_text()


def test_default_kernel_precisions_follow_the_device():
    from llmbench.cli.kernels import default_kernel_precisions
    from llmbench.env import Hardware
    from llmbench.precision import Capabilities

    def hw(caps):
        return Hardware(caps.accelerator, "gloo", 2, "x", 1, 2, caps)

    assert default_kernel_precisions(hw(Capabilities("cpu", "AVX2"))) == ["fp32"]
    assert default_kernel_precisions(hw(Capabilities("cpu", "AVX512", avx512_bf16=True, mkldnn_bf16=True))) == ["fp32", "bf16"]
    assert default_kernel_precisions(hw(Capabilities("cuda", cuda_capability=(7, 0)))) == ["fp16", "fp32"]
    assert default_kernel_precisions(hw(Capabilities("cuda", cuda_capability=(9, 0)))) == ["bf16", "fp16", "fp32"]


def test_interrupted_kernels_run_keeps_the_cases_it_finished(tmp_path):
    """Each case is stored when every rank has finished it: Ctrl-C part-way keeps them all."""
    import signal
    import subprocess
    import sys
    import time

    db = tmp_path / "k.db"
    proc = subprocess.Popen([sys.executable, "-m", "llmbench.cli", "kernels", "--only", "gemm,norm,collective",
                             "--repeats", "200", "--db", str(db), "--out", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, stored = time.monotonic() + 300, 0
    while time.monotonic() < deadline and stored < 3:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.3)
        if db.exists():
            try:
                stored = sqlite3.connect(db, timeout=5).execute("SELECT COUNT(*) FROM kernels").fetchone()[0]
            except sqlite3.OperationalError:
                pass
    assert stored >= 3, "no case was stored while the run went on"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    con = sqlite3.connect(db)
    (status,), = con.execute("SELECT status FROM runs").fetchall()
    rows = [json.loads(r) for (r,) in con.execute("SELECT record_json FROM kernels ORDER BY seq")]
    assert status == "interrupted" and len(rows) >= stored
    assert all(r["status"] in ("ok", "unsupported") and len(r["rank_median_s"]) == 2 for r in rows)
    assert f"keeps its {len(rows)} finished cases" in out
