"""The store: SQLite with runs, trials and per-step records.

Each finished trial is committed in its own transaction, so an interrupted sweep keeps
everything it measured. WAL mode lets a report read while a sweep writes.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from .phases import pause_point, phase
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


def _canon(rec: dict) -> str:
    """A record as comparable text (NaN losses compare equal as text, not as floats)."""
    return json.dumps(rec, sort_keys=True)


class Store:
    """`mirror`: a results folder (resultsdir.FolderStore) that gets every run and trial this
    store gets, as files another machine's merge can read."""

    def __init__(self, path: str | Path, mirror=None):
        self.path = Path(path)
        self.mirror = mirror
        self.mirror_error: str | None = None
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
        self._mirrored("create_run", run_id, suite, label, env, meta)

    def finish_run(self, run_id: str, status: str, meta: dict | None = None) -> None:
        self._mirrored("finish_run", run_id, status, meta, run_id=run_id)
        if meta is None:
            self.db.execute("UPDATE runs SET status=?, finished_at=? WHERE run_id=?", (status, time.time(), run_id))
        else:
            self.db.execute("UPDATE runs SET status=?, finished_at=?, meta_json=? WHERE run_id=?",
                            (status, time.time(), json.dumps(meta), run_id))

    def set_meta(self, run_id: str, meta: dict) -> None:
        """Replace a run's meta (what `llmbench project` adds), leaving its status as it is."""
        self.db.execute("UPDATE runs SET meta_json=? WHERE run_id=?", (json.dumps(meta), run_id))
        self._mirrored("set_meta", run_id, meta, run_id=run_id)

    def _mirrored(self, method: str, *args, run_id: str | None = None) -> None:
        """Do the same to the mirror folder (of a run it holds, when `run_id` is given). The
        files are a copy: a failure there (a full disk, an unwritable folder) is kept in
        `mirror_error`, the mirror is switched off, and the sweep and its SQLite store go on."""
        if self.mirror is None:
            return
        try:
            if run_id is None or self.mirror.run(run_id) is not None:
                getattr(self.mirror, method)(*args)
        except (OSError, ValueError, KeyError) as e:
            self.mirror_error = f"the results folder {self.mirror.root} is no longer written: {type(e).__name__}: {e}"
            self.mirror = None
            import sys

            print(f"llmbench: warning: {self.mirror_error}", file=sys.stderr)

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
        with phase("store-commit"), self.db:  # BEGIN ... COMMIT
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
            pause_point("store-commit")  # tests: killed inside the transaction, before its COMMIT
        self._mirrored("add_trial", record, seq, replace, run_id=record["run_id"])

    def delete_trial(self, run_id: str, trial_id: str) -> None:
        self._mirrored("delete_trial", run_id, trial_id)
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("DELETE FROM steps WHERE run_id=? AND trial_id=?", (run_id, trial_id))
            self.db.execute("DELETE FROM trials WHERE run_id=? AND trial_id=?", (run_id, trial_id))

    def set_run_status(self, run_id: str, status: str) -> None:
        self.db.execute("UPDATE runs SET status=? WHERE run_id=?", (status, run_id))
        self._mirrored("set_run_status", run_id, status, run_id=run_id)

    def next_seq(self, run_id: str) -> int:
        (n,) = self.db.execute("SELECT COALESCE(MAX(seq) + 1, 0) FROM trials WHERE run_id=?", (run_id,)).fetchone()
        return n

    def trials(self, run_id: str) -> list[dict]:
        """The run's records, in the current schema version (older ones migrated as read)."""
        cur = self.db.execute("SELECT record_json FROM trials WHERE run_id=? ORDER BY seq", (run_id,))
        return [migrate(json.loads(r[0])) for r in cur]

    def merge(self, folders: list[str | Path]) -> dict:
        """Merge results folders (resultsdir.py: a run's folder, or a folder of runs) into this
        store, idempotently: a run is created once; a trial file whose record the store holds
        already, identical, stores nothing; one that differs (a later round, a rerun after a
        requeue) replaces it. The run's status follows its shards' ends; its meta takes the
        folder's keys over the stored ones (what was added here, as a finalists' decision or a
        projection, stays). A run's folder must be named by its run id. Returns counts: runs,
        added, replaced, unchanged."""
        with phase("merge"):
            return self._merge(folders)

    def _merge(self, folders: list[str | Path]) -> dict:
        from .resultsdir import FolderStore, run_folders

        counts = dict(runs=0, added=0, replaced=0, unchanged=0)
        for folder in run_folders(folders):
            fs = FolderStore(folder.parent)
            run = fs.run(folder.name)
            if run is None or run["run_id"] != folder.name:
                raise ValueError(f"{folder}: its run.json is for run {run and run['run_id']!r}; a run's folder is named by its id")
            counts["runs"] += 1
            entries = fs.entries(run["run_id"])
            # a run submitted from a login node has no environment of its own: its trials' is the one
            env = run["env"] or next((rec.get("env") for _, rec in entries if rec.get("env")), {})
            known = self.db.execute("SELECT finished_at, meta_json, status FROM runs WHERE run_id=?",
                                    (run["run_id"],)).fetchone()
            if not known:
                self.db.execute("INSERT INTO runs (run_id, created_at, suite, label, status, env_json, meta_json) "
                                "VALUES (?,?,?,?,?,?,?)", (run["run_id"], run["created_at"], run["suite"], run["label"],
                                                            "running", json.dumps(env), json.dumps(run["meta"])))
            held = {tid: _canon(migrate(json.loads(rj))) for tid, rj in
                    self.db.execute("SELECT trial_id, record_json FROM trials WHERE run_id=?", (run["run_id"],))}
            for seq, rec in entries:
                was = held.get(rec["trial_id"])
                if was == _canon(rec):
                    counts["unchanged"] += 1
                    continue
                mirror, self.mirror = self.mirror, None  # (the folder is where it came from)
                try:
                    self.add_trial(rec, seq, replace=was is not None)
                finally:
                    self.mirror = mirror
                counts["replaced" if was is not None else "added"] += 1
                pause_point("merge")  # tests: killed with the merge half done
            meta = {**(json.loads(known[1]) if known else {}), **run["meta"]}
            ends = [e.get("finished_at") for e in run["meta"].get("shards", {}).values() if e.get("finished_at")]
            finished = run.get("finished_at") or (max(ends) if ends and run["status"] != "running" else None) \
                or (known[0] if known and known[2] == run["status"] else None)
            self.db.execute("UPDATE runs SET status=?, finished_at=?, env_json=?, meta_json=? WHERE run_id=?",
                            (run["status"], finished, json.dumps(env), json.dumps(meta), run["run_id"]))
        return counts

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
