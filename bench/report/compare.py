"""Two runs side by side: matched trials, the change in each figure, and whether it exceeds the noise."""

from __future__ import annotations

from .guidance import tokens_ci

FIGURES = [  # (field, label, higher is better)
    ("tokens_per_s", "tokens/s", True),
    ("step_time_s", "step s", False),
    ("mfu_vs_measured_peak", "MFU (measured peak)", True),
    ("mfu", "MFU", True),
    ("model_state_bytes", "model-state bytes", False),
    ("peak_mem_bytes", "peak bytes", False),
    ("final_loss", "final loss", False),
    # inference records
    ("prefill_latency_s", "prefill s", False),
    ("weight_bytes", "weight bytes", False),
    ("perplexity", "perplexity", False),
]


def significant(field: str, a: dict, b: dict) -> bool | None:
    """Beyond the noise? Throughput and step time: the two runs' 95% intervals do not overlap.
    Byte counts do not depend on time: any change is real. Other figures: not judged (None)."""
    if field in ("tokens_per_s", "step_time_s"):
        if not a.get("step_time_ci95_s") or not b.get("step_time_ci95_s"):
            return None
        (alo, ahi), (blo, bhi) = tokens_ci(a), tokens_ci(b)
        return bhi < alo or blo > ahi
    if field in ("model_state_bytes", "weight_bytes"):
        return a[field] != b[field]
    if field == "prefill_latency_s":
        if not a.get("prefill_latency_ci95_s") or not b.get("prefill_latency_ci95_s"):
            return None
        (alo, ahi), (blo, bhi) = a["prefill_latency_ci95_s"], b["prefill_latency_ci95_s"]
        return bhi < alo or blo > ahi
    return None


def compare(run_a: list[dict], run_b: list[dict]) -> list[dict]:
    """One row per (trial, figure) for trials present and ok in both runs."""
    b_by_id = {r["trial_id"]: r for r in run_b}
    rows = []
    for a in run_a:
        b = b_by_id.get(a["trial_id"])
        if b is None or a["status"] != "ok" or b["status"] != "ok":
            rows.append({"trial_id": a["trial_id"], "figure": "status", "a": a["status"],
                         "b": b["status"] if b else "absent", "change": None, "significant": None, "better": None})
            continue
        for field, label, higher in FIGURES:
            va, vb = a.get(field), b.get(field)
            if va is None or vb is None:
                continue
            change = (vb / va - 1) if va else None
            sig = significant(field, a, b)
            better = None if change is None or change == 0 else ((change > 0) == higher)
            rows.append({"trial_id": a["trial_id"], "figure": label, "a": va, "b": vb, "change": change,
                         "significant": sig, "better": better})
    return rows
