"""What ended a rank or a launcher: an exit status read as a signal or a code, and the state
of rank processes the driver can see.

DeepSpeed's launcher passes a failed rank's status on: `launcher/launch.py` calls
`sys.exit(process.returncode)` with the first non-zero one, which for a rank killed by signal
N is -N, so the launcher exits with 256 − N (Python's `sys.exit(-9)` is status 247), and its
runner (`launcher/runner.py`) exits with that. A shell reports a signal as 128 + N, and
Python's `Popen.returncode` as −N. `pdsh -S` (DeepSpeed's PDSH runner) returns the largest
remote status.
"""

from __future__ import annotations

import signal
import socket


def signal_of(code: int | None) -> int | None:
    """The signal an exit status stands for, where it stands for one."""
    if code is None or code == 0:
        return None
    if code < 0:
        return -code
    if 192 < code < 255:      # sys.exit(-N): DeepSpeed's launch.py passing on a rank's −N (255: ssh's own error)
        return 256 - code
    if 128 < code <= 192:     # a shell's 128 + N
        return code - 128
    return None


def describe_exit(code: int | None) -> str:
    """'killed by SIGKILL (exit status 247)', 'exit code 1', 'still running'."""
    if code is None:
        return "still running"
    sig = signal_of(code)
    if sig is not None:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"killed by {name} (exit status {code})"
    return f"exit code {code}"


def local_states(pids: dict[int, int], hosts: dict[int, str]) -> dict[int, str]:
    """{rank: psutil status} of the ranks running on this host ("stopped", "running",
    "sleeping", "zombie", "gone"); ranks on other hosts are left out."""
    import psutil

    here = {socket.gethostname(), "localhost", ""}
    out = {}
    for rank, pid in pids.items():
        if pid is None or hosts.get(rank, "") not in here:
            continue
        try:
            out[rank] = psutil.Process(pid).status()
        except psutil.NoSuchProcess:
            out[rank] = "gone"
    return out


def kill_left(pids: dict[int, int], hosts: dict[int, str], wait_s: float = 5.0) -> list[int]:
    """SIGKILL every rank process of this host still alive (a stopped one ignores SIGTERM until
    it is continued; SIGKILL ends it at once), wait for them; the pids still there after `wait_s`."""
    import psutil

    procs = []
    for rank, state in local_states(pids, hosts).items():
        if state != "gone":
            try:
                p = psutil.Process(pids[rank])
                p.kill()
                procs.append(p)
            except psutil.Error:  # gone meanwhile, or not ours to signal
                pass
    _, alive = psutil.wait_procs(procs, timeout=wait_s)
    left = []
    for p in alive:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(p.pid)
        except psutil.Error:
            pass
    return left
