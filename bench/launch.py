"""Start ranks with DeepSpeed's own launcher and keep them as a warm pool across trials.

The driver opens a control socket, runs `deepspeed [launcher options] --module
llmbench.worker`, and streams trial specs to every rank over that socket. The launcher is
started in its own process session, so killing the pool kills the launcher and every rank.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .env import Hardware


def free_port() -> int:
    """A free TCP port for the rendezvous (29500 may belong to another program)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@dataclass
class LaunchOptions:
    """DeepSpeed launcher options, as DeepSpeed users know them."""

    hostfile: str | None = None
    include: str | None = None
    num_nodes: int | None = None
    master_addr: str | None = None
    extra: list[str] = field(default_factory=list)

    @property
    def multi_node(self) -> bool:
        return bool(self.hostfile or (self.num_nodes and self.num_nodes > 1))


def extensions_dir() -> Path:
    """Where torch JIT-builds DeepSpeed's ops (torch.utils.cpp_extension's default)."""
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")


def clear_stale_extension_locks(max_age_s: float = 60.0) -> list[Path]:
    """Remove JIT-build lock files that nobody will ever release.

    torch's cpp_extension takes a lock file (`<build dir>/lock`) every time a rank loads a
    DeepSpeed op (even an up-to-date one) and waits forever while it exists. A rank killed
    at that moment (a timed-out or failed trial, Ctrl-C) leaves it behind, and every later
    launch hangs silently. Loading a built op holds the lock for well under a second, so a
    lock older than `max_age_s` while no compiler runs is stale.
    """
    root = extensions_dir()
    locks = [p for p in root.glob("*/*/lock")] + [p for p in root.glob("*/lock")]
    now = time.time()
    stale = [p for p in locks if now - p.stat().st_mtime > max_age_s]
    if not stale:
        return []
    import psutil

    building = any(p.info["name"] in ("ninja", "c++", "g++", "gcc", "cc1plus", "nvcc")
                   for p in psutil.process_iter(["name"]))
    if building:
        return []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def release_shm_buffers(master_port: int | None) -> list[Path]:
    """Remove the shared-memory segments DeepSpeed's CPU comm op left for this rendezvous.

    deepspeed/ops/csrc/cpu/comm/shm.cpp creates /dev/shm/deepspeed_allreduce_buffer_*_ADDR_PORT_RANK
    (69 MB per rank in 0.19.8) and never unlinks it, at exit or otherwise: each launch on a
    fresh port leaks RAM until the host runs out (seen here: 7.7 GB after ~55 launches, then
    the OOM killer). The port in the name is the pool's own, so only its segments go.
    """
    if master_port is None:
        return []
    gone = []
    for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{master_port}_*"):
        try:
            p.unlink()
            gone.append(p)
        except OSError:
            pass
    return gone


def hostfile_slots(path: str) -> int:
    """World size of a DeepSpeed hostfile (`host slots=N` lines), read by DeepSpeed's own parser
    (deepspeed.launcher.runner.fetch_hostfile), so it agrees with what the launcher starts."""
    from .spec import SpecError

    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _cuda_visible() else "cuda")  # quiet import
    from deepspeed.launcher.runner import fetch_hostfile

    if not Path(path).is_file():
        raise SpecError(f"--hostfile {path}: no such file")
    try:
        hosts = fetch_hostfile(path)
    except ValueError as e:
        raise SpecError(f"--hostfile {path}: {e}") from None
    if not hosts:
        raise SpecError(f"--hostfile {path}: names no host")
    return sum(hosts.values())


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


