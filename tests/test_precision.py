"""`precision: auto` resolved per device, the measured matmul peak behind MFU, and the FLOP count
MFU uses against torch's profiler."""

import json
import os

import pytest
import torch

from helpers import llmbench, cli
from llmbench.collect.flops import screen_utilisation, utilisation
from llmbench.precision import Capabilities, auto_precision, emulated_bf16_note, native_bf16, resolve
from llmbench.spec import expand, load_suite

AVX2 = Capabilities("cpu", "AVX2", avx512_bf16=False, amx=False, mkldnn_bf16=False)
# AVX-512 without BF16 instructions (Skylake-X, Zen 4 has them): oneDNN still says bf16 is
# "supported" there, and emulates it.
AVX512 = Capabilities("cpu", "AVX512", avx512_bf16=False, amx=False, mkldnn_bf16=True)
AVX512_BF16 = Capabilities("cpu", "AVX512", avx512_bf16=True, amx=False, mkldnn_bf16=True)
AMX = Capabilities("cpu", "AVX512", avx512_bf16=True, amx=True, mkldnn_bf16=True)
SM70 = Capabilities("cuda", "AVX2", cuda_capability=(7, 0))   # V100
SM75 = Capabilities("cuda", "AVX2", cuda_capability=(7, 5))   # T4
SM80 = Capabilities("cuda", "AVX2", cuda_capability=(8, 0))   # A100
SM90 = Capabilities("cuda", "AVX512", cuda_capability=(9, 0))  # H100/H200
# AVX512-BF16 hardware with oneDNN told to stop at AVX2 (how the slow path is reproduced here)
LIMITED = Capabilities("cpu", "AVX512", avx512_bf16=True, mkldnn_bf16=False, onednn_max_isa="AVX2")
LIMITED_CORE = Capabilities("cpu", "AVX512", avx512_bf16=True, mkldnn_bf16=True, onednn_max_isa="avx512_core")


@pytest.mark.parametrize("caps, native, auto", [
    (AVX2, False, "fp32"), (AVX512, False, "fp32"), (AVX512_BF16, True, "bf16"), (AMX, True, "bf16"),
    (SM70, False, "fp16"), (SM75, False, "fp16"), (SM80, True, "bf16"), (SM90, True, "bf16"),
    (LIMITED, False, "fp32"), (LIMITED_CORE, False, "fp32"),
], ids=["avx2", "avx512-no-bf16", "avx512-bf16", "amx", "sm70", "sm75", "sm80", "sm90", "onednn-avx2",
        "onednn-avx512-core"])
def test_auto_precision_per_device(caps, native, auto):
    assert native_bf16(caps) is native
    assert auto_precision(caps) == auto == resolve("auto", caps)
    for explicit in ("fp32", "fp16", "bf16"):  # an explicit choice is never changed
        assert resolve(explicit, caps) == explicit
    note = emulated_bf16_note("bf16", caps)
    assert (note is not None) == (caps.accelerator == "cpu" and not native)
    assert emulated_bf16_note("fp32", caps) is None


def test_resolve_rejects_unknown():
    with pytest.raises(ValueError, match="fp8"):
        resolve("fp8", AVX2)


@pytest.mark.parametrize("caps, expect", [(AVX2, "fp32"), (AMX, "bf16"), (SM70, "fp16")])
def test_trial_ids_name_the_resolved_precision_and_keep_the_request(caps, expect):
    suite, src = load_suite("zero")
    defaults = {"model": "tiny", "world_size": 2}
    (trial_id, spec, _), = expand(suite, src, defaults, ["zero_stage=0", "micro_batch=4"], lambda p: resolve(p, caps))
    assert (spec.precision, spec.requested_precision) == (expect, "auto") and trial_id == "tiny-z0-mb4-ga1-" + expect
    trials = expand(suite, src, defaults, ["precision=bf16,fp32", "zero_stage=0", "micro_batch=4"],
                    lambda p: resolve(p, caps))
    assert [(t, s.precision, s.requested_precision) for t, s, _ in trials] == [("bf16", "bf16", "bf16"),
                                                                                ("fp32", "fp32", "fp32")]


def test_auto_that_repeats_an_explicit_precision_is_one_clear_error():
    from llmbench.spec import SpecError

    suite, src = load_suite("zero")
    with pytest.raises(SpecError, match="repeats a configuration"):
        expand(suite, src, {"model": "tiny", "world_size": 2}, ["precision=auto,fp32"], lambda p: resolve(p, AVX2))


def test_unresolved_auto_never_reaches_deepspeed():
    from llmbench.engine import ds_config
    from llmbench.spec import TrialSpec

    with pytest.raises(ValueError, match="resolved"):
        ds_config(TrialSpec(), "cpu", 128)


