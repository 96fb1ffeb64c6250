"""The Python API: a run's trials as a pandas DataFrame.

    >>> from llmbench.api import load_trials
    >>> df = load_trials("reports/llmbench.db")          # the latest run
    >>> df[["trial_id", "zero_stage", "tokens_per_s", "mfu_vs_measured_peak"]]
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .report.frames import trials_frame
from .store import Store


def load_trials(db: str | Path = "reports/llmbench.db", run_id: str | None = None) -> pd.DataFrame:
    """Every trial of a run (the latest by default), one row each, every record field a column."""
    if not Path(db).exists():
        raise FileNotFoundError(f"no llmbench store at {db}")
    store = Store(db)
    run = store.run(run_id)
    if run is None:
        raise KeyError(f"run {run_id!r} not found in {db}")
    return trials_frame(store.trials(run["run_id"]))
