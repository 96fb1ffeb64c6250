"""The store: SQLite with runs, trials and per-step records.

Each finished trial is committed in its own transaction, so an interrupted sweep keeps
everything it measured. WAL mode lets a report read while a sweep writes.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from .schema import migrate, validate

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id      TEXT PRIMARY KEY,
    created_at  REAL NOT NULL,
    finished_at REAL,
    suite       TEXT,
    label       TEXT,
    status      TEXT NOT NULL,           -- running, finished, interrupted, failed
    env_json    TEXT NOT NULL,
    meta_json   TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS trials (
    run_id      TEXT NOT NULL REFERENCES runs(run_id),
    trial_id    TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    status      TEXT NOT NULL,
    error       TEXT,
    finished_at REAL NOT NULL,
    record_json TEXT NOT NULL,
    PRIMARY KEY (run_id, trial_id)
);
CREATE TABLE IF NOT EXISTS steps (
    run_id      TEXT NOT NULL,
    trial_id    TEXT NOT NULL,
    step        INTEGER NOT NULL,
    step_time_s REAL,
    loss        REAL,
    PRIMARY KEY (run_id, trial_id, step),
    FOREIGN KEY (run_id, trial_id) REFERENCES trials(run_id, trial_id)
);
CREATE TABLE IF NOT EXISTS kernels (
    run_id      TEXT NOT NULL REFERENCES runs(run_id),
    seq         INTEGER NOT NULL,
    bench       TEXT NOT NULL,           -- gemm, attention, norm, mlp, optimizer, collective
    case_id     TEXT NOT NULL,
    status      TEXT NOT NULL,           -- ok, unsupported, failed
    record_json TEXT NOT NULL,
    PRIMARY KEY (run_id, case_id)
);
"""


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # -- runs ------------------------------------------------------------------------------
    def create_run(self, run_id: str, suite: str | None, label: str | None, env: dict, meta: dict | None = None) -> None:
        self.db.execute("INSERT INTO runs (run_id, created_at, suite, label, status, env_json, meta_json) VALUES (?,?,?,?,?,?,?)",
                        (run_id, time.time(), suite, label, "running", json.dumps(env), json.dumps(meta or {})))

    def finish_run(self, run_id: str, status: str, meta: dict | None = None) -> None:
        if meta is None:
            self.db.execute("UPDATE runs SET status=?, finished_at=? WHERE run_id=?", (status, time.time(), run_id))
        else:
            self.db.execute("UPDATE runs SET status=?, finished_at=?, meta_json=? WHERE run_id=?",
                            (status, time.time(), json.dumps(meta), run_id))

    def set_meta(self, run_id: str, meta: dict) -> None:
        """Replace a run's meta (what `llmbench project` adds), leaving its status as it is."""
        self.db.execute("UPDATE runs SET meta_json=? WHERE run_id=?", (json.dumps(meta), run_id))

    def runs(self) -> list[dict]:
        cur = self.db.execute("SELECT run_id, created_at, finished_at, suite, label, status, env_json, meta_json,"
                              " (SELECT COUNT(*) FROM trials t WHERE t.run_id = r.run_id) FROM runs r ORDER BY created_at")
        return [dict(run_id=r[0], created_at=r[1], finished_at=r[2], suite=r[3], label=r[4], status=r[5],
                     env=json.loads(r[6]), meta=json.loads(r[7]), n_trials=r[8]) for r in cur]

    def run(self, run_id: str | None = None) -> dict | None:
        """One run by id (a unique prefix works), or the latest run."""
        runs = self.runs()
        if run_id is None:
            return runs[-1] if runs else None
        exact = [r for r in runs if r["run_id"] == run_id]
        if exact:
            return exact[0]
        matches = [r for r in runs if r["run_id"].startswith(run_id)]
        return matches[0] if len(matches) == 1 else None

    # -- trials ----------------------------------------------------------------------------
    def add_trial(self, record: dict, seq: int, replace: bool = False) -> None:
        """Store one finished trial and its steps in one transaction (`replace`: in place of
        the trial's record so far, a trial's next round). The record is checked against the
        schema first (llmbench.schema): a key it lacks is refused, never stored."""
        validate(record)
        with self.db:  # BEGIN ... COMMIT
            self.db.execute("BEGIN")
            if replace:
                self.db.execute("DELETE FROM steps WHERE run_id=? AND trial_id=?", (record["run_id"], record["trial_id"]))
                self.db.execute("DELETE FROM trials WHERE run_id=? AND trial_id=?", (record["run_id"], record["trial_id"]))
            self.db.execute("INSERT INTO trials (run_id, trial_id, seq, status, error, finished_at, record_json) VALUES (?,?,?,?,?,?,?)",
                            (record["run_id"], record["trial_id"], seq, record["status"], record["error"], time.time(),
                             json.dumps(record)))
            times = record.get("step_times_s") or []
            losses = record.get("losses") or []
            rows = [(record["run_id"], record["trial_id"], i, times[i] if i < len(times) else None,
                     losses[i] if i < len(losses) else None) for i in range(max(len(times), len(losses)))]
            self.db.executemany("INSERT INTO steps VALUES (?,?,?,?,?)", rows)

    def delete_trial(self, run_id: str, trial_id: str) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("DELETE FROM steps WHERE run_id=? AND trial_id=?", (run_id, trial_id))
            self.db.execute("DELETE FROM trials WHERE run_id=? AND trial_id=?", (run_id, trial_id))

    def set_run_status(self, run_id: str, status: str) -> None:
        self.db.execute("UPDATE runs SET status=? WHERE run_id=?", (status, run_id))

    def next_seq(self, run_id: str) -> int:
        (n,) = self.db.execute("SELECT COALESCE(MAX(seq) + 1, 0) FROM trials WHERE run_id=?", (run_id,)).fetchone()
        return n

    def trials(self, run_id: str) -> list[dict]:
        """The run's records, in the current schema version (older ones migrated as read)."""
        cur = self.db.execute("SELECT record_json FROM trials WHERE run_id=? ORDER BY seq", (run_id,))
        return [migrate(json.loads(r[0])) for r in cur]

    # -- kernel micro-benchmarks -----------------------------------------------------------
    def add_kernel(self, run_id: str, seq: int, record: dict) -> None:
        """Store one kernel case as soon as it finished (its own transaction)."""
        self.db.execute("INSERT INTO kernels VALUES (?,?,?,?,?,?)",
                        (run_id, seq, record["bench"], record["case"], record["status"], json.dumps(record)))

    def kernels(self, run_id: str) -> list[dict]:
        cur = self.db.execute("SELECT record_json FROM kernels WHERE run_id=? ORDER BY seq", (run_id,))
        return [json.loads(r[0]) for r in cur]

    def kernels_runs(self, device_name: str | None = None):
        """`llmbench kernels` runs holding results (on this device, if named), newest first; a
        search's own collective probe (stored with its sweep run) is not one of them."""
        for r in reversed(self.runs()):
            if r["suite"] != "kernels" or (device_name and r["env"].get("device_name") != device_name):
                continue
            if self.db.execute("SELECT 1 FROM kernels WHERE run_id=? LIMIT 1", (r["run_id"],)).fetchone():
                yield r["run_id"]

    def latest_kernels_run(self, device_name: str | None = None) -> str | None:
        """The newest `llmbench kernels` run holding results (on this device, if named)."""
        return next(self.kernels_runs(device_name), None)

    def steps(self, run_id: str) -> list[tuple]:
        return list(self.db.execute("SELECT trial_id, step, step_time_s, loss FROM steps WHERE run_id=? ORDER BY trial_id, step",
                                    (run_id,)))