# -- the measured peak --------------------------------------------------------------------------

def test_linear_gemms_are_the_forward_and_both_gradients():
    """Each linear layer y = x·Wᵀ (x: m×k, W: n×k) runs three GEMMs in training: forward m×k·k×n,
    input gradient dY·W (m×n·n×k), weight gradient dYᵀ·X (n×m·m×k): each 2·m·k·n FLOPs, and
    together the 6·(params of the layer)·tokens of the 6N rule."""
    from llmbench.collect.peak import linear_gemms

    shape = {"hidden_size": 8, "head_dim": 2, "n_heads": 4, "n_kv_heads": 4, "vocab_size": 16}
    g = linear_gemms(shape, 12, tokens=5)
    assert g["mlp_up.fwd"] == (5, 8, 12) and g["mlp_up.dgrad"] == (5, 12, 8) and g["mlp_up.wgrad"] == (12, 5, 8)
    assert g["lm_head.fwd"] == (5, 8, 16)
    # qkv (8→24), attn_out (8→8), mlp_up (8→12), mlp_down (12→8), lm_head (8→16): attn_out and
    # mlp_down's GEMMs coincide with others' and are measured once
    assert len(set(g.values())) == len(g)


def test_peak_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    from llmbench.collect.peak import measured_peak

    monkeypatch.setenv("LLMBENCH_CACHE", str(tmp_path))
    gemms = {"a": (64, 32, 48), "b": (48, 64, 32)}
    first = measured_peak(gemms, "fp32")
    second = measured_peak(gemms, "fp32")
    assert first.source == "measured" and second.source == "cache"
    assert second.tflops == first.tflops and second.best_gemm == first.best_gemm
    assert second.probe_s < first.probe_s
    # another thread count is another key: measured again
    before = torch.get_num_threads()
    torch.set_num_threads(1 if before != 1 else 2)
    try:
        assert measured_peak(gemms, "fp32").source == "measured"
    finally:
        torch.set_num_threads(before)
    files = list((tmp_path / "peaks").glob("*.json"))
    assert len(files) == 2 and json.loads(files[0].read_text())["key"]["dtype"] == "fp32"


