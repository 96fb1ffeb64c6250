"""The learning-rate schedule axis: DeepSpeed's own schedulers, run for real on 2 gloo ranks,
checked against the schedule's formula written out here, and the report's section checked
against the statistics recomputed from the records."""

import json
import math
import re
import statistics
from pathlib import Path

import pytest

from helpers import cli, llmbench
from llmbench.engine import axes_from_base_config, ds_config
from llmbench.identity import config_hash, differences
from llmbench.schema import SCHEMA_VERSION, migrate
from llmbench.spec import SpecError, TrialSpec, expand, load_suite

SCHEDULES = ("constant", "WarmupDecayLR", "WarmupCosineLR")


@pytest.fixture(scope="module")
def schedule_sweep(tmp_path_factory):
    """`llmbench sweep schedule` made small: fp32 at tiny shapes, 3 schedules x 3 seeds, 12 steps."""
    root = tmp_path_factory.mktemp("schedule")
    db = root / "s.db"
    llmbench("sweep", "schedule", "--set", "precision=fp32", "--set", "seq_len=32", "--set", "micro_batch=2",
             "--set", "steps=10", "--set", f"lr_schedule={','.join(SCHEDULES)}", "--db", str(db), "--out", str(root))
    records = [json.loads(x) for x in cli("results", "--db", str(db), "--format", "json").stdout.splitlines()]
    return {"records": {r["trial_id"]: r for r in records}, "html": next(root.glob("report-*.html")).read_text()}


def expected_lr(kind: str, step: int, peak: float, warm: int, total: int) -> float:
    """The lr optimizer step `step` (1 = the first) applies, written from DeepSpeed's docs:
    the scheduler starts at iteration -1 (its minimum, 0 here) and steps after each optimizer
    step, so step j applies iteration j-2's value; log warm-up to iteration W = max(2, warm):
    peak·ln(i+1)/ln(W); then WarmupDecayLR falls linearly to 0 at `total`, WarmupCosineLR
    follows half a cosine to cos_min_ratio (1e-4) of the peak."""
    if kind == "constant":
        return peak
    i, w = step - 2, max(2, warm)
    if i < 0:
        return 0.0
    if i < w:
        return peak * math.log(i + 1) / math.log(w)
    if kind == "WarmupDecayLR":
        return peak * max(0.0, (total - i) / max(1, total - w))
    progress = min(1.0, (i - w + 1) / max(1, total - w))
    return peak * (1e-4 + (1 - 1e-4) * (1 + math.cos(math.pi * progress)) / 2)


def test_each_step_applied_deepspeeds_schedule(schedule_sweep):
    for tid, r in schedule_sweep["records"].items():
        assert r["status"] == "ok", (tid, r["error"])
        lrs = r["warmup_lrs"] + r["lrs"]
        total = r["warmup_steps"] + r["steps"]
        assert len(lrs) == total == len(r["warmup_losses"]) + len(r["losses"])
        want = [expected_lr(r["lr_schedule"], j, 3e-3, round(0.1 * total), total) for j in range(1, total + 1)]
        assert lrs == pytest.approx(want, rel=1e-6, abs=1e-12), tid
        assert (r["ds_config"].get("scheduler") or {}).get("type") == (None if r["lr_schedule"] == "constant" else r["lr_schedule"])


def test_the_schedule_is_part_of_the_trials_identity(schedule_sweep):
    recs = schedule_sweep["records"]
    a, b = recs["constant-seed=0"], recs["WarmupCosineLR-seed=0"]
    assert a["config_hash"] != b["config_hash"]
    assert "lr_schedule: constant → WarmupCosineLR" in differences(a, b)
    assert any(d.startswith("ds_config.scheduler.type") for d in differences(a, b))


def test_a_record_from_before_the_schedule_keeps_its_hash():
    """A schema-7 record, hashed by the llmbench of that time (commit a9fa618), hashes the same now:
    a constant schedule and no pruning leave the identity as it was."""
    old = json.loads((Path(__file__).parent / "data" / "record-v7.json").read_text())
    assert old["schema_version"] == 7
    new = migrate(old)
    assert new["lr_schedule"] == "constant" and new["prune"] == "none" and new["schema_version"] == SCHEMA_VERSION
    assert new["trial_allocated_peak_bytes"] is None  # schema 9's allocator peak: not measured then
    assert config_hash(new) == old["config_hash"] == "5c9ad795bdb25961"


