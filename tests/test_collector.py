"""The collector's figures, each against an independent computation."""

import json

import pytest

from helpers import llmbench, cli
from llmbench.collect.flops import datasheet_peak_tflops, hfu_flops_per_token, utilisation
from llmbench.collect.memory import deepspeed_model_state_bytes, zero_paper_bytes
from llmbench.collect.telemetry import NvmlSampler
from llmbench.models import CATALOG, build_config, build_model, flops_per_token, model_stats


def test_flops_per_token_matches_deepspeed_flops_profiler():
    """DeepSpeed's flops profiler counts the forward pass of the real module; ×3 for training.

    Eager attention, so the attention matmuls are visible to the profiler as torch.matmul.
    """
    import torch
    from deepspeed.profiling.flops_profiler import get_model_profile

    seq = 128
    cfg = build_config("tiny", seq_len=seq, attn_implementation="eager")
    model = build_model(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, seq))
    flops, _, _ = get_model_profile(model, kwargs={"input_ids": x}, print_profile=False, as_string=False)
    measured = 3 * flops / x.numel()
    assert measured == pytest.approx(flops_per_token(model_stats(cfg), seq), rel=0.05)


def test_hfu_adds_one_forward_of_the_layers():
    s = CATALOG["125m"]
    stats = model_stats(build_config("125m"))
    d, ffn = s.hidden_size, s.intermediate_size
    assert stats.n_layer_params == s.n_layers * (4 * d * d + 3 * d * ffn + 2 * d)  # hand count
    T = 2048
    extra = hfu_flops_per_token(stats, T, True) - flops_per_token(stats, T)
    assert extra == 2 * stats.n_layer_params + 4 * s.n_layers * d * T
    assert hfu_flops_per_token(stats, T, False) == flops_per_token(stats, T)
    # Everything recomputed would be 8N + 16LHQT: ours is below it by the LM head's forward.
    full = 8 * stats.n_non_embedding_params + 16 * s.n_layers * d * T
    assert full - hfu_flops_per_token(stats, T, True) == pytest.approx(2 * (stats.n_non_embedding_params - stats.n_layer_params))


def test_mfu_arithmetic():
    stats = model_stats(build_config("1.3b"))
    u = utilisation(stats, 2048, tokens_per_s_per_device=10_000, activation_checkpointing=False,
                    peak_tflops=989.0, measured_peak_tflops=700.0)
    assert u["tflops_per_device"] == pytest.approx(flops_per_token(stats, 2048) * 1e4 / 1e12)
    assert u["mfu"] == pytest.approx(u["tflops_per_device"] / 989.0)
    assert u["mfu_vs_measured_peak"] == pytest.approx(u["tflops_per_device"] / 700.0)


@pytest.mark.parametrize("name, precision, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.0), ("NVIDIA H100 PCIe", "bf16", 756.0), ("NVIDIA H200", "fp16", 989.0),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0), ("NVIDIA A100-SXM4-40GB", "fp32", 19.5), ("Tesla T4", "bf16", None),
    ("cpu", "bf16", None)])
def test_datasheet_peaks(name, precision, peak):
    assert datasheet_peak_tflops(name, precision) == peak


def test_zero_paper_and_deepspeed_layout_agree_for_16_bit():
    for stage in range(4):
        assert deepspeed_model_state_bytes(1000, stage, 4, "bf16") == zero_paper_bytes(1000, stage, 4)
    # fp32: no master copy at stage 0, a cloned fp32 partition at stages 1-3.
    assert [deepspeed_model_state_bytes(1000, s, 2, "fp32") for s in range(4)] == [16000, 14000, 12000, 10000]


def test_telemetry_without_gpu_is_empty_with_reason():
    s = NvmlSampler(0)
    s.start()
    out = s.stop()["telemetry"]
    if out["available"]:
        pytest.skip("an NVIDIA GPU is visible here")
    assert out["reason"] and "NVML" in out["reason"]


