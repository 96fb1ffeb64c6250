"""The launcher process: DeepSpeed's launcher (`python -m deepspeed.launcher.runner ...
--module llmbench.worker`) started in its own session, killed with its whole process tree,
and the host state a killed launch leaves behind cleaned up (DeepSpeed's shared-memory
segments, JIT-build locks). Also the launcher options as DeepSpeed users know them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..env import Hardware


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
    from ..spec import SpecError

    from deepspeed.launcher.runner import fetch_hostfile  # (the CLI set DS_ACCELERATOR: a quiet import)

    if not Path(path).is_file():
        raise SpecError(f"--hostfile {path}: no such file")
    try:
        hosts = fetch_hostfile(path)
    except ValueError as e:
        raise SpecError(f"--hostfile {path}: {e}") from None
    if not hosts:
        raise SpecError(f"--hostfile {path}: names no host")
    return sum(hosts.values())


class LauncherProcess:
    """One run of DeepSpeed's launcher for `world_size` ranks of `llmbench.worker`."""

    def __init__(self, hw: Hardware, world_size: int, options: LaunchOptions, log_path: Path):
        self.hw, self.world_size, self.options, self.log_path = hw, world_size, options, Path(log_path)
        self.proc: subprocess.Popen | None = None
        self.master_port: int | None = None

    def command(self, control: str) -> list[str]:
        """The launcher's command line: DeepSpeed's runner on a free rendezvous port, the worker module."""
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

    def start(self, control: str) -> None:
        """Start the launcher in its own session (so its whole tree can be killed), logging to `log_path`."""
        env = dict(os.environ)
        env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(self.hw.threads_per_rank))
        if self.hw.accelerator == "cpu":
            env["DS_ACCELERATOR"] = "cpu"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = self.command(control)
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== pool start: {' '.join(cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                         start_new_session=True)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def kill(self) -> None:
        """End the launcher, every rank and anything they started (compilers included), then
        remove this launch's shared-memory segments."""
        if self.running:
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
        release_shm_buffers(self.master_port)

    def log_tail(self, n: int = 30) -> str:
        """The log's last lines, DeepSpeed's [INFO] chatter left out."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        keep = [ln for ln in lines if "[INFO]" not in ln]
        return "\n".join(keep[-n:])
