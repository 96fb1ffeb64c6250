"""A trial's identity is its whole configuration (identity.py): the hash, what gate, compare
and --resume do with it."""

import copy
import json

import pytest

from helpers import llmbench, cli
from llmbench.identity import NOT_IDENTITY, config_hash, differences, settings_fields
from llmbench.spec import TrialSpec


def flipped(v):
    """Another value of the same kind (an independent change, whatever the field means)."""
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return v + 1
    if isinstance(v, float):
        return v * 2 + 1
    if isinstance(v, str):
        return v + "-other"
    if isinstance(v, list):
        return v + [v[-1] if v else 1]
    if v is None:
        return 7
    raise TypeError(type(v))


@pytest.fixture(scope="module")
def record(fp32_sweep):
    return next(r for r in fp32_sweep if r["zero_stage"] == 3)


def test_every_setting_that_can_change_a_figure_changes_the_hash(record):
    h = config_hash(record)
    assert record["config_hash"] == h  # the stored hash is the hash of the stored fields
    from llmbench.identity import INFERENCE_ONLY

    assert set(settings_fields()) | NOT_IDENTITY | INFERENCE_ONLY == set(TrialSpec.model_fields)
    for k in settings_fields():
        changed = dict(record, **{k: flipped(record[k])})
        assert config_hash(changed) != h, k
        assert any(d.startswith(f"{k}: ") for d in differences(record, changed)), k
    for k in NOT_IDENTITY | INFERENCE_ONLY:  # the extra passes' toggles, the time limit, what was asked; decode settings
        assert k in record
        assert config_hash(dict(record, **{k: flipped(record[k])})) == h, k
    for path, key in ((("ds_config", "zero_optimization", "stage3_param_persistence_threshold"), None),
                      (("ds_config", "gradient_clipping"), None),
                      (("model_config", "rms_norm_eps"), "model.rms_norm_eps"),
                      (("model_config", "hidden_act"), "model.hidden_act")):
        changed = copy.deepcopy(record)
        d = changed
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = flipped(d[path[-1]])
        assert config_hash(changed) != h, path
        d = differences(record, changed)
        assert len(d) == 1 and d[0].startswith(f"{key or '.'.join(path)}: "), d  # the one key, named
    for k in ("run_id", "label", "trial_id", "env", "hosts", "status", "step_times_s"):  # not settings
        assert config_hash(dict(record, **{k: "x"})) == h, k
    logged = copy.deepcopy(record)  # a base config's logging section names a path: not the identity
    logged["ds_config"]["tensorboard"] = {"enabled": True, "output_path": "/tmp/tb", "job_name": "x"}
    assert config_hash(logged) == h


def test_a_transformers_upgrade_does_not_change_the_identity(record):
    """The same model as transformers 4.x describes it (rope_theta instead of rope_parameters,
    torch_dtype instead of dtype, other bookkeeping keys) hashes the same: the version sits
    beside the identity, not in it."""
    old = copy.deepcopy(record)
    mc = old["model_config"]
    mc["rope_theta"] = mc.pop("rope_parameters")["rope_theta"]
    mc["torch_dtype"] = mc.pop("dtype", None)
    mc.update(transformers_version="4.45.0", torchscript=False, use_return_dict=True, _name_or_path="/somewhere")
    assert config_hash(old) == config_hash(record)
    assert differences(record, old) == []


def test_records_without_their_configs_match_on_what_they_carry(record):
    """A version-2 record of a trial that never reached the ranks, or a CSV export (no nested
    columns), has no hash: it is the same trial as any record whose settings it shares."""
    from llmbench.identity import same

    lossy = {k: v for k, v in record.items() if k not in ("ds_config", "model_config", "decode_batches", "config_hash")}
    assert config_hash(lossy) is None and same(record, lossy) and differences(record, lossy) == []
    assert not same(record, dict(lossy, zero_stage=0)) and differences(record, dict(lossy, zero_stage=0)) == ["zero_stage: 3 → 0"]
    assert differences(record, dict(record, decode_batches=tuple(record["decode_batches"]))) == []  # a tuple is its list


