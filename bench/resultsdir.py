"""A run's results folder: one JSON file per finished trial, for stores that span machines.

SQLite on a shared filesystem is unsafe (its locking is broken on many NFS setups), so a
sweep whose trials run on several machines (`--shard i/n`, a SLURM array) writes files
instead, and one writer merges them into SQLite (`Store.merge`, `llmbench merge`):

    RESULTS/RUN_ID/run.json                 the run: suite, label, environment, meta, its shards
    RESULTS/RUN_ID/trials/TRIAL_ID.json     {"seq", "record"}: one finished trial (all its rounds so far)
    RESULTS/RUN_ID/shards/KEY.json          one shard's end: status, wall time, pool starts, host

Every file is written whole to a temporary name, fsynced, then renamed into place (and the
folder fsynced), so a reader sees the old file or the new one, never half of one: a
requeued task or a crash leaves no torn record. `FolderStore` offers the part of `Store`'s
interface a sweep uses, so the driver runs unchanged on either.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

from .schema import migrate, validate
from .store import StoreWriteError, free_space


def write_json(path: Path, obj) -> None:
    """Write `obj` to `path` atomically: temporary file, fsync, rename, fsync of the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_json(path: Path):
    with open(path) as f:
        return json.load(f)


def trial_file(folder: Path, trial_id: str) -> Path:
    """A trial's file: its id percent-encoded (an id holds a local model's path: `/` and all);
    an id whose encoding is longer than 250 characters (a file name ends at 255 bytes, so no
    older folder holds one) is cut, with 16 hex digits of its SHA-256 so that two ids never
    share a file."""
    name = quote(trial_id, safe="")
    if len(name) > 250:
        name = name[:230] + "-" + hashlib.sha256(trial_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return folder / "trials" / f"{name}.json"


def shard_key(index: int, count: int, world_size: int | None = None) -> str:
    """A shard's name in the run's folder: `0-of-2`, or `ws8-0-of-2` for one world size's shards."""
    return (f"ws{world_size}-" if world_size else "") + f"{index}-of-{count}"


class FolderStore:
    """A run's results folder with the store interface the sweep uses (create_run, run, trials,
    add_trial, delete_trial, next_seq, set_run_status, finish_run, set_meta).

    `shard`: this writer's shard key; its end goes to shards/KEY.json, and the run's own file is
    left to whoever created it, so shards never rewrite one another's files."""

    def __init__(self, root: str | Path, shard: str | None = None):
        self.root, self.shard = Path(root), shard
        self.path = self.root  # (what error messages name)

    @contextmanager
    def writing(self, what: str) -> Iterator[None]:
        """A file that cannot be written (a full disk, a file-size limit, no permission) as one
        StoreWriteError saying why, as the SQLite store does."""
        try:
            yield
        except OSError as e:
            raise StoreWriteError(f"could not write the results folder {self.root} ({what}): "
                                  f"{e.strerror or e} ({free_space(self.root)})") from e

    def folder(self, run_id: str) -> Path:
        """The run's folder: ROOT/RUN_ID. A run id that would leave ROOT (`/`, `..`) is refused
        (ValueError); a new run's id is checked whole by the CLI (safetext.check_run_id), but a
        folder an older llmbench wrote under another id (`exp 1`) still reads and merges."""
        if not run_id or run_id in (".", "..") or any(c in run_id for c in "/\\\0") or len(run_id) > 255:
            raise ValueError(f"run id {run_id!r} cannot name a folder under {self.root}")
        return self.root / run_id

    def trial_path(self, run_id: str, trial_id: str) -> Path:
        return trial_file(self.folder(run_id), trial_id)

    # -- runs ------------------------------------------------------------------------------
    def create_run(self, run_id: str, suite: str | None, label: str | None, env: dict, meta: dict | None = None,
                   shards: list[str] | None = None) -> None:
        """The run's file, unless a shard of the same run wrote it first (then it is kept as it is)."""
        with self.writing(f"creating run {run_id}"):
            path = self.folder(run_id) / "run.json"
            if path.exists():
                return
            write_json(path, dict(run_id=run_id, created_at=time.time(), suite=suite, label=label, env=env,
                                  meta=meta or {}, status="running", shards=shards or []))

    def run(self, run_id: str | None = None) -> dict | None:
        if run_id is None or not (self.folder(run_id) / "run.json").exists():
            return None
        run = read_json(self.folder(run_id) / "run.json")
        run["status"], run["meta"] = run_status(self.folder(run_id), run)
        return run

    def finish_run(self, run_id: str, status: str, meta: dict | None = None) -> None:
        with self.writing(f"ending run {run_id}"):
            if self.shard:  # a requeued or resumed shard adds its part to what the shard did before
                now, meta = time.time(), dict(meta or {})
                path = self.folder(run_id) / "shards" / f"{self.shard}.json"
                started = now - meta.get("wall_s", 0)
                if path.exists():
                    was = read_json(path)
                    started = min(started, was.get("started_at") or started)
                    meta.update(wall_s=was["meta"].get("wall_s", 0) + meta.get("wall_s", 0),
                                pool_starts=was["meta"].get("pool_starts", 0) + meta.get("pool_starts", 0),
                                pool_start_s=was["meta"].get("pool_start_s", []) + meta.get("pool_start_s", []))
                write_json(path, dict(status=status, started_at=started, finished_at=now, host=socket.gethostname(),
                                      meta=meta))
                return
            run = read_json(self.folder(run_id) / "run.json")
            run.update(status=status, finished_at=time.time(), meta=meta if meta is not None else run["meta"])
            write_json(self.folder(run_id) / "run.json", run)

    def set_run_status(self, run_id: str, status: str) -> None:
        with self.writing(f"run {run_id}'s status"):
            if not self.shard:
                run = read_json(self.folder(run_id) / "run.json")
                run["status"] = status
                write_json(self.folder(run_id) / "run.json", run)

    def set_meta(self, run_id: str, meta: dict) -> None:
        with self.writing(f"run {run_id}'s meta"):
            run = read_json(self.folder(run_id) / "run.json")
            run["meta"] = meta
            write_json(self.folder(run_id) / "run.json", run)

    # -- trials ----------------------------------------------------------------------------
    def _trial_files(self, run_id: str) -> list[Path]:
        return sorted((self.folder(run_id) / "trials").glob("*.json"))

    def entries(self, run_id: str) -> list[tuple[int, dict]]:
        """(seq, record) of every trial file, in seq order."""
        out = []
        for p in self._trial_files(run_id):
            try:
                e = read_json(p)
            except FileNotFoundError:  # a resuming shard removed it since the listing
                continue
            out.append((e["seq"], migrate(e["record"])))
        return sorted(out, key=lambda e: e[0])

    def trials(self, run_id: str) -> list[dict]:
        return [rec for _, rec in self.entries(run_id)]

    def add_trial(self, record: dict, seq: int, replace: bool = False) -> None:
        """Write one finished trial (a later round's record replaces the file whole)."""
        with self.writing(f"storing trial {record['trial_id']}"):
            validate(record)
            write_json(trial_file(self.folder(record["run_id"]), record["trial_id"]), {"seq": seq, "record": record})

    def delete_trial(self, run_id: str, trial_id: str) -> None:
        with self.writing(f"removing trial {trial_id}"):
            trial_file(self.folder(run_id), trial_id).unlink(missing_ok=True)

    def next_seq(self, run_id: str) -> int:
        return max((seq for seq, _ in self.entries(run_id)), default=-1) + 1


def run_status(folder: Path, run: dict) -> tuple[str, dict]:
    """A run's status and meta, its shards' ends included: `finished` once every planned shard
    finished, `interrupted` or `failed` if one ended so, else `running` (or the run file's
    own status when it has no shards). Shards' wall times and pool starts add up."""
    shards = run.get("shards") or []
    if not shards:
        return run.get("status", "running"), run.get("meta", {})
    ends = {p.stem: read_json(p) for p in (folder / "shards").glob("*.json")}
    meta = dict(run.get("meta", {}))
    meta["shards"] = {k: {"status": e["status"], "host": e.get("host"), "started_at": e.get("started_at"),
                          "finished_at": e.get("finished_at"), "wall_s": e["meta"].get("wall_s")}
                      for k, e in sorted(ends.items())}
    done = [ends[k] for k in shards if k in ends]
    meta["wall_s"] = sum(e["meta"].get("wall_s", 0) for e in done)
    meta["pool_starts"] = sum(e["meta"].get("pool_starts", 0) for e in done)
    meta["pool_start_s"] = [s for e in done for s in e["meta"].get("pool_start_s", [])]
    refused = [r for e in done for r in e["meta"].get("control_refused", [])]
    if refused:
        meta["control_refused"] = refused
    statuses = {e["status"] for e in done}
    if "failed" in statuses:
        return "failed", meta
    if "interrupted" in statuses:
        return "interrupted", meta
    return ("finished" if len(done) == len(shards) else "running"), meta


def run_folders(paths: list[str | Path]) -> list[Path]:
    """The run folders under the given paths: a run's folder itself, or a results folder
    holding runs (absolute paths; a run's folder is named by its run id)."""
    out = []
    for p in (Path(q).resolve() for q in paths):
        if (p / "run.json").is_file():
            out.append(p)
        elif p.is_dir():
            out += sorted(q.parent for q in p.glob("*/run.json"))
    return out
