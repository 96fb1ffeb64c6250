"""Collector figures that mean what they say (#15): datasheet peaks, the trial's own peak
memory in the gate, the ZeRO-1/2 all-gather, DeepSpeed's optimizer-step count."""

import pytest

from llmbench.collect.flops import datasheet_peak_tflops
from llmbench.gate import gate


@pytest.mark.parametrize("device, precision, quant, matmul, expected", [
    # NVIDIA H100 datasheet (2023), H100 NVL per GPU: 1,671 bf16 and 3,341 fp8 TFLOP/s with
    # 2:4 sparsity, halved for dense; TF32 835 sparse; FP32 60
    ("NVIDIA H100 NVL", "bf16", "none", "highest", 1671 / 2),
    ("NVIDIA H100 NVL", "bf16", "fp8", "highest", 3341 / 2),
    ("NVIDIA H100 NVL", "fp32", "none", "highest", 60.0),
    ("NVIDIA H100 NVL", "fp32", "none", "high", 835 / 2),
    # H100 SXM: 1,979 bf16 and 3,958 fp8 with sparsity; TF32 989 sparse; FP32 67
    ("NVIDIA H100 80GB HBM3", "bf16", "fp8", "highest", 3958 / 2),
    ("NVIDIA H100 80GB HBM3", "fp32", "none", "highest", 67.0),
    ("NVIDIA H100 80GB HBM3", "fp32", "none", "medium", 989 / 2),
    ("NVIDIA H100 PCIe", "bf16", "fp8", "highest", 3026 / 2),
    ("NVIDIA H200", "bf16", "fp8", "highest", 3958 / 2),
    ("NVIDIA A100-SXM4-80GB", "bf16", "fp8", "highest", None),  # no fp8 on Ampere
])
def test_datasheet_peaks(device, precision, quant, matmul, expected):
    got = datasheet_peak_tflops(device, precision, quant, matmul)
    assert got == (pytest.approx(expected, abs=0.5) if expected is not None else None)


def test_gate_judges_the_trial_own_peak_not_the_process_rss():
    """On CPU the peak is the process's RSS, ~450 MB of which is the process itself: a trial
    whose own peak grows 40% moves the total 3%. The gate judges the trial's own peak, with a
    margin of 10% or 32 MiB, whichever is larger (the RSS strays by an amount: docs/gates.md)."""
    def rec(own_mib, process_mib=450, cpu=True):
        mib = 2 ** 20
        r = {"trial_id": "t", "status": "ok", "model": "tiny", "zero_stage": 1, "micro_batch": 4, "error": None,
             "step_times_s": [0.1] * 12, "model_state_bytes": 1000,
             "peak_mem_bytes": (process_mib + own_mib) * mib, "peak_mem_baseline_bytes": process_mib * mib}
        if cpu:
            r["step_cpu_s"] = [0.1] * 12
        return r

    def peak(b, c):
        return {x.metric: x for x in gate([b], [c]).verdicts}["trial's peak memory"]

    v = peak(rec(200), rec(280))                       # own +40% (+80 MiB), the total +12%
    assert v.outcome == "regression" and v.change == pytest.approx(0.40) and v.margin == pytest.approx(32 / 200)
    assert peak(rec(200), rec(215)).outcome == "same"  # +7.5%, 15 MiB
    assert peak(rec(400), rec(450)).outcome == "regression"  # +12.5% (50 MiB): beyond 10% and 32 MiB
    # a small trial: 50 → 75 MiB is +50% but 25 MiB, within the RSS's stray; 50 → 90 is not
    small = peak(rec(50), rec(75))
    assert small.outcome == "same" and small.margin == pytest.approx(32 / 50)
    assert peak(rec(50), rec(90)).outcome == "regression"
    # on a GPU (no CPU-time samples) the allocator's peak is exact: 10%, no floor
    assert peak(rec(50, cpu=False), rec(60, cpu=False)).outcome == "regression"


