"""Helpers shared by the tests."""

import os
import subprocess
import sys


def llmbench(*args, cwd=None, timeout=900, check=True, env=None):
    """Run the real CLI in a subprocess, as a user would (in `env`, else this process's environment)."""
    env = dict(env if env is not None else os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, "-m", "llmbench.cli", *args], capture_output=True, text=True, cwd=cwd,
                       timeout=timeout, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"llmbench {' '.join(args)} exited {p.returncode}\nstdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-4000:]}")
    return p


# the test-only slowdown of gate_db's third run (conftest.py): every step of these trials twice as long
SLOWDOWN, SLOWED = 1.0, ("z1-mb4", "z2-mb8")
