"""A warm pool of ranks: one DeepSpeed launch per world size, reused across trials.

The pool starts the launcher (process.py) with the driver's end of the control channel
(control.py), waits until every rank has joined the process group, then sends each job to
every rank and collects their results. `run()` always returns a `PoolRun`; after a failed
job the launch is killed and the next job starts a fresh one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..env import Hardware
from ..phases import pause_point, phase
from .control import DriverChannel, read_key, write_key
from .exits import describe_exit, kill_left, local_states, signal_of
from .process import LauncherProcess, LaunchOptions, clear_stale_extension_locks, clear_stale_shm, extensions_dir
from .watchdog import STALL_FACTOR, STALL_FLOOR_S, Progress


def key_dir() -> Path:
    """Where a pool's control key file goes: LLMBENCH_KEY_DIR, else ~/.cache/llmbench/keys
    (on a cluster the home directory is the one place every node reads, like the code)."""
    import os

    return Path(os.environ.get("LLMBENCH_KEY_DIR") or Path.home() / ".cache" / "llmbench" / "keys")


@dataclass
class PoolRun:
    """What a job on the pool came to.

    `reported`: the ranks' results are here to aggregate (each carries its own status; after a
    rank reported a failure and the others did not follow within the grace period, only some
    are). `failed` or `timeout`: the pool could not run the job to its end (start-up failed, a
    rank died, the job outlived its limit); `error` says why, and the launch is gone."""

    status: str
    results: list[dict] = field(default_factory=list)
    error: str | None = None

    @property
    def reported(self) -> bool:
        return self.status == "reported"


class RankPool:
    """A pool of ranks of one world size, reused across trials until a trial fails."""

    def __init__(self, hw: Hardware, world_size: int, log_path: Path, options: LaunchOptions | None = None,
                 startup_timeout_s: float = 600.0, grace_s: float = 15.0,
                 stall_factor: float = STALL_FACTOR, stall_floor_s: float = STALL_FLOOR_S):
        self.hw, self.world_size, self.log_path = hw, world_size, Path(log_path)
        self.stall_factor, self.stall_floor_s = stall_factor, stall_floor_s
        self.progress: Progress | None = None  # the current job's beats (tests watch it to inject faults mid-window)
        self.options = options or LaunchOptions()
        self.startup_timeout_s, self.grace_s = startup_timeout_s, grace_s
        self.launcher: LauncherProcess | None = None
        self.channel: DriverChannel | None = None
        self.ready: dict[int, dict] = {}
        self.key_path: Path | None = None
        self.refused: list[str] = []  # strangers the control channel turned away, over the pool's life
        self.start_s = 0.0
        self.starts = 0
        self.cleared_locks: list[Path] = []
        self.cleared_shm: list[Path] = []

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.launcher is not None and self.launcher.running and len(self.ready) == self.world_size

    @property
    def pids(self) -> dict[int, int]:
        """Each rank's process id (from its hello)."""
        return dict(self.channel.pids) if self.channel else {}

    def start(self) -> PoolRun | None:
        """Launch the ranks and wait until all are ready; a PoolRun with the cause if they are not."""
        with phase("pool-start"):
            return self._start()

    def _start(self) -> PoolRun | None:
        t0 = time.perf_counter()
        self.cleared_locks = clear_stale_extension_locks()
        self.cleared_shm = clear_stale_shm()
        self.ready = {}
        try:
            self.key_path = write_key(key_dir())
            bind, advertise = self.options.control_endpoint()
            self.channel = DriverChannel(read_key(self.key_path), bind, advertise, on_refused=self._log_refused)
            self.launcher = LauncherProcess(self.hw, self.world_size, self.options, self.log_path)
            self.launcher.start(self.channel.address, self.key_path)
        except Exception as e:  # noqa: BLE001  (a bad --control-addr, no srun, scontrol failing, ...)
            self.kill()
            return PoolRun("failed", error=f"the ranks could not be launched: {type(e).__name__}: {e}")
        self.starts += 1
        pause_point("pool-start")  # tests: killed with the ranks launched, not yet joined
        deadline = time.monotonic() + self.startup_timeout_s
        next_lock_check = time.monotonic() + 10
        while len(self.ready) < self.world_size:
            event = self.channel.next(0.2)
            if event is None:
                if time.monotonic() > next_lock_check:
                    self.cleared_locks += clear_stale_extension_locks()
                    next_lock_check = time.monotonic() + 10
                if not self.launcher.running:
                    code = self.launcher.returncode
                    self.kill()
                    return PoolRun("failed", error=f"the DeepSpeed launcher exited with code {code} before all "
                                                   f"ranks were ready:\n{self.launcher.log_tail()}")
                if time.monotonic() > deadline:
                    why = self._missing()
                    self.kill()
                    return PoolRun("timeout", error=f"ranks not ready after {self.startup_timeout_s:.0f}s: {why}:\n"
                                                    f"{self.launcher.log_tail()}")
                continue
            rank, msg = event
            if msg["type"] == "ready":
                self.ready[rank] = msg
        self.start_s = time.perf_counter() - t0
        return None

    def _missing(self) -> str:
        """Which ranks the pool is still waiting for, and what that usually means."""
        connected = set(self.channel.pids) if self.channel else set()
        absent = [r for r in range(self.world_size) if r not in connected]
        joining = [r for r in sorted(connected) if r not in self.ready]
        parts = []
        if absent:
            parts.append(f"rank(s) {', '.join(map(str, absent))} of {self.world_size} never reached the control "
                         f"channel at {self.channel.address if self.channel else '?'} (not started by the launcher, "
                         f"or unable to reach this address)")
        if joining:
            parts.append(f"rank(s) {', '.join(map(str, joining))} connected but never joined the process group "
                         f"(waiting for absent peers, the rendezvous, or a JIT-build lock under {extensions_dir()})")
        return "; ".join(parts) or "no rank reported"

    def _log_refused(self, line: str) -> None:
        self.refused.append(line)
        try:
            with open(self.log_path, "a") as f:
                f.write(f"llmbench control: {line}\n")
        except OSError:
            pass

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the ranks to leave cleanly (they leave the process group and say bye), then
        end the launcher's session: its own exit polling would cost seconds more."""
        if self.launcher is not None and self.launcher.running and self.channel and self.channel.conns:
            try:
                self.channel.send_all({"type": "stop"})
                gone: set = set()
                deadline = time.monotonic() + timeout_s
                while len(gone) < len(self.channel.conns) and time.monotonic() < deadline:
                    event = self.channel.next(0.1)
                    if event is None:
                        if not self.launcher.running:
                            break
                        continue
                    if event[1]["type"] in ("bye", "eof"):
                        gone.add(event[0])
            except OSError:
                pass
        self.kill()

    def kill(self) -> str:
        """End the launcher and every rank, close the channel. The rank processes of this host
        still there after the launcher's process group was killed get SIGKILL one by one (one
        that left the group, a stopped one); returns what is left after that ("" when nothing)."""
        left: list[int] = []
        if self.launcher is not None:
            self.launcher.kill()
        if self.channel is not None:
            left = kill_left(self.channel.pids, self.channel.hosts)
            self.channel.close()
            self.channel.pids, self.channel.hosts = {}, {}  # (never signalled again: a pid may be reused)
        if self.key_path is not None:
            self.key_path.unlink(missing_ok=True)
            self.key_path = None
        self.ready = {}
        return f"; rank processes still alive after SIGKILL: {left}" if left else ""

    def log_tail(self, n: int = 30) -> str:
        return self.launcher.log_tail(n) if self.launcher else ""

    def _launcher_gone(self, trial_id: str, results: dict[int, dict]) -> PoolRun:
        """The launcher exited during a job. What the ranks said before they went is read first:
        a rank that died (its connection closed without a result) is the cause, and the
        launcher's status is then that rank's (_died); else the launcher itself ended (killed,
        or its node's connection lost) and its ranks are killed."""
        drain_until = time.monotonic() + 1.0  # what was sent before the end, not a window's worth of beats
        while time.monotonic() < drain_until and (event := self.channel.next(0.3)) is not None:
            rank, msg = event
            if msg["type"] == "result" and msg.get("trial_id") == trial_id:
                results[rank] = msg
            elif msg["type"] == "eof" and rank not in results:
                return self._died(rank, results)
        if results and any(r["status"] != "ok" for r in results.values()):
            self.kill()
            return PoolRun("reported", [results[r] for r in sorted(results)])
        code = self.launcher.returncode
        tail = self.launcher.log_tail()
        left = self.kill()
        return PoolRun("failed", [results[r] for r in sorted(results)],
                       error=f"DeepSpeed's launcher ended during the trial ({describe_exit(code)}); its ranks were "
                             f"killed{left}:\n{tail}")

    def _died(self, rank: int, results: dict[int, dict]) -> PoolRun:
        """A rank's connection closed before its result: the rank died. DeepSpeed's launcher
        notices within a second, ends the other ranks and exits with the dead rank's status
        (exits.py); that status names the signal. The ranks that did report are kept."""
        pid, host = self.channel.pids.get(rank), self.channel.hosts.get(rank, "")
        deadline = time.monotonic() + self.grace_s
        while self.launcher.running and time.monotonic() < deadline:
            time.sleep(0.1)
        code = self.launcher.returncode
        tail = self.launcher.log_tail()
        left = self.kill()
        who = "srun" if self.options.launcher == "srun" else "DeepSpeed's launcher"
        cause = f"{describe_exit(code)}, as {who} passed it on" if code is not None else \
            f"its exit status unknown ({who} was still running {self.grace_s:.0f}s later)"
        hint = "; SIGKILL is also what the host's OOM killer sends" if signal_of(code) == 9 else ""
        return PoolRun("failed", [results[r] for r in sorted(results)],
                       error=f"rank {rank} (pid {pid} on {host or '?'}) died during the trial: {cause}{hint}; "
                             f"the other ranks were ended{left}:\n{tail}")

    # -- jobs ----------------------------------------------------------------------------------
    def run(self, trial_id: str, spec: dict, timeout_s: float, base_config: dict | None = None,
            trace_dir: str | None = None, kind: str = "trial",
            on_row: Callable[[int, dict], None] | None = None) -> PoolRun:
        """Run one job on every rank (starting the launch if needed). Rows a rank streams before
        its result (kernel cases) go to `on_row(rank, row)` as they arrive."""
        if not self.alive:
            self.kill()
            failed = self.start()
            if failed is not None:
                return failed
        self.channel.drain()
        try:
            self.channel.send_all({"type": kind, "trial_id": trial_id, "spec": spec, "base_config": base_config,
                                   "trace_dir": trace_dir})
        except OSError as e:  # a rank died while the pool was idle
            self.kill()
            return PoolRun("failed", error=f"a rank was gone before the trial started ({e}):\n{self.log_tail()}")
        results: dict[int, dict] = {}
        deadline = time.monotonic() + timeout_s
        first_failure = None
        self.progress = progress = Progress(self.stall_factor, self.stall_floor_s)

        def partial() -> PoolRun:  # some rank failed; what the others reported is kept
            self.kill()
            return PoolRun("reported", [results[r] for r in sorted(results)])

        next_check = 0.0
        while len(results) < self.world_size:
            event = self.channel.next(0.2)
            now = time.monotonic()
            if now > deadline:  # checked on every event too: streamed rows cannot postpone it
                self.kill()
                return PoolRun("timeout", error=f"trial exceeded its {timeout_s:.0f}s limit; all its processes were killed")
            # the watchdog looks when the queue is drained (beats waiting in it are not silence) and
            # no rank has reported a failure yet (then the grace period decides, keeping its cause)
            late = progress.stalled(set(results), now) if event is None and first_failure is None else None
            if late:
                why = progress.describe(late, local_states(self.channel.pids, self.channel.hosts))
                left = self.kill()
                return PoolRun("timeout", [results[r] for r in sorted(results)],
                               error=f"{why}; every process of the pool was killed (SIGKILL){left}")
            if event is not None:
                rank, msg = event
                if msg["type"] == "beat" and msg.get("trial_id") == trial_id:
                    progress.beat(rank, msg.get("step"), bool(msg.get("watch")), now)
                elif msg["type"] == "row" and msg.get("trial_id") == trial_id and on_row is not None:
                    on_row(rank, msg["row"])
                elif msg["type"] == "result" and msg.get("trial_id") == trial_id:
                    results[rank] = msg
                    if msg["status"] != "ok" and first_failure is None:
                        first_failure = time.monotonic()
                elif msg["type"] == "eof" and rank not in results:
                    return self._died(rank, results)
            if now >= next_check:  # the launcher, twice a second, whether or not the ranks talk
                next_check = now + 0.5
                if not self.launcher.running:
                    return self._launcher_gone(trial_id, results)
            if first_failure is not None and now > first_failure + self.grace_s:
                return partial()
        clean = kind == "inference" and all(r["status"] in ("ok", "unsupported") for r in results.values())
        if any(r["status"] != "ok" for r in results.values()) and not clean:
            self.kill()  # the next trial starts on a clean pool
        # (a single-process inference trial refused by torchao leaves its process clean: no
        # collective is pending and its model is freed, so the pool is kept)
        return PoolRun("reported", [results[r] for r in sorted(results)])