def test_peak_rate_is_two_mkn_over_the_best_call(tmp_path, monkeypatch):
    """With every call timed at 1 ms, each GEMM's rate is 2·m·k·n / 1 ms and the peak is the largest."""
    import llmbench.collect.peak as peak

    monkeypatch.setenv("LLMBENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(peak, "_seconds", lambda fn, device: 1e-3)
    gemms = {"a": (64, 32, 48), "b": (48, 64, 32), "c": (16, 16, 16)}
    got = peak.measure_peak(gemms, "fp32", "cpu")
    rates = {name.split(":")[0]: v for name, v in got["per_gemm"].items()}
    assert rates == {k: pytest.approx(2 * m * kk * n / 1e-3 / 1e12) for k, (m, kk, n) in gemms.items()}
    assert got["tflops"] == pytest.approx(2 * 64 * 32 * 48 / 1e-3 / 1e12) and got["gemms_measured"] == 3


def test_peak_probe_stops_at_its_time_budget(tmp_path, monkeypatch):
    """Largest GEMM first; once the budget is spent the rest are left out (at least one is measured)."""
    import llmbench.collect.peak as peak

    monkeypatch.setattr(peak, "_seconds", lambda fn, device: 1e-3)
    got = peak.measure_peak({"small": (8, 8, 8), "big": (64, 64, 64)}, "fp32", "cpu", budget_s=0.0)
    assert got["gemms_measured"] == 1 and list(got["per_gemm"])[0].startswith("big:")


def test_utilisation_above_the_peak_is_a_measurement_error_not_a_figure():
    from llmbench.models import build_config, model_stats

    stats = model_stats(build_config("tiny"))
    u = utilisation(stats, 128, tokens_per_s_per_device=1e6, activation_checkpointing=False, peak_tflops=None,
                    measured_peak_tflops=1e-3)
    assert u["mfu_vs_measured_peak"] > 1
    notes = screen_utilisation(u)
    assert u["mfu_vs_measured_peak"] is None and u["hfu_vs_measured_peak"] is None
    assert len(notes) == 2 and all("measurement error" in n for n in notes)
    ok = utilisation(stats, 128, 10.0, False, None, 1.0)
    assert screen_utilisation(ok) == [] and 0 < ok["mfu_vs_measured_peak"] < 1


def test_flops_per_token_matches_torch_profiler_on_one_training_step():
    """torch.profiler's with_flops counts every matmul of one real forward+backward step (eager
    attention, so QKᵀ and PV are visible matmuls): 6N + 12·L·H·Q·T per token, the count MFU uses."""
    from torch.profiler import ProfilerActivity, profile

    from llmbench.models import build_config, build_model, flops_per_token, model_stats

    seq, batch = 128, 2
    cfg = build_config("tiny", seq_len=seq, attn_implementation="eager")
    model = build_model(cfg)
    x = torch.randint(0, cfg.vocab_size, (batch, seq))
    model(input_ids=x, labels=x).loss.backward()  # warm up outside the profile
    model.zero_grad()
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        model(input_ids=x, labels=x).loss.backward()
    counted = sum(e.flops for e in prof.key_averages() if e.flops)
    assert counted / x.numel() == pytest.approx(flops_per_token(model_stats(cfg), seq), rel=0.01)  # measured: +0.3%


# -- end to end on the slow path ------------------------------------------------------------------

def test_sweep_on_a_cpu_without_native_bf16(tmp_path):
    """oneDNN limited to AVX2 (the kind of CPU where bf16 GEMM is ~30x slower): `auto` runs fp32;
    an explicit bf16 still runs bf16, with a note in the record and in the report; `env` says so."""
    slow = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    suite = tmp_path / "p.yaml"
    suite.write_text("name: p\nfixed: {model: tiny, seq_len: 32, micro_batch: 2, warmup_steps: 2, steps: 2, "
                     "breakdown_steps: 0}\ngrid: {precision: [auto, bf16]}\n")
    db, out = str(tmp_path / "p.db"), tmp_path / "out"
    env = dict(os.environ, **slow)
    llmbench("sweep", str(suite), "--db", db, "--out", str(out), env=env)
    recs = {r["trial_id"]: r for r in map(json.loads, cli("results", "--db", db, "--format", "json").stdout.splitlines())}
    assert set(recs) == {"fp32", "bf16"}
    auto, bf16 = recs["fp32"], recs["bf16"]
    assert (auto["precision"], auto["requested_precision"]) == ("fp32", "auto")
    assert (bf16["precision"], bf16["requested_precision"]) == ("bf16", "bf16")
    assert auto["status"] == bf16["status"] == "ok"
    assert auto["ds_config"]["bf16"]["enabled"] is False and bf16["ds_config"]["bf16"]["enabled"] is True
    assert not any("native bf16" in n for n in auto["notes"])
    (note,) = [n for n in bf16["notes"] if "without native bf16" in n]
    assert "AVX2" in note  # torch's capability as ATEN_CPU_CAPABILITY set it
    html = next(out.glob("report-*.html")).read_text()
    assert "without native bf16" in html
    # the peak is measured on the path the model takes: no utilisation beyond it, for either precision
    for r in recs.values():
        assert r["measured_peak_tflops"] > 0 and r["mfu_vs_measured_peak"] is not None, r["notes"]
        assert not any("measurement error" in n for n in r["notes"])
    text = llmbench("env", env=env).stdout
    assert "precision_auto" in text and "fp32" in text and "AVX2" in text and "matmul bf16" in text


def test_base_config_auto_precision_is_auto():
    """Hugging Face's `"bf16": {"enabled": "auto"}` means: let the device decide."""
    from llmbench.engine import axes_from_base_config

    assert axes_from_base_config({"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}})["precision"] == "auto"
    assert axes_from_base_config({"bf16": {"enabled": True}})["precision"] == "bf16"
    assert axes_from_base_config({"bf16": {"enabled": False}})["precision"] == "fp32"


def test_resume_refuses_to_finish_a_run_with_other_settings(tmp_path):
    """--resume compares the whole identity (identity.py), not the precision alone: a changed
    precision or a changed `--set steps=` is refused before anything launches, naming the keys."""
    suite = tmp_path / "r.yaml"
    suite.write_text("name: r\nfixed: {model: tiny, seq_len: 32, micro_batch: 2, warmup_steps: 2, steps: 2, "
                     "breakdown_steps: 0}\ngrid: {zero_stage: [0]}\n")
    db = str(tmp_path / "r.db")
    llmbench("sweep", str(suite), "--set", "precision=fp32", "--db", db, "--out", str(tmp_path))
    run_id = json.loads(cli("results", "--db", db, "--format", "json").stdout)["run_id"]
    p = cli("sweep", str(suite), "--set", "precision=bf16", "--resume", run_id, "--db", db, "--out", str(tmp_path),
                 check=False)
    assert p.returncode == 2 and "precision: fp32 → bf16" in p.stderr and "--set precision=fp32" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    p = cli("sweep", str(suite), "--set", "precision=fp32", "--set", "steps=3", "--resume", run_id, "--db", db,
                 "--out", str(tmp_path), check=False)
    assert p.returncode == 2 and "ran with other settings than this plan's (steps: 2 → 3)" in p.stderr, p.stderr