class PoolError(RuntimeError):
    """The pool could not run a trial to completion (start-up failed, a rank died or hung)."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


class RankPool:
    """A pool of ranks of one world size, reused across trials until a trial fails."""

    def __init__(self, hw: Hardware, world_size: int, log_path: Path, options: LaunchOptions | None = None,
                 startup_timeout_s: float = 600.0, grace_s: float = 15.0):
        self.hw, self.world_size, self.log_path = hw, world_size, Path(log_path)
        self.options = options or LaunchOptions()
        self.startup_timeout_s, self.grace_s = startup_timeout_s, grace_s
        self.proc: subprocess.Popen | None = None
        self.server: socket.socket | None = None
        self.conns: dict[int, socket.socket] = {}
        self.pids: dict[int, int] = {}
        self.events: queue.Queue = queue.Queue()
        self.ready: dict[int, dict] = {}
        self.start_s = 0.0
        self.starts = 0
        self.master_port: int | None = None
        self.cleared_locks: list[Path] = []

    # -- lifecycle ---------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and len(self.ready) == self.world_size

    def command(self, control: str) -> list[str]:
        o = self.options
        self.master_port = free_port()
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(self.master_port), "--no_local_rank"]
        if o.hostfile:
            cmd += ["--hostfile", o.hostfile]
        if o.include:
            cmd += ["--include", o.include]
        if o.num_nodes:
            cmd += ["--num_nodes", str(o.num_nodes)]
        if o.master_addr:
            cmd += ["--master_addr", o.master_addr]
        if not o.include and not o.multi_node:
            cmd += ["--num_gpus", str(self.world_size)]
        cmd += o.extra
        cmd += ["--module", "llmbench.worker", "--control", control, "--backend", self.hw.comm_backend,
                "--accelerator", self.hw.accelerator, "--threads", str(self.hw.threads_per_rank)]
        return cmd

    def start(self) -> None:
        t0 = time.perf_counter()
        self.cleared_locks = clear_stale_extension_locks()
        self.events = queue.Queue()
        self.ready, self.conns, self.pids = {}, {}, {}
        bind = "0.0.0.0" if self.options.multi_node else "127.0.0.1"
        self.server = socket.create_server((bind, 0))
        host = socket.gethostname() if self.options.multi_node else "127.0.0.1"
        control = f"{host}:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, args=(self.server,), daemon=True).start()
        env = dict(os.environ)
        env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(self.hw.threads_per_rank))
        if self.hw.accelerator == "cpu":
            env["DS_ACCELERATOR"] = "cpu"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = self.command(control)
        log = open(self.log_path, "ab")
        log.write(f"\n=== pool start: {' '.join(cmd)}\n".encode())
        log.flush()
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        log.close()
        self.starts += 1
        deadline = time.monotonic() + self.startup_timeout_s
        next_lock_check = time.monotonic() + 10
        while len(self.ready) < self.world_size:
            try:
                rank, msg = self.events.get(timeout=0.2)
            except queue.Empty:
                if time.monotonic() > next_lock_check:
                    self.cleared_locks += clear_stale_extension_locks()
                    next_lock_check = time.monotonic() + 10
                if self.proc.poll() is not None:
                    self.kill()
                    raise PoolError("failed", f"the DeepSpeed launcher exited with code {self.proc.returncode} "
                                              f"before all ranks were ready:\n{self.log_tail()}")
                if time.monotonic() > deadline:
                    self.kill()
                    raise PoolError("timeout", f"ranks not ready after {self.startup_timeout_s:.0f}s (a rank waiting on a "
                                               f"JIT-build lock under {extensions_dir()} looks like this):\n{self.log_tail()}")
                continue
            if msg["type"] == "ready":
                self.ready[rank] = msg
        self.start_s = time.perf_counter() - t0

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        rank = None
        try:
            for line in conn.makefile("r", encoding="utf-8"):
                msg = json.loads(line)
                if msg["type"] == "hello":
                    rank = msg["rank"]
                    self.conns[rank] = conn
                    self.pids[rank] = msg["pid"]
                self.events.put((rank, msg))
        except OSError:
            pass
        self.events.put((rank, {"type": "eof"}))

    def _send_all(self, msg: dict) -> None:
        data = (json.dumps(msg) + "\n").encode()
        for conn in self.conns.values():
            conn.sendall(data)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the ranks to leave cleanly (they leave the process group and say bye), then
        end the launcher's session: its own exit polling would cost seconds more."""
        if self.proc is not None and self.proc.poll() is None and self.conns:
            try:
                self._send_all({"type": "stop"})
                gone: set = set()
                deadline = time.monotonic() + timeout_s
                while len(gone) < len(self.conns) and time.monotonic() < deadline:
                    try:
                        rank, msg = self.events.get(timeout=0.1)
                    except queue.Empty:
                        if self.proc.poll() is not None:
                            break
                        continue
                    if msg["type"] in ("bye", "eof"):
                        gone.add(rank)
            except OSError:
                pass
        self.kill()

    def kill(self) -> None:
        """End the launcher, every rank and anything they started (compilers included)."""
        if self.proc is not None and self.proc.poll() is None:
            import psutil

            try:
                family = psutil.Process(self.proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                family = []
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            for p in family:  # a child that left the process group is still ours
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            self.proc.wait()
        for conn in self.conns.values():
            try:
                conn.close()
            except OSError:
                pass
        release_shm_buffers(self.master_port)
        if self.server is not None:
            self.server.close()
        self.conns, self.ready, self.server = {}, {}, None

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        keep = [ln for ln in lines if "[INFO]" not in ln]
        return "\n".join(keep[-n:])

    # -- trials ------------------------------------------------------------------------
    def run(self, trial_id: str, spec: dict, timeout_s: float, base_config: dict | None = None,
            trace_dir: str | None = None, kind: str = "trial",
            on_row: Callable[[int, dict], None] | None = None) -> list[dict]:
        """Run one trial on every rank; returns the ranks' results (any status). Partial results
        a rank streams before its result (`row` messages: kernel cases) go to `on_row(rank, row)`.

        Raises PoolError when the ranks cannot all report: a rank died (`failed`), or the
        trial outlived `timeout_s` (`timeout`), or some ranks reported a failure and the
        rest did not follow within the grace period (they are stuck in a collective).
        """
        if not self.alive:
            self.kill()
            self.start()
        while not self.events.empty():
            self.events.get_nowait()
        self._send_all({"type": kind, "trial_id": trial_id, "spec": spec, "base_config": base_config,
                        "trace_dir": trace_dir})
        results: dict[int, dict] = {}
        deadline = time.monotonic() + timeout_s
        first_failure = None
        while len(results) < self.world_size:
            try:
                rank, msg = self.events.get(timeout=0.2)
            except queue.Empty:
                now = time.monotonic()
                if self.proc.poll() is not None:
                    failed = [r for r in results.values() if r["status"] != "ok"]
                    if failed:
                        return list(results.values())
                    raise PoolError("failed", f"ranks exited (launcher code {self.proc.returncode}) during the trial:\n{self.log_tail()}")
                if now > deadline:
                    self.kill()
                    raise PoolError("timeout", f"trial exceeded its {timeout_s:.0f}s limit; all its processes were killed")
                if first_failure is not None and now > first_failure + self.grace_s:
                    self.kill()
                    return list(results.values())
                continue
            if time.monotonic() > deadline:  # also when messages keep coming (streamed rows)
                self.kill()
                raise PoolError("timeout", f"trial exceeded its {timeout_s:.0f}s limit; all its processes were killed")
            if msg["type"] == "row" and msg.get("trial_id") == trial_id and on_row is not None:
                on_row(rank, msg["row"])
            elif msg["type"] == "result" and msg.get("trial_id") == trial_id:
                results[rank] = msg
                if msg["status"] != "ok" and first_failure is None:
                    first_failure = time.monotonic()
            elif msg["type"] == "eof" and rank not in results:
                time.sleep(0.5)  # let the launcher's exit code settle
                code = self.proc.poll()
                if any(r["status"] != "ok" for r in results.values()):
                    self.kill()
                    return list(results.values())
                self.kill()
                raise PoolError("failed", f"rank {rank} died during the trial (launcher code {code}); "
                                          f"a code of -9 is often the host's OOM killer:\n{self.log_tail()}")
        clean = kind == "inference" and all(r["status"] in ("ok", "unsupported") for r in results.values())
        if any(r["status"] != "ok" for r in results.values()) and not clean:
            self.kill()  # the next trial starts on a clean pool
        # (a single-process inference trial refused by torchao leaves its process clean: no
        # collective is pending and its model is freed, so the pool is kept)
        return [results[r] for r in sorted(results)]
