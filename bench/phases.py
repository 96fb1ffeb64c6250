"""The driver's phases, for fault-injection tests: which one a kill hit.

`with phase("store-commit"):` around the driver's critical sections (a pool start, a trial's
store commit, a merge). Two test-only environment variables; unset, a phase costs one dict
lookup:

- LLMBENCH_PHASE_LOG=FILE: each phase's begin and end are appended to FILE as
  `TIME PID begin|end NAME` (time.time()), one line each, flushed at once, so a test that
  SIGKILLs the driver at a random moment reads which phase was open then.
- LLMBENCH_TEST_PAUSE=NAME[:N]: the N-th time (default 1) the driver reaches `pause_point(NAME)`
  (inside phase NAME, where a kill does the most harm: a transaction begun and not committed,
  a merge half done, ranks launched and not yet joined), it writes `TIME PID paused NAME` to
  the log and sleeps, so a test kills it there for certain.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Iterator

LOG_ENV, PAUSE_ENV = "LLMBENCH_PHASE_LOG", "LLMBENCH_TEST_PAUSE"
_entered: dict[str, int] = {}


def _log(event: str, name: str) -> None:
    path = os.environ.get(LOG_ENV)
    if path:
        with open(path, "a") as f:
            f.write(f"{time.time():.6f} {os.getpid()} {event} {name}\n")


@contextmanager
def phase(name: str) -> Iterator[None]:
    if not (os.environ.get(LOG_ENV) or os.environ.get(PAUSE_ENV)):
        yield
        return
    _log("begin", name)
    try:
        yield
    finally:
        _log("end", name)


def pause_point(name: str) -> None:
    """Where LLMBENCH_TEST_PAUSE=NAME[:N] stops the driver (the N-th time it gets here)."""
    pause, _, nth = (os.environ.get(PAUSE_ENV) or "").partition(":")
    if pause != name:
        return
    _entered[name] = _entered.get(name, 0) + 1
    if _entered[name] == int(nth or 1):
        _log("paused", name)
        while True:  # until the test's SIGKILL
            time.sleep(1)
