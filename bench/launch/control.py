"""The control channel between the driver and its ranks: newline-delimited JSON over TCP,
each connection authenticated before the driver takes a message from it.

Authentication: the driver draws a per-pool secret and writes it to a file only its owner can
read (`write_key`, mode 0600); ranks get the file's path on their command line, never the
secret itself (DeepSpeed's PDSH runner puts `export K=V;` on the pdsh command line, where
`ps` shows it on every host). On each new connection the driver sends a random challenge;
the rank's first line must be its `hello` carrying HMAC-SHA256(secret, challenge) (the
challenge-response `multiprocessing.connection` uses with an `authkey`). A peer that answers
anything else, too late or with the wrong digest is refused: its connection is closed, the
refusal logged (`DriverChannel.refused`, `on_refused`), and it never reaches the pool.

Messages (the `type` key):
- driver → rank, once per connection: `challenge` (nonce).
- rank → driver: `hello` (rank, pid, host, auth: the first message), `ready` (joined the process
  group: world size, device, start-up seconds, threads), `row` (a partial result streamed
  while a job runs: a finished kernel case), `result` (a job's outcome), `bye` (leaving).
- driver → rank: a job (`trial`, `inference`, `bare`, `kernels`: trial_id, spec, base
  config, trace dir), `stop`.
- `eof` is not sent: the driver's reader puts it on the queue when a rank's connection closes.

When the driver goes away, its rank's connection closes, and the rank leaves at once
(`RankChannel`), even from inside a collective, so no rank outlives its sweep.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import queue
import secrets
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Callable

HANDSHAKE_S = 20.0  # a peer that has not proved itself by then (in all) is refused
MAX_HELLO = 64 * 1024  # bytes: a hello is a few hundred


class _Lines:
    """Newline-delimited messages from a socket, with an overall deadline for the next one
    (the handshake's) and a length limit before a peer has proved itself."""

    def __init__(self, conn: socket.socket):
        self.conn, self.buf = conn, b""

    def next(self, deadline: float | None) -> str | None:
        """The next line (text), None at end of stream; TimeoutError past `deadline`."""
        while b"\n" not in self.buf:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 or len(self.buf) > MAX_HELLO:
                    raise TimeoutError("no complete line in time")
                self.conn.settimeout(left)
            else:
                self.conn.settimeout(None)
            chunk = self.conn.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode("utf-8")


def write_key(directory: Path) -> Path:
    """A fresh 32-byte secret in a new file under `directory` that only its owner can read
    (created 0600 with O_EXCL: no moment when another user could open it). The ranks must
    reach this path: on several hosts, a directory they share (the home directory on most
    clusters, as the code and the environment already are). Files of this host's drivers that
    died without removing theirs (SIGKILL) go first: the name holds the host and the pid."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    host = socket.gethostname()
    for old in directory.glob(f"pool-{host}-*.key"):
        pid = old.name[len(f"pool-{host}-"):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            old.unlink(missing_ok=True)
    path = directory / f"pool-{host}-{os.getpid()}-{secrets.token_hex(8)}.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32).hex().encode())
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_key(path: str | Path) -> bytes:
    """The secret a rank proves itself with; refused (ValueError) if anyone but its owner could read it."""
    st = os.stat(path)
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"control key {path} is readable by others (mode {stat.S_IMODE(st.st_mode):o}); it must be 0600")
    if st.st_uid != os.getuid():
        raise ValueError(f"control key {path} belongs to uid {st.st_uid}, not to this process's {os.getuid()}")
    return Path(path).read_bytes().strip()


def digest(key: bytes, nonce: str) -> str:
    return hmac.new(key, nonce.encode(), hashlib.sha256).hexdigest()


class DriverChannel:
    """The driver's end: a listening socket, one reader thread per rank, one event queue.

    Events are (rank, message) pairs from authenticated ranks; a closed connection yields
    (rank, {"type": "eof"}). `bind` is the address to listen on (loopback for one node; for
    several, one the other hosts reach), `advertise` the name the ranks connect to."""

    def __init__(self, key: bytes, bind: str = "127.0.0.1", advertise: str | None = None,
                 on_refused: Callable[[str], None] | None = None):
        self.key = key
        self.server = socket.create_server((bind, 0))
        self.address = f"{advertise or bind}:{self.server.getsockname()[1]}"
        self.events: queue.Queue = queue.Queue()
        self.conns: dict[int, socket.socket] = {}
        self.pids: dict[int, int] = {}
        self.hosts: dict[int, str] = {}
        self.refused: list[str] = []
        self.on_refused = on_refused
        self._pending = threading.BoundedSemaphore(64)  # connections at once still in their handshake
        threading.Thread(target=self._accept, daemon=True, name="llmbench-accept").start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _refuse(self, conn: socket.socket, peer, why: str) -> None:
        line = f"refused a control connection from {peer[0]}:{peer[1]}: {why}"
        self.refused.append(line)
        if self.on_refused is not None:
            self.on_refused(line)
        try:
            conn.close()
        except OSError:
            pass

    def _handshake(self, conn: socket.socket, peer, lines: "_Lines") -> dict | None:
        """The peer's hello if it answers the challenge with the right digest within
        HANDSHAKE_S in all, else None (refused, whatever it sent)."""
        nonce = secrets.token_hex(16)
        try:
            conn.sendall((json.dumps({"type": "challenge", "nonce": nonce}) + "\n").encode())
            line = lines.next(time.monotonic() + HANDSHAKE_S)
        except (OSError, TimeoutError) as e:
            self._refuse(conn, peer, f"no answer to the challenge ({type(e).__name__})")
            return None
        msg, ok = None, False
        try:
            msg = json.loads(line) if line else None
            auth = msg.get("auth") if isinstance(msg, dict) else None
            ok = (msg.get("type") == "hello" and isinstance(auth, str) and isinstance(msg.get("rank"), int)
                  and hmac.compare_digest(auth.encode(), digest(self.key, nonce).encode()))
        except (ValueError, AttributeError):
            pass
        if not ok:
            what = "a hello without the pool's key" if isinstance(msg, dict) and msg.get("type") == "hello" else \
                "no hello" if not line else "not a hello"
            self._refuse(conn, peer, what)
            return None
        return msg

    def _read(self, conn: socket.socket) -> None:
        try:
            peer = conn.getpeername()
        except OSError:
            return
        if not self._pending.acquire(blocking=False):  # a flood of connections: refuse, don't queue threads
            self._refuse(conn, peer, "too many connections waiting to authenticate")
            return
        lines = _Lines(conn)
        try:
            msg = self._handshake(conn, peer, lines)
        except Exception as e:  # noqa: BLE001  whatever a stranger sends, it is refused, never a traceback
            self._refuse(conn, peer, f"unreadable handshake ({type(e).__name__})")
            msg = None
        finally:
            self._pending.release()
        if msg is None:
            return
        rank = msg["rank"]
        self.conns[rank], self.pids[rank], self.hosts[rank] = conn, msg.get("pid"), msg.get("host", "")
        self.events.put((rank, msg))
        try:
            while True:
                line = lines.next(None)
                if line is None:
                    break
                self.events.put((rank, json.loads(line)))
        except (OSError, ValueError):
            pass
        self.events.put((rank, {"type": "eof"}))

    def next(self, timeout: float) -> tuple[int | None, dict] | None:
        """The next event, or None after `timeout` seconds without one."""
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def drain(self) -> None:
        """Forget events left from an earlier job."""
        while not self.events.empty():
            self.events.get_nowait()

    def send_all(self, msg: dict) -> None:
        data = (json.dumps(msg) + "\n").encode()
        for conn in self.conns.values():
            conn.sendall(data)

    def close(self) -> None:
        for conn in self.conns.values():
            try:
                conn.close()
            except OSError:
                pass
        self.server.close()
        self.conns = {}


class RankChannel:
    """A rank's end: one connection to the driver; messages from it arrive on `inbox`.

    The first message, `hello`, answers the driver's challenge with the pool's secret (read
    from `key_path`). When the connection closes (the driver finished, was killed or crashed),
    `on_driver_gone` runs and the process exits at once with `exit_code`, whatever the main
    thread is doing."""

    def __init__(self, address: str, key_path: str | Path, hello: dict,
                 on_driver_gone: Callable[[], None] | None = None, exit_code: int = 75):
        host, _, port = address.rpartition(":")
        key = read_key(key_path)
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        self.reader = self.sock.makefile("r", encoding="utf-8")
        challenge = json.loads(self.reader.readline(MAX_HELLO) or "{}")
        if challenge.get("type") != "challenge":
            raise ConnectionError(f"the driver at {address} sent no challenge")
        self.sock.settimeout(None)
        self.inbox: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._gone, self._exit_code = on_driver_gone, exit_code
        self.send({**hello, "type": "hello", "auth": digest(key, challenge["nonce"])})
        threading.Thread(target=self._read, daemon=True, name="llmbench-control").start()

    def _read(self) -> None:
        for line in self.reader:
            self.inbox.put(json.loads(line))
        # EOF: a rank blocked in a collective would otherwise wait forever
        if self._gone is not None:
            self._gone()
        os._exit(self._exit_code)

    def send(self, msg: dict) -> None:
        data = (json.dumps(msg) + "\n").encode()
        with self._lock:
            self.sock.sendall(data)
