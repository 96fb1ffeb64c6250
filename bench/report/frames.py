"""Trial records → pandas frames (the one place the report's columns are derived)."""

from __future__ import annotations

import pandas as pd

from ..spec import compression

MiB = 2**20

COLUMNS = ["trial_id", "status", "model", "precision", "zero_stage", "micro_batch", "grad_accum", "global_batch",
           "world_size", "seq_len", "step_time_s", "tokens_per_s", "samples_per_s", "model_state_bytes",
           "peak_mem_bytes", "final_loss", "entropy_floor", "error"]


def is_inference(r: dict) -> bool:
    return r.get("scenario", "train") == "inference"


def split(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(training records, inference records): training figures and recommendations never see
    inference records, whose time and memory fields mean other things."""
    return [r for r in records if not is_inference(r)], [r for r in records if is_inference(r)]


def trials_frame(records: list[dict]) -> pd.DataFrame:
    """One row per trial with the record's scalar fields, plus MiB columns for the figures.

    Inference records also get one column per decode batch size (`decode_tokens_per_s_b4`),
    so CSV and Parquet carry them as plain numbers."""
    df = pd.DataFrame.from_records(records)
    if df.empty:
        return pd.DataFrame(columns=COLUMNS)
    if "scenario" not in df:
        df["scenario"] = "train"
    df["scenario"] = df["scenario"].fillna("train")
    if "decode_tokens_per_s" in df:
        batches = sorted({b for d in df["decode_tokens_per_s"] if isinstance(d, dict) for b in d}, key=int)
        for b in batches:
            df[f"decode_tokens_per_s_b{b}"] = [d.get(b) if isinstance(d, dict) else None for d in df["decode_tokens_per_s"]]
            df[f"decode_latency_s_per_token_b{b}"] = [d.get(b) if isinstance(d, dict) else None
                                                      for d in df.get("decode_latency_s_per_token", [None] * len(df))]
    for col in ("mfu", "mfu_vs_measured_peak", "fwd_s", "bwd_compute_s", "comm_s", "optimizer_s", "allgather_s", "other_mem_bytes",
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


def _change(new, old) -> float | None:
    return None if new is None or not old else new / old - 1


def method(r: dict) -> str:
    """An inference record's compression: none, int8-wo, magnitude-50, magnitude-50+int8-wo, 2:4+fp8-dyn."""
    return compression(r.get("prune"), r.get("quant"))


def quant_frame(records: list[dict]) -> pd.DataFrame:
    """One row per inference trial (its compression `method`: quantization, pruning or both)
    with its change against the uncompressed trial of the same run (same model, family,
    precision and sequence length): decode tokens/s per batch size, weight bytes, perplexity.
    Changes are fractions (+0.05 = 5% more)."""
    inf = [r for r in records if is_inference(r)]
    cols = ["trial_id", "method", "quant", "prune", "status", "error", "precision", "weight_bytes", "weight_bytes_reference",
            "weight_sparsity", "perplexity", "prefill_latency_s", "decode_tokens_per_s", "weight_change", "perplexity_change",
            "prefill_change", "decode_change", "same_batches"]
    rows = []
    for r in inf:
        key = (r["model"], r.get("family"), r["precision"], r["seq_len"])
        ref = next((x for x in inf if method(x) == "none" and x["status"] == "ok"
                    and (x["model"], x.get("family"), x["precision"], x["seq_len"]) == key), None)
        tps = r.get("decode_tokens_per_s") or {}
        ref_tps = (ref or {}).get("decode_tokens_per_s") or {}
        rows.append({
            "trial_id": r["trial_id"], "method": method(r), "quant": r["quant"], "prune": r.get("prune") or "none",
            "weight_sparsity": r.get("weight_sparsity"), "status": r["status"], "error": r.get("error"),
            "precision": r["precision"], "weight_bytes": r.get("weight_bytes"),
            "weight_bytes_reference": r.get("weight_bytes_reference"), "perplexity": r.get("perplexity"),
            "prefill_latency_s": r.get("prefill_latency_s"), "decode_tokens_per_s": tps,
            "weight_change": _change(r.get("weight_bytes"), (ref or {}).get("weight_bytes")),
            "perplexity_change": _change(r.get("perplexity"), (ref or {}).get("perplexity")),
            "prefill_change": _change(r.get("prefill_latency_s"), (ref or {}).get("prefill_latency_s")),
            "decode_change": {b: _change(v, ref_tps.get(b)) for b, v in tps.items() if ref_tps.get(b)},
            "same_batches": None if ref is None else r.get("eval_batches_sha256") == ref.get("eval_batches_sha256"),
            "ref": ref,
        })
    return pd.DataFrame(rows, columns=cols + ["ref"])
