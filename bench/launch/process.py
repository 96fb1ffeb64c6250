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
    """How ranks are started, as DeepSpeed users know it.

    `launcher`: "deepspeed" (DeepSpeed's runner: one node, or several through its hostfile and
    pdsh over SSH) or "srun" (inside a SLURM allocation: slurm.py). The DeepSpeed options
    (`hostfile`, `include`, `exclude`, `num_nodes`, `master_addr`, `ssh_port`) mean what they
    mean to `deepspeed`; `control_addr` is the address the driver's control socket listens on
    and the ranks connect to (default: loopback for one node, this host's name for several)."""

    hostfile: str | None = None
    include: str | None = None
    exclude: str | None = None
    num_nodes: int | None = None
    master_addr: str | None = None
    ssh_port: int | None = None
    control_addr: str | None = None
    launcher: str = "deepspeed"
    extra: list[str] = field(default_factory=list)
    rank_memory: str = "auto"  # CPU ranks' RLIMIT_DATA (worker.limit_memory): auto, off, or a size (12GiB)

    @property
    def multi_node(self) -> bool:
        return self.launcher == "srun" or bool(self.hostfile or (self.num_nodes and self.num_nodes > 1))

    def control_endpoint(self) -> tuple[str, str]:
        """(address to listen on, name the ranks connect to) for the control socket."""
        if self.control_addr:
            return self.control_addr, self.control_addr
        if self.multi_node:
            return "0.0.0.0", socket.gethostname()
        return "127.0.0.1", "127.0.0.1"


def resolve_resources(o: LaunchOptions) -> dict[str, list[int]]:
    """The hosts and slots DeepSpeed's runner will start ranks on, found by its own functions
    (deepspeed.launcher.runner: fetch_hostfile, parse_inclusion_exclusion,
    apply_num_nodes_and_gpus, in the order its `main` calls them), so that the pool waits for
    exactly the ranks the launcher starts. Without a hostfile the pool is `localhost` with the
    accelerator's device count, as in DeepSpeed. Bad options raise SpecError with DeepSpeed's reason."""
    from ..spec import SpecError

    from deepspeed.launcher.runner import apply_num_nodes_and_gpus, fetch_hostfile, parse_inclusion_exclusion

    if o.hostfile and not Path(o.hostfile).is_file():
        raise SpecError(f"--hostfile {o.hostfile}: no such file")
    if o.include and o.exclude:
        raise SpecError("--include and --exclude are mutually exclusive (DeepSpeed's rule)")
    if o.num_nodes is not None and (o.include or o.exclude):
        raise SpecError("--num-nodes cannot be combined with --include/--exclude (DeepSpeed's rule)")
    if o.num_nodes is not None and o.num_nodes > 1 and not o.hostfile:
        raise SpecError(f"--num-nodes {o.num_nodes}: more than one node needs a --hostfile (DeepSpeed's rule)")
    try:
        pool = fetch_hostfile(o.hostfile) if o.hostfile else None
    except ValueError as e:
        raise SpecError(f"--hostfile {o.hostfile}: {e}") from None
    if o.hostfile and not pool:
        raise SpecError(f"--hostfile {o.hostfile}: names no host")
    if not pool:
        from deepspeed.accelerator import get_accelerator

        pool = {"localhost": get_accelerator().device_count()}
    try:
        active = parse_inclusion_exclusion(pool, o.include or "", o.exclude or "")
    except ValueError as e:
        which = "--include" if o.include else "--exclude"
        known = "" if o.hostfile else f" (no --hostfile: DeepSpeed knows only {', '.join(f'{h} ({n} slots)' for h, n in pool.items())})"
        raise SpecError(f"{which} {o.include or o.exclude}: {e}{known}") from None
    active = apply_num_nodes_and_gpus(active, o.num_nodes if o.num_nodes is not None else -1, -1)
    if not active or not any(active.values()):
        raise SpecError("the launcher options leave no rank to start")
    return {h: list(s) for h, s in active.items()}


