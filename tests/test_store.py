"""The SQLite store: one transaction per trial, runs found by prefix, nothing lost on reopen."""

import sqlite3

import pytest

from llmbench.store import Store


def rec(run_id, trial_id, status="ok"):
    return {"run_id": run_id, "trial_id": trial_id, "status": status, "error": None if status == "ok" else "boom",
            "step_times_s": [0.1, 0.2], "losses": [3.0, 2.5]}


def test_roundtrip_and_reopen(tmp_path):
    db = tmp_path / "s.db"
    s = Store(db)
    s.create_run("20260101-000000-abcd", "zero", "lbl", {"torch": "x"})
    s.add_trial(rec("20260101-000000-abcd", "z0"), 0)
    s.add_trial(rec("20260101-000000-abcd", "z1", "failed"), 1)
    s.close()
    s = Store(db)  # a new process would see the same
    run = s.run("20260101")
    assert run["run_id"] == "20260101-000000-abcd" and run["n_trials"] == 2 and run["status"] == "running"
    assert [t["trial_id"] for t in s.trials(run["run_id"])] == ["z0", "z1"]
    assert s.steps(run["run_id"])[0] == ("z0", 0, 0.1, 3.0)


def test_trial_is_stored_once(tmp_path):
    s = Store(tmp_path / "s.db")
    s.create_run("r", None, None, {})
    s.add_trial(rec("r", "a"), 0)
    with pytest.raises(sqlite3.IntegrityError):
        s.add_trial(rec("r", "a"), 1)
    assert len(s.trials("r")) == 1 and len(s.steps("r")) == 2  # the failed insert left no steps behind