def test_zero_1_2_all_gather_is_its_own_part_and_the_parts_add_up(zero_sweep):
    """DeepSpeed's optimizer_allgather timer, read in the breakdown pass: present at ZeRO-1/2
    only, taken out of optimizer_s, and forward + backward + optimizer + all-gather within 15%
    of the pass's own step time."""
    for r in zero_sweep["records"]:
        parts = [r["fwd_s"], r["bwd_s"], r["optimizer_s"], r["allgather_s"] or 0.0]
        assert None not in parts[:3], r["trial_id"]
        if r["zero_stage"] in (1, 2):
            assert r["allgather_s"] and r["allgather_s"] > 0, r["trial_id"]
        else:
            assert r["allgather_s"] is None, r["trial_id"]
        assert sum(parts) == pytest.approx(r["breakdown_step_s"], rel=0.15), (r["trial_id"], parts, r["breakdown_step_s"])


def test_deepspeed_counts_every_optimizer_step_run(zero_sweep):
    """DeepSpeed's own count of optimizer steps (engine.global_steps) is the warmup, the
    window and the breakdown pass: what llmbench says it ran."""
    for r in zero_sweep["records"]:
        assert r["ds_global_steps"] == r["warmup_steps"] + r["steps"] + r["breakdown_steps"], r["trial_id"]


def test_gradient_accumulation_end_to_end(tmp_path):
    """A real trial with accumulation 2: tokens per optimizer step = micro-batch × accumulation
    × ranks × sequence length (from the record's tokens/s and window), one loss per optimizer
    step, DeepSpeed's config and its own step count agree."""
    import json

    from helpers import llmbench, cli

    llmbench("run", "--zero-stage", "2", "--grad-accum", "2", "--micro-batch", "2", "--set", "steps=4",
             "--set", "warmup_steps=2", "--db", str(tmp_path / "a.db"), "--out", str(tmp_path / "out"))
    (r,) = [json.loads(x) for x in cli("results", "--db", str(tmp_path / "a.db"), "--format", "json").stdout.splitlines()]
    assert r["status"] == "ok" and r["grad_accum"] == 2
    assert r["tokens_per_s"] * r["window_s"] / r["steps"] == pytest.approx(2 * 2 * r["world_size"] * r["seq_len"])
    assert r["global_batch"] == 2 * 2 * r["world_size"] == r["ds_config"]["train_batch_size"]
    assert r["ds_config"]["gradient_accumulation_steps"] == 2
    assert len(r["losses"]) == len(r["step_times_s"]) == r["steps"]
    assert r["ds_global_steps"] == r["warmup_steps"] + r["steps"] + r["breakdown_steps"]


def test_offloaded_states_are_the_hosts_and_not_the_devices(tmp_path):
    """ZeRO-2 with and without offload=optimizer on the CPU accelerator (torch's AdamW, so no
    DeepSpeedCPUAdam build): DeepSpeed's offload settings classify the fp32 master partition
    and Adam moments as the host's, at least the ZeRO paper's 12Ψ/N_d bytes (Rajbhandari et
    al. 2020, §3: K = 12); without offload nothing is the host's. The device part is what the
    memory objective and the offload guidance use."""
    import json

    from helpers import cli, llmbench

    from llmbench.report.guidance import device_state_bytes, statements

    suite = tmp_path / "offload.yaml"
    suite.write_text("name: offload-split\nfixed: {model: tiny, seq_len: 32, micro_batch: 2, warmup_steps: 2, steps: 3, "
                     "zero_stage: 2}\ngrid: {offload: [none, optimizer]}\n")
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"zero_force_ds_cpu_optimizer": False,
                                "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}))
    llmbench("sweep", str(suite), "--base-config", str(base), "--db", str(tmp_path / "o.db"), "--out", str(tmp_path / "out"))
    recs = {r["offload"]: r for r in (json.loads(x) for x in cli(
        "results", "--db", str(tmp_path / "o.db"), "--format", "json").stdout.splitlines())}
    none, off = recs["none"], recs["optimizer"]
    assert none["status"] == off["status"] == "ok", (none["error"], off["error"])
    assert none["model_state_host_bytes"] == 0 and none["model_state_device_bytes"] == none["model_state_bytes"]
    k_bytes = 12 * off["n_params"] / off["world_size"]
    assert off["model_state_host_bytes"] >= 0.99 * k_bytes, (off["model_state_host_bytes"], k_bytes)
    assert off["model_state_device_bytes"] + off["model_state_host_bytes"] == off["model_state_bytes"]
    assert device_state_bytes(off) < device_state_bytes(none)
    text = " ".join(s["text"] for s in statements([none, off]))
    assert "on the host" in text, text
