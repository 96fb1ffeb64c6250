"""Trial records → pandas frames (the one place the report's columns are derived)."""

from __future__ import annotations

import pandas as pd

MiB = 2**20

COLUMNS = ["trial_id", "status", "model", "precision", "zero_stage", "micro_batch", "grad_accum", "global_batch",
           "world_size", "seq_len", "step_time_s", "tokens_per_s", "samples_per_s", "model_state_bytes",
           "peak_mem_bytes", "final_loss", "entropy_floor", "error"]


def trials_frame(records: list[dict]) -> pd.DataFrame:
    """One row per trial with the record's scalar fields, plus MiB columns for the figures."""
    df = pd.DataFrame.from_records(records)
    if df.empty:
        return pd.DataFrame(columns=COLUMNS)
    for col in ("mfu", "mfu_vs_measured_peak", "fwd_s", "bwd_compute_s", "comm_s", "optimizer_s", "other_mem_bytes",
                "peak_mem_baseline_bytes", "activation_checkpointing", "offload"):
        if col not in df:  # records from older llmbench versions
            df[col] = None
    df["model_state_mib"] = df["model_state_bytes"].astype(float) / MiB
    df["peak_mem_mib"] = df["peak_mem_bytes"].astype(float) / MiB
    # On CPU the peak is the process RSS: the part present when the trial started (Python,
    # torch, DeepSpeed) is the baseline; the rest of the peak is activations, buffers, temporaries.
    base = df["peak_mem_baseline_bytes"] if "peak_mem_baseline_bytes" in df else pd.Series(0, index=df.index)
    df["baseline_mib"] = base.astype(float).fillna(0) / MiB
    df["rest_mib"] = (df["peak_mem_mib"] - df["baseline_mib"] - df["model_state_mib"]).clip(lower=0)
    df["config"] = "ZeRO-" + df["zero_stage"].astype(str) + " mb" + df["micro_batch"].astype(str)
    return df


def loss_frame(records: list[dict]) -> pd.DataFrame:
    """Long format: one row per (trial, step) with the loss averaged over ranks."""
    rows = [{"trial_id": r["trial_id"], "zero_stage": r["zero_stage"], "micro_batch": r["micro_batch"],
             "precision": r["precision"], "step": i + 1, "loss": loss}
            for r in records if r["status"] == "ok" for i, loss in enumerate(r["losses"])]
    return pd.DataFrame(rows, columns=["trial_id", "zero_stage", "micro_batch", "precision", "step", "loss"])
