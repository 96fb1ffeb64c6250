"""The control channel between the driver and its ranks: newline-delimited JSON over TCP.

Messages (the `type` key):
- rank → driver: `hello` (rank, pid, host: the first message), `ready` (joined the process
  group: world size, device, start-up seconds, threads), `row` (a partial result streamed
  while a job runs: a finished kernel case), `result` (a job's outcome), `bye` (leaving).
- driver → rank: a job (`trial`, `inference`, `bare`, `kernels`: trial_id, spec, base
  config, trace dir), `stop`.
- `eof` is not sent: the driver's reader puts it on the queue when a rank's connection closes.

When the driver goes away, its rank's connection closes, and the rank leaves at once
(`RankChannel`), even from inside a collective, so no rank outlives its sweep.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import threading
from typing import Callable


class DriverChannel:
    """The driver's end: a listening socket, one reader thread per rank, one event queue.

    Events are (rank, message) pairs; a closed connection yields (rank, {"type": "eof"})."""

    def __init__(self, multi_node: bool):
        bind = "0.0.0.0" if multi_node else "127.0.0.1"
        self.server = socket.create_server((bind, 0))
        host = socket.gethostname() if multi_node else "127.0.0.1"
        self.address = f"{host}:{self.server.getsockname()[1]}"
        self.events: queue.Queue = queue.Queue()
        self.conns: dict[int, socket.socket] = {}
        self.pids: dict[int, int] = {}
        threading.Thread(target=self._accept, daemon=True, name="llmbench-accept").start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
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

    When the connection closes (the driver finished, was killed or crashed), `on_driver_gone`
    runs and the process exits at once with `exit_code`, whatever the main thread is doing."""

    def __init__(self, address: str, on_driver_gone: Callable[[], None] | None = None, exit_code: int = 75):
        host, _, port = address.rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        self.sock.settimeout(None)
        self.inbox: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._gone, self._exit_code = on_driver_gone, exit_code
        threading.Thread(target=self._read, daemon=True, name="llmbench-control").start()

    def _read(self) -> None:
        for line in self.sock.makefile("r", encoding="utf-8"):
            self.inbox.put(json.loads(line))
        # EOF: a rank blocked in a collective would otherwise wait forever
        if self._gone is not None:
            self._gone()
        os._exit(self._exit_code)

    def send(self, msg: dict) -> None:
        data = (json.dumps(msg) + "\n").encode()
        with self._lock:
            self.sock.sendall(data)