def persistent_elements(record):
    """Parameters ZeRO-3 keeps whole: those with at most `stage3_param_persistence_threshold` elements."""
    import torch
    from llmbench.models import config_from_dict

    thr = record["ds_config"]["zero_optimization"]["stage3_param_persistence_threshold"]
    with torch.device("meta"):
        model = build_model(config_from_dict(record["model_config"]))
    return sum(p.numel() for p in model.parameters() if p.numel() <= thr)


def test_measured_model_states_match_deepspeed_layout_fp32(fp32_sweep):
    assert [r["status"] for r in fp32_sweep] == ["ok"] * 4
    for r in fp32_sweep:
        n_persist = persistent_elements(r) if r["zero_stage"] == 3 else 0
        expect = deepspeed_model_state_bytes(r["n_params"], r["zero_stage"], 2, "fp32", n_persist)
        assert r["model_state_bytes"] == pytest.approx(expect, rel=0.002), r["trial_id"]


def test_measured_peak_is_measured_once_per_shape_set_then_read_from_the_cache(zero_sweep):
    """Every trial of one micro-batch runs the same GEMMs: only the first may measure the peak,
    the others read it from the cache (and so take the same value)."""
    for mb in (4, 8):
        recs = [r for r in zero_sweep["records"] if r["micro_batch"] == mb]
        assert [r["measured_peak_source"] for r in recs[1:]] == ["cache"] * (len(recs) - 1)
        assert len({r["measured_peak_tflops"] for r in recs[1:]}) == 1
        assert all(r["measured_peak_probe_s"] < 0.5 for r in recs[1:])


def test_measured_model_states_match_deepspeed_layout_default_precision(zero_sweep):
    """The default sweep's precision is the device's (`auto`): bf16 where native, else fp32."""
    for r in zero_sweep["records"]:
        assert r["requested_precision"] == "auto" and r["precision"] in ("bf16", "fp32")
        n_persist = persistent_elements(r) if r["zero_stage"] == 3 else 0
        expect = deepspeed_model_state_bytes(r["n_params"], r["zero_stage"], 2, r["precision"], n_persist)
        assert r["model_state_bytes"] == pytest.approx(expect, rel=0.002), r["trial_id"]


def test_record_carries_collector_fields(zero_sweep):
    for r in zero_sweep["records"]:
        assert r["flops_per_token"] == flops_per_token(model_stats(build_config("tiny")), r["seq_len"])
        assert r["tflops_per_device"] > 0
        assert r["mfu"] is None and r["peak_tflops"] is None  # no datasheet for a CPU
        assert 0 < r["mfu_vs_measured_peak"] < 1
        assert r["measured_peak_tflops"] > 0 and r["measured_peak_probe_s"] >= 0
        assert r["step_time_ci95_s"][0] <= r["step_time_s"] <= r["step_time_ci95_s"][1]
        assert r["step_time_cv"] >= 0
        assert len(r["grad_norms"]) == r["steps"]
        if r["precision"] == "fp32" and r["zero_stage"] == 0:
            # DeepSpeed computes this norm for clipping and discards it (engine.clip_fp32_gradients)
            assert r["grad_norms"] == [None] * r["steps"] and any("gradient norm" in n for n in r["notes"])
        else:
            assert all(g > 0 for g in r["grad_norms"])
        assert r["lrs"] == [1e-3] * r["steps"] and r["loss_scales"] == [] and r["skipped_steps"] == 0
        assert r["energy_j"] is None and "NVML" in r["telemetry_per_rank"][0]["reason"]
        assert len(r["step_times_per_rank"]) == 2 and len(r["model_state_bytes_per_rank"]) == 2
        parts = r["fwd_s"] + r["bwd_s"] + r["optimizer_s"]
        assert 0.5 * r["step_time_s"] < parts < 2.0 * r["step_time_s"], r["trial_id"]
        assert r["bwd_compute_s"] <= r["bwd_s"] and r["comm_s"] >= 0
        if r["zero_stage"] >= 2:
            assert "inside bwd_compute_s" in r["breakdown_note"]
        assert r["loss_gap_to_floor"] == pytest.approx(r["final_loss"] - r["entropy_floor"])


