"""Storage faults, for real (docs/faults.md): a file that is not a store, a store locked by
another writer, a disk that fills while a trial is stored or a report written. Each ends in one
clear line, and nothing committed before is lost. (A merge killed half done and run again: the
third kill of test_chaos.py.)"""

import hashlib
import json
import os
import random
import resource
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import cli, llmbench

SUITE = ("name: store-faults\nfixed: {model: tiny, precision: fp32, seq_len: 32, micro_batch: 2, warmup_steps: 2, "
         "steps: 2, breakdown_steps: 0}\ngrid: {zero_stage: [0, 1, 2]}\n")
TRIALS = ["z0", "z1", "z2"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


@pytest.fixture
def not_stores(zero_sweep, tmp_path):
    """Three files that are not an llmbench store: the session's store cut in half, random
    bytes, and another program's SQLite database."""
    whole = Path(zero_sweep["db"]).read_bytes()
    truncated = tmp_path / "truncated.db"
    truncated.write_bytes(whole[: len(whole) // 2])
    noise = tmp_path / "noise.db"
    noise.write_bytes(random.Random(20).randbytes(64 * 1024))
    other = tmp_path / "places.sqlite"
    with sqlite3.connect(other) as c:
        c.execute("CREATE TABLE moz_places (id INTEGER PRIMARY KEY, url TEXT)")
        c.execute("INSERT INTO moz_places (url) VALUES ('https://example.org')")
    c.close()
    return {"truncated": (truncated, "damaged"), "noise": (noise, "not an SQLite database"),
            "other": (other, "another program's SQLite database")}


@pytest.mark.parametrize("command", [
    ["results"], ["runs"], ["report", "--out", "{out}"], ["best", "--out", "{out}"], ["gate", "a", "b"],
    ["sweep", "zero", "--out", "{out}"], ["merge", "{folder}", "--out", "{out}"],
])
def test_a_file_that_is_not_a_store_is_refused_and_left_as_it_was(not_stores, command, tmp_path):
    """One line naming the file and what it is, exit 2, before anything is launched; the file
    keeps every byte and gains no journal beside it."""
    folder = tmp_path / "results" / "R"
    folder.mkdir(parents=True)
    (folder / "run.json").write_text("{}")
    for name, (path, what) in not_stores.items():
        before = _digest(path)
        args = [a.replace("{folder}", str(folder)).replace("{out}", str(tmp_path / "out")) for a in command]
        p = cli(*args, "--db", str(path), check=False)
        lines = _error_lines(p.stderr)
        assert p.returncode == 2 and len(lines) == 1, (name, p.stdout, p.stderr)
        assert str(path) in lines[0] and what in lines[0] and "nothing was written" in lines[0], (name, lines[0])
        assert _digest(path) == before, name
        assert not Path(f"{path}-wal").exists() and not Path(f"{path}-journal").exists(), name
    assert not (tmp_path / "out" / "logs").exists()  # no pool was started


@pytest.mark.parametrize("old", sorted(p.name for p in (Path(__file__).parent / "data").glob("*.db")))
def test_a_store_of_an_older_llmbench_or_one_being_written_still_opens(old, tmp_path):
    """The checks refuse what is not a store, not a store of an older llmbench (tests/data),
    nor one another writer holds with its WAL open and a transaction pending."""
    import shutil

    db = tmp_path / "old.db"
    shutil.copy(Path(__file__).parent / "data" / old, db)
    assert cli("results", "--db", str(db), "--format", "json").stdout.strip()
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("PRAGMA journal_mode=WAL")
    other.execute("BEGIN IMMEDIATE")
    other.execute("UPDATE runs SET label='pending'")
    try:
        assert Path(f"{db}-wal").exists()
        p = cli("runs", "--db", str(db))
        assert "pending" not in p.stdout and p.stdout.count("\n") > 3  # the committed state, read beside the writer
    finally:
        other.execute("ROLLBACK")
        other.close()


def _limit_file_size(limit: int):
    """For a child: files it writes may grow to `limit` bytes; a write past it fails with
    EFBIG, as on a full disk (Python ignores SIGXFSZ, so the write fails instead of killing it)."""
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return apply


def test_a_report_that_cannot_be_written_is_one_line_and_the_store_stays(zero_sweep, tmp_path):
    import shutil

    db = tmp_path / "s.db"
    shutil.copy(zero_sweep["db"], db)
    before = _digest(db)
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "llmbench.cli", "report", "--db", str(db), "--out", str(out)],
                       capture_output=True, text=True, preexec_fn=_limit_file_size(64 * 1024), timeout=300)
    lines = _error_lines(p.stderr)
    assert p.returncode == 1 and len(lines) == 1 and "could not write the report" in lines[0], p.stderr
    assert "File too large" in lines[0] and str(out) in lines[0], lines[0]
    assert list(out.glob("*")) == [] if out.exists() else True  # no half-written report left behind
    assert _digest(db) == before
    # space again: the same command writes it
    cli("report", "--db", str(db), "--out", str(out))
    assert len(list(out.glob("report-*.html"))) == 1


def _events(log: Path, pid: int) -> list[tuple[str, str]]:
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        _, p, event, name = line.split()
        if int(p) == pid:
            out.append((event, name))
    return out


def _wait_for(proc, log: Path, event: tuple[str, str], count: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while _events(log, proc.pid).count(event) < count:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"never saw {event} {count} times"
        time.sleep(0.02)


def test_a_locked_store_is_waited_for_and_a_full_disk_stops_the_sweep_losing_nothing(tmp_path):
    """One real sweep of three trials. After the first is stored another writer locks the store
    (BEGIN IMMEDIATE) until a second after the sweep starts storing the second: the sweep waits
    (LLMBENCH_STORE_TIMEOUT=20 s) and goes on. After the second, the disk fills (the driver's
    RLIMIT_FSIZE set to the store's size): storing the third fails; one line and exit 1; the
    two trials stored are intact, the third's record is kept in the results folder; --resume
    (space again) completes the run, each trial stored once."""
    suite = tmp_path / "s.yaml"
    suite.write_text(SUITE)
    db, out, log = tmp_path / "s.db", tmp_path / "out", tmp_path / "phases.log"
    env = dict(os.environ, LLMBENCH_PHASE_LOG=str(log), LLMBENCH_STORE_TIMEOUT="20")
    proc = subprocess.Popen([sys.executable, "-m", "llmbench.cli", "sweep", str(suite), "--db", str(db), "--out",
                             str(out), "--no-prune"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _wait_for(proc, log, ("end", "store-commit"), 1)
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the store's write lock
    _wait_for(proc, log, ("begin", "store-commit"), 2)
    time.sleep(1.0)
    released = time.time()
    other.execute("ROLLBACK")
    _wait_for(proc, log, ("end", "store-commit"), 2, timeout=30)
    ends = [float(ln.split()[0]) for ln in log.read_text().splitlines() if ln.endswith(" end store-commit")]
    begins = [float(ln.split()[0]) for ln in log.read_text().splitlines() if ln.endswith(" begin store-commit")]
    with sqlite3.connect(db) as c:
        held = dict(c.execute("SELECT trial_id, record_json FROM trials"))
    # the second commit began under the lock and ended only after it was released: it waited
    assert sorted(held) == TRIALS[:2] and begins[1] < released - 0.9 and ends[1] >= released, (begins, ends, released)
    size = max(os.path.getsize(p) for p in (db, Path(f"{db}-wal")) if os.path.exists(p))
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))  # the disk is full
    stdout, stderr = proc.communicate(timeout=240)
    other.close()
    lines = _error_lines(stderr)
    assert proc.returncode == 1 and len(lines) == 1, (stdout, stderr)
    line = lines[0]
    assert f"could not write the store {db} (storing trial z2)" in line and "File too large" in line, line
    assert "2 trials stored before are intact" in line and "--resume" in line and "Traceback" not in stderr, line
    with sqlite3.connect(db) as c:
        after = dict(c.execute("SELECT trial_id, record_json FROM trials"))
        (run_id, status), = c.execute("SELECT run_id, status FROM runs").fetchall()
    assert after == held  # nothing committed before was touched
    kept = out / "results" / run_id / "trials" / "z2.json"
    assert kept.exists() and f"z2's record is kept in {kept}" in line
    assert json.loads(kept.read_text())["record"]["trial_id"] == "z2"

    llmbench("sweep", str(suite), "--db", str(db), "--out", str(out), "--no-prune", "--resume", run_id)
    with sqlite3.connect(db) as c:
        rows = c.execute("SELECT trial_id, status, record_json FROM trials ORDER BY seq").fetchall()
        (status,), = c.execute("SELECT status FROM runs").fetchall()
        steps = c.execute("SELECT trial_id, COUNT(*) FROM steps GROUP BY trial_id").fetchall()
    assert [r[0] for r in rows] == TRIALS and all(r[1] == "ok" for r in rows) and status == "finished"
    assert {t: rj for t, _, rj in rows if t in held} == held
    assert dict(steps) == {t: 2 for t in TRIALS}


def test_a_store_locked_past_the_timeout_is_one_line_and_a_rerun_loses_nothing(zero_sweep, tmp_path):
    """A merge into a store another writer holds: it waits LLMBENCH_STORE_TIMEOUT seconds,
    then one line and exit 1; the result files are untouched, and the same merge once the lock
    is gone stores every trial once."""
    from llmbench.resultsdir import FolderStore

    records = zero_sweep["records"]
    fs = FolderStore(tmp_path / "results")
    fs.create_run("R", "zero", "ci", {"host": "x"}, {})
    for seq, rec in enumerate(records):
        fs.add_trial(dict(rec, run_id="R"), seq)
    fs.finish_run("R", "finished", {"wall_s": 1.0})
    db = tmp_path / "m.db"
    from llmbench.store import Store

    Store(db).close()  # an empty store
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    t0 = time.monotonic()
    p = cli("merge", str(tmp_path / "results"), "--db", str(db), "--no-report", check=False,
            env=dict(os.environ, LLMBENCH_STORE_TIMEOUT="2"))
    waited = time.monotonic() - t0
    other.execute("ROLLBACK")
    other.close()
    lines = _error_lines(p.stderr)
    assert p.returncode == 1 and len(lines) == 1 and "locked by another writer" in lines[0], p.stderr
    assert "waited 2 s" in lines[0] and "LLMBENCH_STORE_TIMEOUT" in lines[0] and waited >= 2, (lines[0], waited)
    p = cli("merge", str(tmp_path / "results"), "--db", str(db), "--no-report")
    assert f"{len(records)} added" in p.stdout
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT COUNT(*) FROM trials").fetchone()[0] == len(records)
        assert c.execute("SELECT COUNT(*) FROM steps").fetchone()[0] == sum(len(r["step_times_s"]) for r in records)


@pytest.mark.parametrize("change, missing, why", [
    # a value seaborn's tick locator cannot lay out (an overflow: 1e308 tokens/s and up)
    (lambda i, r: r.update(tokens_per_s=1e308 * (i + 1)), ["Throughput vs micro-batch", "Throughput vs memory (Pareto frontier)"],
     "arange: cannot compute length"),
    # an empty group: no trial's throughput is a number, so the recommendation has no contender
    (lambda i, r: r.update(tokens_per_s=float("nan")), ["Which configuration to use"], "min() arg is an empty sequence"),
])
def test_a_figure_that_cannot_be_drawn_is_left_out_and_named(zero_sweep, change, missing, why, tmp_path):
    """The session's records, stored again with a value a figure (or a section) cannot be made
    from: the report is written without it, says which is missing and why, and keeps the rest
    (the other figures, every trial's row)."""
    from llmbench.store import Store

    db = tmp_path / "f.db"
    store = Store(db)
    store.create_run("R", "zero", None, zero_sweep["records"][0]["env"], {})
    for i, rec in enumerate(zero_sweep["records"]):
        rec = dict(rec, run_id="R")
        change(i, rec)
        store.add_trial(rec, i)
    store.finish_run("R", "finished", {})
    store.close()
    p = cli("report", "R", "--db", str(db), "--out", str(tmp_path / "out"))
    html = (tmp_path / "out" / "report-R.html").read_text()
    box = html[html.index('id="missing"'):html.index("</div>", html.index('id="missing"'))]
    for title in missing:
        assert f"<b>{title}</b> could not be made" in box and why in box, box
        assert f"<figcaption>{title}</figcaption>" not in html
    assert html.count("<figure>") >= 5 and "report:" in p.stdout  # the others are there
    assert all(f'<td class="l">{r["trial_id"]}</td>' in html for r in zero_sweep["records"])


def test_a_results_folder_that_cannot_be_written_is_a_store_write_error(zero_sweep, tmp_path):
    """Shards and SLURM tasks store into a results folder: a write it refuses (here its root
    is a file, so no folder can be made under it) is the same one-line StoreWriteError as a
    locked or full SQLite store, not a traceback."""
    from llmbench.resultsdir import FolderStore
    from llmbench.store import StoreWriteError

    root = tmp_path / "results"
    root.write_text("not a folder")
    fs = FolderStore(root, shard="0-of-1")
    with pytest.raises(StoreWriteError, match=r"could not write the results folder .*results \(creating run R\): "):
        fs.create_run("R", "zero", None, {}, {}, shards=["0-of-1"])
    with pytest.raises(StoreWriteError, match=r"\(storing trial z0-mb4\)"):
        fs.add_trial(dict(zero_sweep["records"][0], run_id="R"), 0)
