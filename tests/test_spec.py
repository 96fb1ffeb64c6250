"""Suites and specs: expansion, overrides, and bad input as one clear error."""

import pytest

from llmbench.spec import SpecError, TrialSpec, builtin_suites, expand, load_suite

DEFAULTS = {"model": "tiny", "world_size": 2}


def test_builtin_zero_suite_expands_to_stages_and_micro_batches():
    suite, src = load_suite("zero")
    trials = expand(suite, src, DEFAULTS)
    assert {s.zero_stage for _, s, _ in trials} == {0, 1, 2, 3}
    assert len({s.micro_batch for _, s, _ in trials}) >= 2
    assert [t for t, _, _ in trials][:2] == ["z0-mb4", "z0-mb8"]
    assert all(s.world_size == 2 and s.model == "tiny" and skip is None for _, s, skip in trials)


def test_suites_ship_as_package_data():
    assert {"zero", "smoke"} <= set(builtin_suites())


def test_set_overrides_axis_and_fixed_value():
    suite, src = load_suite("zero")
    trials = expand(suite, src, DEFAULTS, ["zero_stage=1,3", "precision=fp32"])
    assert [(s.zero_stage, s.precision) for _, s, _ in trials] == [(1, "fp32"), (1, "fp32"), (3, "fp32"), (3, "fp32")]


def test_global_batch_follows_deepspeed_rule():
    s = TrialSpec(micro_batch=3, grad_accum=5, world_size=4)
    assert s.global_batch == 60


@pytest.mark.parametrize("text, match", [
    ("name: x\ngrid:\n  zero_stage: [5]\n", r"zero_stage=5"),
    ("name: x\ngrid:\n  micro_batch: [0]\n", r"micro_batch=0"),
    ("name: x\nfixed:\n  grad_accum: -2\n", r"grad_accum=-2"),
    ("name: x\nfixed:\n  bogus: 1\n", r"fixed.bogus: unknown axis"),
    ("name: x\nextra: 1\n", r"extra"),
    ("name: x\nfixed:\n  precision: fp8\n", r"precision='fp8'"),
    ("name: x\nfixed: [1, 2\n", r"malformed YAML"),
    ("name: x\ngrid:\n  zero_stage: []\n", r"empty list"),
    ("- just\n- a list\n", r"a suite is a mapping"),
    ("name: x\nfixed:\n  micro_batch: four\n", r"micro_batch='four'"),
])
def test_bad_suites_raise_one_line(tmp_path, text, match):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(SpecError, match=match) as info:
        suite, src = load_suite(str(p))
        expand(suite, src, DEFAULTS)
    assert "\n" not in str(info.value) and str(p) in str(info.value)


def test_unknown_suite_and_bad_override():
    with pytest.raises(SpecError, match="unknown suite 'nope'"):
        load_suite("nope")
    suite, src = load_suite("zero")
    with pytest.raises(SpecError, match="--set wat: unknown axis"):
        expand(suite, src, DEFAULTS, ["wat=1"])
    with pytest.raises(SpecError, match="offload=optimizer\\+params needs zero_stage 3"):
        expand(suite, src, DEFAULTS, ["offload=optimizer+params", "zero_stage=2", "micro_batch=4"])


def test_nonsense_combinations_in_a_grid_are_skipped_with_reason():
    suite, src = load_suite("zero")
    trials = expand(suite, src, DEFAULTS, ["offload=optimizer+params", "micro_batch=4"])
    skips = {s.zero_stage: skip for _, s, skip in trials}
    assert skips[3] is None
    assert "needs zero_stage 3" in skips[2] and "needs zero_stage 3" in skips[0]
    trials = expand(suite, src, DEFAULTS, ["quant=zeropp-qw", "micro_batch=4"])
    assert [skip is None for _, _, skip in trials] == [False, False, False, True]
    trials = expand(suite, src, DEFAULTS, ["precision=bf16,fp16", "loss_scale=128", "zero_stage=1", "micro_batch=4"])
    assert [(s.precision, skip is None) for _, s, skip in trials] == [("bf16", False), ("fp16", True)]


def test_global_batch_derives_accumulation_or_is_bad_input():
    suite, src = load_suite("zero")
    trials = expand(suite, src, DEFAULTS, ["global_batch=32", "zero_stage=0"])
    assert [(s.micro_batch, s.grad_accum, s.global_batch) for _, s, _ in trials] == [(4, 4, 32), (8, 2, 32)]
    with pytest.raises(SpecError, match="global_batch=20 .* not a positive multiple of micro_batch × world_size = 8"):
        expand(suite, src, DEFAULTS, ["global_batch=20", "zero_stage=0"])


LAUGHS = ("name: laughs\ngrid: {zero_stage: [0]}\na: &a [x, x, x, x, x, x, x, x, x, x]\n"
          + "".join(f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n" for p, n in zip("abcdefgh", "bcdefghi")))


@pytest.mark.parametrize("name, text, needle", [
    ("huge", "name: h\ngrid: {zero_stage: [0]}\n" + "# padding\n" * 30_000, "a suite file is at most 256 KiB"),
    ("deep", "name: d\ngrid: {zero_stage: [0]}\nfixed: {seed: " + "[" * 200 + "]" * 200 + "}\n", "nested more than 16 deep"),
    ("laughs", LAUGHS, "more than 10,000 values once its YAML aliases"),
    ("python", "name: !!python/object/apply:os.system ['touch /tmp/llmbench-pwned']\ngrid: {zero_stage: [0]}\n",
     "YAML tag 'tag:yaml.org,2002:python/object/apply:os.system'"),
    ("binary", "name: b\nfixed: {model: !!binary dGlueQ==}\ngrid: {zero_stage: [0]}\n", "YAML tag 'tag:yaml.org,2002:binary'"),
    ("custom", "name: c\nfixed: {model: !mine tiny}\ngrid: {zero_stage: [0]}\n", "YAML tag '!mine'"),
    ("binary-bytes", b"name: \xff\xfe\ngrid: {zero_stage: [0]}\n", "not UTF-8 text"),
])
def test_a_hostile_suite_file_is_refused_in_one_line(name, text, needle, tmp_path):
    """Safe loading with limits (spec.read_yaml): refused before any of it is built, one line,
    exit 2; nothing runs (the YAML's os.system never does)."""
    import os

    from helpers import cli

    path = tmp_path / f"{name}.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    p = cli("sweep", str(path), "--db", str(tmp_path / "x.db"), "--out", str(tmp_path / "out"), check=False)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and needle in lines[0] and str(path) in lines[0], p.stderr
    assert not os.path.exists("/tmp/llmbench-pwned") and not (tmp_path / "out").exists()


def test_a_tag_in_a_set_value_is_refused_and_anchors_within_limits_are_read(tmp_path):
    from helpers import cli

    p = cli("sweep", "zero", "--set", "model=!!python/name:os.system", "--dry-run", check=False)
    assert p.returncode == 2 and "YAML tag" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    path = tmp_path / "alias.yaml"
    path.write_text("name: alias\nfixed: &f {model: tiny, seq_len: 32}\nalso:\n  - fixed: *f\n    grid: {micro_batch: [2]}\n"
                    "grid: {zero_stage: [0, 1]}\n")
    suite, _ = load_suite(str(path))
    assert suite.fixed == suite.also[0].fixed == {"model": "tiny", "seq_len": 32}
