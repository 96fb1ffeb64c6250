"""One record schema: every record field defined once (llmbench.schema.TrialRecord), checked
before storing, printed by `results --schema`, the docs generated from it, old stores migrated."""

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from pydantic import ValidationError

from helpers import llmbench, cli
from llmbench.schema import SCHEMA_VERSION, SETTINGS, fields, markdown, migrate, validate
from llmbench.spec import TrialSpec

DATA = Path(__file__).with_name("data")
DOCS = Path(__file__).resolve().parents[1] / "docs" / "record.md"


def test_every_field_is_defined_once_with_a_definition():
    names = [f["name"] for f in fields()]
    assert len(names) == len(set(names))
    assert set(TrialSpec.model_fields) <= set(SETTINGS) and set(SETTINGS) <= set(TrialSpec.model_fields)
    assert all(f["definition"] for f in fields()), [f["name"] for f in fields() if not f["definition"]]
    assert {f["part"] for f in fields()} == {"identity", "outcome", "settings", "model", "measurements", "provenance"}


def test_docs_are_generated_from_the_schema():
    assert DOCS.read_text() == markdown(), "docs/record.md drifted: run `llmbench results --schema --format markdown --output docs/record.md`"
    assert cli("results", "--schema", "--format", "markdown").stdout == markdown()
    printed = json.loads(cli("results", "--schema", "--format", "json").stdout)
    assert printed["schema_version"] == SCHEMA_VERSION and printed["fields"] == fields()


def test_sweep_records_carry_exactly_the_schema(zero_sweep):
    names = {f["name"] for f in fields()}
    for r in zero_sweep["records"]:
        assert set(r) == names, (set(r) ^ names)
        assert r["schema_version"] == SCHEMA_VERSION
        validate(r)


def test_a_key_the_schema_lacks_is_refused_and_not_stored(zero_sweep, tmp_path):
    from llmbench.store import Store

    rec = dict(zero_sweep["records"][0], tokens_per_sec=1.0)  # a typo of tokens_per_s
    store = Store(tmp_path / "s.db")
    with pytest.raises(ValidationError, match="tokens_per_sec"):
        store.add_trial(rec, 0)
    with pytest.raises(ValidationError, match="zero_stage"):
        validate(dict(zero_sweep["records"][0], zero_stage="three"))
    assert sqlite3.connect(tmp_path / "s.db").execute("SELECT COUNT(*) FROM trials").fetchone() == (0,)


def test_a_store_and_an_export_of_the_previous_version_still_load(tmp_path):
    """tests/data/store-v1.db and export-v1.jsonl were written by llmbench at commit 4cad656
    (before the schema): a 2-trial fp32 sweep. They read as the current version, and every command works."""
    db = tmp_path / "v1.db"
    shutil.copy(DATA / "store-v1.db", db)
    raw = [json.loads(x) for x in (DATA / "export-v1.jsonl").read_text().splitlines()]
    assert all("schema_version" not in r and "requested_precision" not in r for r in raw)
    recs = [json.loads(x) for x in cli("results", "--db", str(db), "--format", "json").stdout.splitlines()]
    assert [r["trial_id"] for r in recs] == ["z0", "z3"]
    for old, new in zip(raw, recs):
        assert new["schema_version"] == SCHEMA_VERSION and new["requested_precision"] == old["precision"] == "fp32"
        assert {k: new[k] for k in old} == old  # nothing measured changed
        validate(new)
    assert migrate(recs[0]) is recs[0]  # already current
    cli("report", "--db", str(db), "--out", str(tmp_path))
    p = cli("gate", str(DATA / "export-v1.jsonl"), recs[0]["run_id"], "--db", str(db))
    assert "PASS" in p.stdout


def test_a_store_and_an_export_of_version_2_load_with_their_identity(tmp_path):
    """tests/data/store-v2.db and export-v2.jsonl were written by llmbench at commit 3683271
    (schema version 2, no config_hash): `llmbench sweep smoke --set precision=fp32 --set
    zero_stage=0,3 --set steps=3`. They read as the current version with the identity
    computed from their own fields, the same from the store as from the export."""
    from llmbench.identity import config_hash

    db = tmp_path / "v2.db"
    shutil.copy(DATA / "store-v2.db", db)
    raw = [json.loads(x) for x in (DATA / "export-v2.jsonl").read_text().splitlines()]
    assert all(r["schema_version"] == 2 and "config_hash" not in r for r in raw)
    recs = [json.loads(x) for x in cli("results", "--db", str(db), "--format", "json").stdout.splitlines()]
    for old, new in zip(raw, recs):
        assert new["schema_version"] == SCHEMA_VERSION and new["config_hash"] == config_hash(old)
        assert {k: new[k] for k in old if k != "schema_version"} == {k: v for k, v in old.items() if k != "schema_version"}
        validate(new)
    assert len({r["config_hash"] for r in recs}) == 2
    # the real case: today's llmbench runs the same sweep into that store; the old run and the
    # new one are the same trials (identity computed from the old fields = the new plan's)
    llmbench("sweep", "smoke", "--set", "precision=fp32", "--set", "zero_stage=0,3", "--set", "steps=3",
             "--db", str(db), "--out", str(tmp_path))
    fresh = [r for r in (json.loads(x) for x in cli("results", "--db", str(db), "--format", "json").stdout.splitlines())
             if r["run_id"] != recs[0]["run_id"]]
    assert sorted(r["config_hash"] for r in fresh) == sorted(r["config_hash"] for r in recs)
    verdicts = tmp_path / "v.json"
    cli("gate", str(DATA / "export-v2.jsonl"), fresh[0]["run_id"], "--db", str(db), "--json", str(verdicts),
             check=False)  # timing noise between the runs may or may not count: matching is what is tested
    v = json.loads(verdicts.read_text())
    assert v["comparable"] and not [x for x in v["verdicts"] if x["metric"] in ("configuration", "status")], v


def test_a_record_that_does_not_fit_is_stored_as_failed_and_the_sweep_goes_on(zero_sweep, tmp_path):
    """An llmbench bug that adds a key the schema lacks costs that trial, not the sweep: the
    trial is stored `failed` with the reason (sweep._store_trial)."""
    from llmbench.schema import TrialRecord
    from llmbench.store import Store
    from llmbench.sweep import _store_trial

    good = zero_sweep["records"][0]
    fallback = TrialRecord(run_id=good["run_id"], trial_id=good["trial_id"]).model_dump(by_alias=True)
    store = Store(tmp_path / "s.db")
    store.create_run(good["run_id"], "zero", None, {})
    stored = _store_trial(store, dict(good, tokens_per_sec=1.0), 0, lambda: fallback)
    assert stored["status"] == "failed" and "tokens_per_sec" in stored["error"] and "schema" in stored["error"]
    (row,) = store.db.execute("SELECT status FROM trials").fetchall()
    assert row == ("failed",)
