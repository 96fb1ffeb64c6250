"""The `llmbench` command line (Typer): thin wrappers over spec → plan → sweep → store → report.

One module per group of commands; each command parses its options, calls the library and
prints. `main` is the console script: it turns a usage error (an unknown option, a value not
among a choice's) into the same one-line error and exit code 2 as every other bad input.
"""

from __future__ import annotations

from . import gate, info, kernels, plan, project, results, sweep  # noqa: F401  (each module registers its commands)
from .app import app, main

__all__ = ["app", "main"]