def test_bus_bandwidth_follows_nccl_tests():
    from llmbench.collect.comms import bandwidth

    # nccl-tests PERFORMANCE.md: all-reduce busbw = S/t · 2(n-1)/n; all-gather (n-1)/n on the whole output.
    assert bandwidth("all_reduce", 8e9, 2.0, 8) == (4e9, 4e9 * 14 / 8)
    assert bandwidth("all_gather", 8e9, 2.0, 4) == (4e9, 3e9)
    assert bandwidth("reduce_scatter", 6e9, 3.0, 2) == (2e9, 1e9)
    assert bandwidth("broadcast", 1e9, 1.0, 16) == (1e9, 1e9)


def test_comms_pass_volumes_match_zero(tmp_path):
    """Gradient traffic per optimizer step, with 2 micro-steps of accumulation: the gradient,
    2Ψ bytes in 16 bits (4Ψ in fp32, where the smoke suite's `auto` runs fp32), reduced once
    at stages 0-1 and every micro-step at stages 2-3; ZeRO-1/2 all-gather the updated
    parameters once (the same bytes); ZeRO-3 gathers them for every micro-step's forward and
    reduce-scatters the gradients. `two_psi` below is that volume."""
    db = str(tmp_path / "c.db")
    llmbench("sweep", "smoke", "--comms", "--set", "grad_accum=2", "--db", db, "--out", str(tmp_path))
    recs = {r["zero_stage"]: r for r in map(json.loads, cli("results", "--db", db, "--format", "json").stdout.splitlines())}
    two_psi = {"fp32": 4, "bf16": 2}[recs[0]["precision"]] * recs[0]["n_params"]
    assert recs[0]["comms"]["all_reduce"]["bytes_per_step"] == pytest.approx(two_psi, abs=64)  # fp32: + one 4-byte scalar
    assert recs[1]["comms"]["all_reduce"]["bytes_per_step"] == pytest.approx(two_psi, abs=64)  # + norm scalars
    assert recs[2]["comms"]["all_reduce"]["bytes_per_step"] == pytest.approx(2 * two_psi, abs=64)
    for stage in (1, 2):
        assert recs[stage]["comms"]["all_gather"]["bytes_per_step"] == two_psi
    assert recs[3]["comms"]["reduce_scatter"]["bytes_per_step"] == 2 * two_psi
    assert recs[3]["comms"]["all_gather"]["bytes_per_step"] >= 2 * two_psi * 0.99
    for r in recs.values():
        for v in r["comms"].values():
            assert v["busbw_GBps"] >= 0 and v["calls_per_step"] >= 1
    # the throughput model's collectives (plan/throughput.comm_pattern) are the ones recorded:
    # the same kinds and bytes per step (ZeRO-3's gathers: the recorder counts the whole padded
    # output, so within 1%), and the same calls at stages 0-2 (ZeRO-3's coordinator coalesces
    # a later micro-step's fetches: docs/search.md)
    from llmbench.models import config_from_dict, model_stats
    from llmbench.plan.accuracy import spec_of
    from llmbench.plan.throughput import comm_pattern

    for stage, r in recs.items():
        spec = spec_of(r)
        predicted: dict[str, list[float]] = {}
        for c in comm_pattern(spec, model_stats(config_from_dict(r["model_config"])), r["ds_config"]):
            predicted.setdefault(c.kind, [0.0, 0.0])
            predicted[c.kind][0] += c.calls
            predicted[c.kind][1] += c.bytes
        assert set(predicted) == set(r["comms"]), stage
        for kind, (calls, nbytes) in predicted.items():
            if stage < 3:
                assert calls == r["comms"][kind]["calls_per_step"], (stage, kind)
            assert nbytes == pytest.approx(r["comms"][kind]["bytes_per_step"], rel=0.01, abs=64), (stage, kind)