def launch_world_size(o: LaunchOptions) -> int | None:
    """The world size the DeepSpeed options fix (None: no option fixes it; the suite's world_size rules)."""
    if o.launcher != "deepspeed" or not (o.hostfile or o.include or o.exclude or o.num_nodes is not None):
        return None
    return sum(len(s) for s in resolve_resources(o).values())


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
    # a multi-node pool's ranks build under a per-host folder (worker._per_host_extensions_dir):
    # only this host's, whose compilers the check below can see (another host's may be building)
    locks = [p for pattern in ("*/lock", "*/*/lock", f"{socket.gethostname()}/*/*/lock") for p in root.glob(pattern)]
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


def release_shm_buffers(master_port: int | None, rank: str = "*") -> list[Path]:
    """Remove the shared-memory segments DeepSpeed's CPU comm op left for this rendezvous.

    deepspeed/ops/csrc/cpu/comm/shm.cpp creates /dev/shm/deepspeed_allreduce_buffer_*_ADDR_PORT_RANK
    (69 MB per rank in 0.19.8) and never unlinks it, at exit or otherwise: each launch on a
    fresh port leaks RAM until the host runs out (seen here: 7.7 GB after ~55 launches, then
    the OOM killer). The port in the name is the pool's own, so only its segments go (one
    rank's, given `rank`).
    """
    if master_port is None:
        return []
    gone = []
    for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{master_port}_{rank}"):
        try:
            p.unlink()
            gone.append(p)
        except OSError:
            pass
    return gone