def test_report_section_restates_the_records(schedule_sweep):
    recs, html = schedule_sweep["records"], schedule_sweep["html"]
    assert 'id="schedule"' in html and 'alt="Learning-rate schedules: loss per step"' in html
    text = re.sub(r"<[^>]+>", "", html)
    for kind in SCHEDULES[1:]:
        # the paired difference and its interval, recomputed from the records with scipy's t directly
        from scipy import stats

        d = []
        for seed in (0, 1, 2):
            gap = lambda r: statistics.fmean(r["losses"][-5:]) - r["entropy_floor"]  # noqa: E731
            d.append(gap(recs[f"{kind}-seed={seed}"]) - gap(recs[f"constant-seed={seed}"]))
        m, half = statistics.fmean(d), stats.t.ppf(0.975, 2) * statistics.stdev(d) / math.sqrt(3)
        line = next(x for x in text.splitlines() if x.startswith(f"{kind}: loss"))
        assert f"paired difference {m:+.3f} nats (95% interval {m - half:+.3f} to {m + half:+.3f}, 3 seeds)" in line
        verdict = "no difference from constant" if m - half <= 0 <= m + half else ("lower" if m < 0 else "higher")
        assert verdict in line
        for seed in (0, 1, 2):
            assert f"{kind}-seed={seed}" in line
    assert "Throughput against constant, tokens/s paired by seed" in text
    assert "(1,536 tokens: 12 optimizer steps" in text  # 12 steps × 2 ranks × micro-batch 2 × 32 tokens


def test_schedule_suite_is_four_schedules_by_three_seeds():
    suite, src = load_suite("schedule")
    trials = expand(suite, src, {"model": "tiny", "world_size": 2})
    assert len(trials) == 12 and all(skip is None for _, _, skip in trials)
    assert {s.lr_schedule for _, s, _ in trials} == {"constant", "WarmupLR", "WarmupDecayLR", "WarmupCosineLR"}
    assert {s.seed for _, s, _ in trials} == {0, 1, 2}
    assert len({s.warmup_steps + s.steps for _, s, _ in trials}) == 1  # one token budget


@pytest.mark.parametrize("kind", ["WarmupLR", "WarmupDecayLR", "WarmupCosineLR"])
def test_the_scheduler_section_is_what_deepspeed_reads(kind):
    spec = TrialSpec(precision="fp32", lr_schedule=kind, steps=30, warmup_steps=2, lr_warmup_steps=5,
                     lr_min_ratio=0.1 if kind == "WarmupCosineLR" else None, lr_warmup_type="linear")
    cfg = ds_config(spec, "cpu", 64)
    from deepspeed.runtime.config import get_scheduler_name, get_scheduler_params  # what DeepSpeedConfig reads

    assert get_scheduler_name(cfg) == kind
    params = get_scheduler_params(cfg)
    assert params["warmup_num_steps"] == 5 and params["warmup_type"] == "linear"
    if kind != "WarmupLR":
        assert params["total_num_steps"] == 32
    if kind == "WarmupCosineLR":
        assert params["cos_min_ratio"] == 0.1
    else:
        assert params["warmup_max_lr"] == spec.lr and params["warmup_min_lr"] == 0.0
    # a base config's schedule becomes the axis, its "auto" values left to llmbench
    base = {"scheduler": {"type": kind, "params": {"warmup_num_steps": 7, "total_num_steps": "auto"}}}
    assert axes_from_base_config(base) == {"lr_schedule": kind, "lr_warmup_steps": 7}


def test_a_knob_at_its_default_is_the_same_trial(schedule_sweep):
    """The knobs are resolved into the scheduler section, which the identity holds: naming
    DeepSpeed's default (warmup_type log) changes nothing, naming another value does."""
    r = schedule_sweep["records"]["WarmupCosineLR-seed=0"]
    params = r["ds_config"]["scheduler"]["params"]
    assert params["warmup_type"] == "log" and params["cos_min_ratio"] == 1e-4
    assert config_hash(dict(r, lr_warmup_type="log")) == r["config_hash"]
    linear = ds_config(TrialSpec(precision="fp32", lr_schedule="WarmupCosineLR", lr_warmup_type="linear",
                                 steps=10, warmup_steps=2, seq_len=32, micro_batch=2, lr=3e-3), "cpu", 64)
    assert config_hash(dict(r, lr_warmup_type="linear", ds_config=linear)) != r["config_hash"]


def test_a_base_config_schedule_applies_only_where_it_runs():
    base = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 5, "total_num_steps": 50,
                                                              "warmup_min_lr": 1e-5, "warmup_max_lr": 3e-4}}}
    defaults = {"model": "tiny", "world_size": 2, **axes_from_base_config(base)}
    assert defaults["lr_schedule"] == "WarmupDecayLR" and defaults["lr_total_steps"] == 50
    assert defaults["lr"] == 3e-4  # WarmupDecayLR runs its warmup_max_lr, not the optimizer's 1e-3: that is the lr axis
    trials = {t: (s, skip) for t, s, skip in expand(*load_suite("schedule"), defaults)}
    assert all(skip is None for _, skip in trials.values())  # constant and WarmupLR trials are not refused
    assert trials["constant-seed=0"][0].lr_total_steps is None
    assert trials["WarmupDecayLR-seed=0"][0].lr_total_steps == 50 and trials["WarmupDecayLR-seed=0"][0].lr_warmup_steps == 5
    assert trials["WarmupCosineLR-seed=0"][0].lr_total_steps is None  # the base's knobs are WarmupDecayLR's
    quant = expand(*load_suite("quant"), defaults)
    assert all(skip is None for _, _, skip in quant)  # inference trials do not inherit a training schedule
    decay = ds_config(trials["WarmupDecayLR-seed=0"][0].model_copy(update={"precision": "fp32"}), "cpu", 64, base)
    # the suite's lr (3e-3) overrides the base's peak, in the scheduler and the optimizer alike; the base's floor is kept
    assert decay["scheduler"]["params"] == {"warmup_num_steps": 5, "warmup_type": "log", "warmup_min_lr": 1e-5,
                                            "warmup_max_lr": 3e-3, "total_num_steps": 50}
    assert decay["optimizer"]["params"]["lr"] == 3e-3
    const = ds_config(trials["constant-seed=0"][0].model_copy(update={"precision": "fp32"}), "cpu", 64, base)
    assert "scheduler" not in const


