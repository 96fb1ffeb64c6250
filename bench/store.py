"""The store: SQLite with runs, trials and per-step records.

Each finished trial is committed in its own transaction, so an interrupted sweep keeps
everything it measured. WAL mode lets a report read while a sweep writes.

What can go wrong with the file itself (docs/faults.md):
- It is not a store (cut short, random bytes, another program's SQLite database): `NotAStore`,
  exit code 2, found before anything is written to it (a read-only look: the SQLite header,
  `PRAGMA quick_check`, the tables).
- Another writer holds it: SQLite's busy timeout waits LLMBENCH_STORE_TIMEOUT seconds (default
  60), then `StoreWriteError`, exit code 1.
- The disk (or the process's file-size limit, `ulimit -f`) is full: `StoreWriteError`, exit
  code 1. What was committed before stays (each commit is atomic); a trial whose record could
  not be committed is written to the results folder instead, where the mirror can.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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


TIMEOUT_ENV, DEFAULT_TIMEOUT_S = "LLMBENCH_STORE_TIMEOUT", 60.0
SQLITE_HEADER = b"SQLite format 3\x00"
NOTHING_WRITTEN = "nothing was written to it"
REBUILD = "a sweep's result files rebuild a store: llmbench merge OUT/results --db NEW.db"


class StoreError(Exception):
    """The store cannot be used. `code`: the exit status (2: bad input; 1: the machine's fault)."""

    code = 1


class NotAStore(StoreError):
    """A file that is not an llmbench store: refused before anything is written to it."""

    code = 2


class StoreWriteError(StoreError):
    """A write that failed: locked past the timeout, a full disk, a file-size limit. The sweep
    fills in `run_id`, `trial_id`, `stored` (its trials committed before) and `kept` (the file
    the trial's record was written to instead; None: nowhere)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.run_id: str | None = None
        self.trial_id: str | None = None
        self.stored: int | None = None
        self.kept: Path | None = None


def _locked(e: sqlite3.Error) -> bool:
    """SQLite gave up waiting for another connection's lock (SQLITE_BUSY, SQLITE_LOCKED)."""
    return (getattr(e, "sqlite_errorname", "") or "").startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in str(e)


def free_space(folder: Path) -> str:
    """How much room the filesystem holding `folder` has left, for an error line."""
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:,.1f} MiB free on its filesystem"
    except OSError:
        return "free space unknown"


def store_timeout() -> float:
    """Seconds a write waits for another writer's lock (LLMBENCH_STORE_TIMEOUT, default 60)."""
    value = os.environ.get(TIMEOUT_ENV, "").strip()
    if not value:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise NotAStore(f"{TIMEOUT_ENV}={value!r}: seconds to wait for a locked store, a positive number")
    return seconds


_CHECKED: set[tuple] = set()  # files found to be stores, as they were then (path, inode, size, mtime)