def test_the_ranks_ran_the_planned_configuration(fp32_sweep, gate_records):
    """The identity is computed before launch from the configs the plan makes; the ranks'
    own configs agree (otherwise the record would say so)."""
    for r in fp32_sweep + gate_records[0] + gate_records[1]:
        assert not any("another configuration" in n for n in r["notes"]), (r["trial_id"], r["notes"])
        assert r["config_hash"] == config_hash(r)


def record_at(r, path):
    for k in path:
        r = r[k]
    return r


def test_two_identical_sweeps_hash_equal_trial_for_trial(gate_records):
    a, b = gate_records
    assert [r["trial_id"] for r in a] == [r["trial_id"] for r in b]
    assert [r["config_hash"] for r in a] == [r["config_hash"] for r in b]
    assert len({r["config_hash"] for r in a}) == len(a)  # and distinct configurations hash apart


@pytest.fixture(scope="module")
def gate_records(gate_db):
    db, a, b, _ = gate_db
    read = lambda run: [json.loads(x) for x in cli("results", run, "--db", str(db), "--format", "json").stdout.splitlines()]  # noqa: E731
    return read(a), read(b)


def test_gate_does_not_compare_sdpa_with_eager_and_refuses_runs_that_do_not_match(gate_db, gate_records, tmp_path):
    db, a, _, _ = gate_db
    base, _ = gate_records

    def export(records, name):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return str(path)

    def eager(r):  # the same trial id, another attention implementation (its hash re-derived from the fields)
        r = dict(r, attn_implementation="eager")
        r.pop("config_hash")
        return r

    one = export([eager(r) if i == 0 else r for i, r in enumerate(base)], "one.jsonl")
    js = tmp_path / "one.json"
    p = cli("gate", a, one, "--db", str(db), "--json", str(js), check=False)
    assert p.returncode == 0 and "not compared" in p.stdout, p.stdout + p.stderr
    first = [v for v in json.loads(js.read_text())["verdicts"] if v["trial_id"] == base[0]["trial_id"]]
    assert [(v["metric"], v["outcome"]) for v in first] == [("configuration", "not compared")]
    assert first[0]["why"] == "different configuration: attn_implementation: sdpa → eager"
    everything = export([eager(r) for r in base], "all.jsonl")
    refused = tmp_path / "refused.json"
    p = cli("gate", a, everything, "--db", str(db), "--json", str(refused), check=False)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert json.loads(refused.read_text())["comparable"] is False  # CI's file says why there is no decision
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert "0 of 8 baseline trials" in lines[0] and "attn_implementation: sdpa → eager" in lines[0], lines[0]
    p = cli("compare", a, everything, "--db", str(db), "--out", str(tmp_path), check=False)
    assert p.returncode == 2 and "not comparable" in p.stderr


def test_gate_pairs_a_renamed_trial_by_its_identity():
    from llmbench.gate import gate

    r = {"trial_id": "z1", "status": "ok", "model_state_bytes": 1000, "step_times_s": [0.1] * 8, "zero_stage": 1}
    renamed = dict(r, trial_id="zero1")
    out = gate([r], [renamed]).verdicts
    assert [v.metric for v in out] == ["step time", "model-state bytes"] and all(v.outcome == "same" for v in out)


def test_an_inference_trial_is_identified_by_what_it_reads(record):
    """An inference trial runs no DeepSpeed: ZeRO's settings do not change its identity, its
    decode settings do; a training trial's is the other way round."""
    inf = dict(record, scenario="inference", ds_config=None)
    h = config_hash(inf)
    assert h is not None
    for k in ("zero_stage", "grad_accum", "steps", "lr", "overlap_comm"):
        assert config_hash(dict(inf, **{k: flipped(record[k])})) == h, k
    for k in ("repeats", "new_tokens", "quant", "micro_batch"):
        assert config_hash(dict(inf, **{k: flipped(record[k])})) != h, k