def test_search_refuses_a_schedule(tmp_path):
    p = cli("sweep", "schedule", "--search", "--db", str(tmp_path / "x.db"), "--out", str(tmp_path), check=False)
    assert p.returncode == 2 and "--search: it shortens each trial's window" in p.stderr, p.stderr


@pytest.mark.parametrize("args, match", [
    (["--set", "lr_schedule=WarmupLR", "--set", "lr_warmup_steps=1"], "lr_warmup_steps=1"),
    (["--set", "lr_schedule=WarmupDecayLR", "--set", "lr_total_steps=2"], "a warm-up of 2 steps (the default, at least 2) leaves no decay"),
    (["--set", "lr_warmup_steps=3"], "lr_warmup_steps shapes a learning-rate schedule; lr_schedule=constant has none"),
    (["--set", "lr_schedule=WarmupDecayLR", "--set", "lr_min_ratio=0.1"], "lr_min_ratio is WarmupCosineLR's cos_min_ratio"),
    (["--set", "lr_schedule=WarmupCosineLR", "--set", "lr_warmup_steps=40", "--set", "lr_total_steps=40"], "leaves no decay"),
    (["--set", "lr_schedule=OneCycle"], "lr_schedule='OneCycle'"),
])
def test_a_schedule_that_makes_no_sense_is_refused_before_launch(args, match, tmp_path):
    p = cli("sweep", "smoke", "--set", "zero_stage=0", *args, "--db", str(tmp_path / "x.db"), "--out", str(tmp_path), check=False)
    assert p.returncode == 2 and match in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "x.db").exists()


def test_a_base_config_scheduler_llmbench_does_not_sweep_is_refused(tmp_path):
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"scheduler": {"type": "OneCycle", "params": {"cycle_min_lr": 1e-4}}}))
    with pytest.raises(SpecError, match="scheduler type 'OneCycle' is not a schedule llmbench sweeps"):
        axes_from_base_config(json.loads(cfg.read_text()))
    p = cli("sweep", "smoke", "--base-config", str(cfg), "--db", str(tmp_path / "x.db"), check=False)
    assert p.returncode == 2 and "OneCycle" in p.stderr


def _rec(kind, seed, gap, tps=1000.0):
    """A finished trial whose last 5 losses sit `gap` above its seed's floor (floor 1 + seed/10)."""
    floor = 1 + seed / 10
    return {"trial_id": f"{kind}-seed={seed}", "status": "ok", "lr_schedule": kind, "seed": seed, "entropy_floor": floor,
            "losses": [floor + 3] * 10 + [floor + gap] * 5, "warmup_losses": [], "tokens_per_s": tps,
            "model": "tiny", "precision": "fp32", "zero_stage": 0, "micro_batch": 2, "grad_accum": 1, "world_size": 2,
            "seq_len": 32, "lr": 3e-3, "warmup_steps": 2, "steps": 15, "ds_config": {"scheduler": {"type": kind}}}


def test_statements_name_the_winner_and_its_ties_from_paired_seeds():
    from llmbench.report.schedule import statements

    records = [_rec("constant", s, g) for s, g in enumerate([0.50, 0.40, 0.45])]
    records += [_rec("WarmupDecayLR", s, g) for s, g in enumerate([0.30, 0.21, 0.25])]  # −0.20, −0.19, −0.20
    records += [_rec("WarmupCosineLR", s, g) for s, g in enumerate([0.31, 0.20, 0.26])]  # −0.19, −0.20, −0.19
    records += [_rec("WarmupLR", s, g) for s, g in enumerate([0.60, 0.30, 0.50])]        # +0.10, −0.10, +0.05
    head, *rest = [s["text"] for s in statements(records)]
    assert "WarmupDecayLR reaches the lowest loss, 0.253 nats above the floor against constant's 0.450" in head
    assert "tied with WarmupCosineLR (0.257;" in head and '"scheduler": {"type": "WarmupDecayLR"}' in head
    wlr = next(t for t in rest if t.startswith("WarmupLR"))
    assert "paired difference +0.017 nats" in wlr and "no difference from constant beyond the seed noise" in wlr
    # one seed: no interval, and no claim
    single = [r for r in records if r["seed"] == 0]
    head1, *rest1 = [s["text"] for s in statements(single)]
    assert "no schedule reaches a lower loss than constant beyond the seed noise" in head1
    assert all("one seed: no interval" in t for t in rest1 if t.startswith("Warmup"))
    assert "one seed: no interval, so no statement on throughput" in rest1[-1]