def check_store_file(path: Path) -> None:
    """Refuse a file that is not an llmbench store (NotAStore) with a read-only look at it: its
    first 16 bytes (SQLite's header), SQLite's `PRAGMA quick_check` (a store cut short or
    overwritten fails it) and its tables (an llmbench store has `runs` and `trials`). A missing
    or empty file is a new store."""
    if not path.exists():
        return
    if path.is_dir():
        raise NotAStore(f"{path} is a folder, not an llmbench store")
    st = path.stat()
    if st.st_size == 0:
        return
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _CHECKED:  # (a sweep opens its store more than once; quick_check reads the whole file)
        return
    with open(path, "rb") as f:
        head = f.read(len(SQLITE_HEADER))
    if head != SQLITE_HEADER:
        raise NotAStore(f"{path} is not an llmbench store: not an SQLite database (it begins {head[:8]!r}); {NOTHING_WRITTEN}")
    # read-only; `immutable` (no lock, no -shm or -wal created) unless a writer's WAL is there
    wal = Path(f"{path}-wal").exists()
    uri = f"{path.resolve().as_uri()}?mode=ro" + ("" if wal else "&immutable=1")
    try:
        con = sqlite3.connect(uri, uri=True, timeout=store_timeout())
        try:
            tables = {n for (n,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            check = [r[0] for r in con.execute("PRAGMA quick_check(5)")]
            columns = {t: {c[1] for c in con.execute(f"PRAGMA table_info({t})")} for t in ("runs", "trials") if t in tables}
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        name = getattr(e, "sqlite_errorname", "") or ""
        if name == "SQLITE_NOTADB" or name.startswith("SQLITE_CORRUPT"):
            raise NotAStore(f"{path} is damaged: SQLite cannot read it ({e}); {NOTHING_WRITTEN}; {REBUILD}") from None
        if _locked(e):
            raise StoreError(f"could not read the store {path}: it is locked by another process (waited "
                             f"{store_timeout():g} s; {TIMEOUT_ENV} sets how long)") from None
        raise StoreError(f"could not read the store {path}: {e} ({name or 'SQLite'})") from None
    if check != ["ok"]:
        raise NotAStore(f"{path} is damaged: SQLite's integrity check says {check[0]!r}"
                        f"{f' and {len(check) - 1} more' if len(check) > 1 else ''}; {NOTHING_WRITTEN}; {REBUILD}")
    if tables and not {"runs", "trials"} <= tables:
        shown = ", ".join(sorted(tables)[:6]) + (", …" if len(tables) > 6 else "")
        raise NotAStore(f"{path} is another program's SQLite database (tables: {shown}), not an llmbench store; "
                        f"{NOTHING_WRITTEN}")
    need = {"runs": {"run_id", "status", "env_json"}, "trials": {"run_id", "trial_id", "seq", "record_json"}}
    for table, cols in columns.items():
        if not need[table] <= cols:
            raise NotAStore(f"{path} is another program's SQLite database (its table {table} lacks "
                            f"{', '.join(sorted(need[table] - cols))}), not an llmbench store; {NOTHING_WRITTEN}")
    _CHECKED.add(key)


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
        check_store_file(self.path)
        self.timeout = store_timeout()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), timeout=self.timeout, isolation_level=None)
        with self.writing("opening it"):
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            have = {n for (n,) in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if not {"runs", "trials", "steps", "kernels"} <= have:  # a new store, or an older one's missing tables
                try:  # all tables or none; IMMEDIATE: the write lock first, so the busy timeout applies
                    self.db.executescript("BEGIN IMMEDIATE;\n" + SCHEMA + "COMMIT;\n")
                except sqlite3.Error:
                    if self.db.in_transaction:
                        self.db.execute("ROLLBACK")
                    raise

    @contextmanager
    def writing(self, what: str) -> Iterator[None]:
        """SQLite's errors of a write as one StoreWriteError saying why: locked, full, too large."""
        try:
            yield
        except sqlite3.OperationalError as e:
            raise StoreWriteError(f"could not write the store {self.path} ({what}): {self._why(e)}") from e

    def _why(self, e: sqlite3.OperationalError) -> str:
        name = getattr(e, "sqlite_errorname", "") or ""
        if _locked(e):
            return f"it is locked by another writer (waited {self.timeout:g} s; {TIMEOUT_ENV} sets how long)"
        free = free_space(self.path.parent)
        if name == "SQLITE_FULL":
            return f"the disk is full ({free})"
        soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        if name.startswith("SQLITE_IOERR") and soft != resource.RLIM_INFINITY:
            return f"{e}: File too large: this process may write files of at most {soft:,} bytes (ulimit -f); {free}"
        return f"{e} ({name or 'SQLite'}; {free})"

    def close(self) -> None:
        self.db.close()

    # -- runs ------------------------------------------------------------------------------
    def create_run(self, run_id: str, suite: str | None, label: str | None, env: dict, meta: dict | None = None) -> None:
        with self.writing(f"creating run {run_id}"):
            self.db.execute("INSERT INTO runs (run_id, created_at, suite, label, status, env_json, meta_json) VALUES (?,?,?,?,?,?,?)",
                            (run_id, time.time(), suite, label, "running", json.dumps(env), json.dumps(meta or {})))
        self._mirrored("create_run", run_id, suite, label, env, meta)

    def finish_run(self, run_id: str, status: str, meta: dict | None = None) -> None:
        self._mirrored("finish_run", run_id, status, meta, run_id=run_id)
        with self.writing(f"ending run {run_id}"):
            if meta is None:
                self.db.execute("UPDATE runs SET status=?, finished_at=? WHERE run_id=?", (status, time.time(), run_id))
            else:
                self.db.execute("UPDATE runs SET status=?, finished_at=?, meta_json=? WHERE run_id=?",
                                (status, time.time(), json.dumps(meta), run_id))

    def set_meta(self, run_id: str, meta: dict) -> None:
        """Replace a run's meta (what `llmbench project` adds), leaving its status as it is."""
        with self.writing(f"run {run_id}'s meta"):
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
        except (OSError, ValueError, KeyError, StoreWriteError) as e:
            self.mirror_error = f"the results folder {self.mirror.root} is no longer written: {type(e).__name__}: {e}"
            self.mirror = None
            import sys

            from .safetext import terminal

            print(f"llmbench: warning: {terminal(self.mirror_error, 2000)}", file=sys.stderr)

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
        schema first (llmbench.schema): a key it lacks is refused, never stored. A commit that
        fails (StoreWriteError: locked, disk full) rolls back whole; the record then still goes
        to the mirror folder, and the error says where (`kept`)."""
        validate(record)
        try:
            with self.writing(f"storing trial {record['trial_id']}"):
                self._commit_trial(record, seq, replace)
        except StoreWriteError as e:
            e.trial_id = record["trial_id"]
            if self.mirror is not None:
                try:
                    self.mirror.add_trial(record, seq, replace)
                    e.kept = self.mirror.trial_path(record["run_id"], record["trial_id"])
                except (OSError, ValueError, KeyError, StoreWriteError):
                    pass
            raise
        self._mirrored("add_trial", record, seq, replace, run_id=record["run_id"])

    def _commit_trial(self, record: dict, seq: int, replace: bool) -> None:
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

    def delete_trial(self, run_id: str, trial_id: str) -> None:
        self._mirrored("delete_trial", run_id, trial_id)
        with self.writing(f"removing trial {trial_id}"), self.db:
            self.db.execute("BEGIN")
            self.db.execute("DELETE FROM steps WHERE run_id=? AND trial_id=?", (run_id, trial_id))
            self.db.execute("DELETE FROM trials WHERE run_id=? AND trial_id=?", (run_id, trial_id))

    def set_run_status(self, run_id: str, status: str) -> None:
        with self.writing(f"run {run_id}'s status"):
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
        with phase("merge"), self.writing("merging"):
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
        with self.writing(f"storing kernel case {record['case']}"):
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