def clear_stale_shm() -> list[Path]:
    """Remove DeepSpeed CPU-comm segments (deepspeed_allreduce_buffer_*_ADDR_PORT_RANK) whose
    launch is over: no socket of this host, listening or connected, uses their rendezvous
    port (every rank holds a connection to the TCP store on it while its process group
    lives; a TIME_WAIT leftover is not a user). What a driver killed mid-launch, or a rank
    killed before it could clean up, left behind; called at every pool start."""
    import psutil

    segments = list(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    if not segments:
        return []
    try:
        used = {p for c in psutil.net_connections("tcp") if c.status not in ("TIME_WAIT", "CLOSE", "CLOSE_WAIT")
                for p in ((c.laddr.port if c.laddr else None), (c.raddr.port if c.raddr else None)) if p}
    except (psutil.Error, OSError):
        return []
    gone = []
    for seg in segments:
        port = seg.name.rsplit("_", 2)[-2]
        if port.isdigit() and int(port) not in used:
            try:
                seg.unlink()
                gone.append(seg)
            except OSError:
                pass
    return gone


class LauncherProcess:
    """One run of DeepSpeed's launcher for `world_size` ranks of `llmbench.worker`."""

    def __init__(self, hw: Hardware, world_size: int, options: LaunchOptions, log_path: Path):
        self.hw, self.world_size, self.options, self.log_path = hw, world_size, options, Path(log_path)
        self.proc: subprocess.Popen | None = None
        self.master_port: int | None = None
        self.killed = False

    def worker_args(self, control: str, key_path: Path) -> list[str]:
        """The worker's own arguments: where the driver is, the key file (its path, never the
        secret), the backend, and the threads per rank (0: each rank divides its physical host's
        cores among the ranks on that host, which only the ranks can see across several nodes)."""
        threads = 0 if self.options.multi_node else self.hw.threads_per_rank
        args = ["--control", control, "--key", str(key_path), "--backend", self.hw.comm_backend,
                "--accelerator", self.hw.accelerator, "--threads", str(threads)]
        if self.hw.accelerator == "cpu":
            args += ["--memory-limit", self.options.rank_memory]
        if self.options.launcher == "deepspeed" and self.options.multi_node:
            args += ["--nodes", ",".join(resolve_resources(self.options))]
        return args

    def command(self, control: str, key_path: Path) -> list[str]:
        """The launcher's command line: DeepSpeed's runner (or `srun` inside a SLURM allocation)
        on a free rendezvous port, then the worker module and its arguments."""
        o = self.options
        self.master_port = free_port()
        if o.launcher == "srun":
            from .slurm import srun_command

            return srun_command(self.world_size, self.master_port) + [sys.executable, "-u", "-m", "llmbench.worker"] \
                + self.worker_args(control, key_path)
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(self.master_port), "--no_local_rank"]
        for flag, value in (("--hostfile", o.hostfile), ("--include", o.include), ("--exclude", o.exclude),
                            ("--num_nodes", o.num_nodes), ("--master_addr", o.master_addr), ("--ssh_port", o.ssh_port)):
            if value is not None:
                cmd += [flag, str(value)]
        if not (o.include or o.exclude or o.multi_node):
            cmd += ["--num_gpus", str(self.world_size)]
        cmd += o.extra
        return cmd + ["--module", "llmbench.worker"] + self.worker_args(control, key_path)

    def environment(self) -> dict:
        """The launcher's environment. Over SSH DeepSpeed's PDSH runner passes on only variables
        with a few prefixes (PYTHON*, NCCL*, ...) and the lines of a `.deepspeed_env` file, whose
        name it takes from DS_ENV_FILE (an absolute path works: runner.py joins it to ~ and .).
        So for several nodes the driver writes one next to its log: the user's own ~/.deepspeed_env
        and ./.deepspeed_env first, then what the ranks need from here (DS_ACCELERATOR, and
        TORCH_EXTENSIONS_DIR, MALLOC_* and LLMBENCH_* where set). No secret goes in it: those lines
        end up on the pdsh command line, where `ps` shows them on every host."""
        env = dict(os.environ)
        env.update(PYTHONUNBUFFERED="1")
        if not self.options.multi_node:
            env["OMP_NUM_THREADS"] = str(self.hw.threads_per_rank)
        if self.hw.accelerator == "cpu":
            env["DS_ACCELERATOR"] = "cpu"
        if self.options.launcher == "deepspeed" and self.options.multi_node:
            lines = []
            for base in (Path.home(), Path(".")):
                f = base / ".deepspeed_env"
                if f.is_file():
                    lines += [ln for ln in f.read_text().splitlines() if "=" in ln]
            passed = {k: v for k, v in env.items()
                      if k in ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR") or k.startswith(("MALLOC_", "LLMBENCH_"))}
            lines += [f"{k}={v}" for k, v in sorted(passed.items())]  # (DeepSpeed quotes them itself)
            if lines:  # (a blank line would crash DeepSpeed's runner: it splits every line at "=")
                env_file = self.log_path.with_suffix(".deepspeed_env")
                env_file.write_text("\n".join(lines) + "\n")
                env["DS_ENV_FILE"] = str(env_file.resolve())
        return env

    def start(self, control: str, key_path: Path) -> None:
        """Start the launcher in its own session (so its whole tree can be killed), logging to `log_path`."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = self.environment()
        cmd = self.command(control, key_path)
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
        remove this launch's shared-memory segments. The process group is killed even when
        the launcher itself is gone (killed, or exited): its ranks may outlive it."""
        if self.proc is None or self.killed:
            return
        import psutil

        try:
            family = psutil.Process(self.proc.pid).children(recursive=True) if self.running else []
        except psutil.NoSuchProcess:
            family = []
        if self.running and self.options.launcher == "srun":  # srun needs a moment to end its step on every node
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # SIGKILL: a stopped rank ignores SIGTERM until continued
        except (ProcessLookupError, PermissionError):
            pass
        for p in family:  # a child that left the process group is still ours
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait()
        self.killed = True  # (its process group is never signalled again: the id may be reused)
        release_shm_buffers(self.master_port)

    def log_tail(self, n: int = 30) -> str:
        """The log's last lines, DeepSpeed's [INFO] chatter left out."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        keep = [ln for ln in lines if "[INFO]" not in ln]
        return "\n".join(keep[-n:])
