"""The report's kernels section: what the micro-benchmarks say, as figures, a table and findings."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from .figures import _png


def kernels_frame(records: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(records)


def gemm_figure(df: pd.DataFrame) -> str:
    d = df[(df["bench"] == "gemm") & (df["status"] == "ok")].copy()
    d["shape name"] = d["case"].str.rsplit("-", n=1).str[0]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    sns.barplot(d, x="shape name", y="tflops", hue="dtype", ax=ax)
    peaks = d["datasheet_peak_tflops"].dropna() if "datasheet_peak_tflops" in d else pd.Series(dtype=float)
    for p in sorted(set(peaks)):
        ax.axhline(p, ls="--", color="grey", lw=1)
    ax.set(xlabel="", ylabel="TFLOP/s (median)", title="GEMM at the model's shapes and square sizes")
    ax.tick_params(axis="x", rotation=30)
    return _png(fig)


def attention_figure(df: pd.DataFrame) -> str:
    d = df[(df["bench"] == "attention") & (df["status"] == "ok")].copy()
    d["ms"] = d["median_s"] * 1e3
    g = sns.catplot(d, x="backend", y="ms", hue="op", col="dtype", kind="bar", height=3.2, aspect=1.2, sharey=False)
    g.set_axis_labels("", "ms per call (median)")
    for ax in g.axes.flat:
        ax.tick_params(axis="x", rotation=20)
    return _png(g.figure)


def collectives_figure(df: pd.DataFrame) -> str:
    d = df[(df["bench"] == "collective") & (df["status"] == "ok")].copy()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    sns.lineplot(d, x="bytes", y="busbw_gbs", hue="op", marker="o", ax=ax)
    ax.set(xscale="log", xlabel="message size S (bytes)", ylabel="bus bandwidth GB/s", title="Collectives (nccl-tests busbw)")
    return _png(fig)


def optimizer_figure(df: pd.DataFrame) -> str:
    d = df[(df["bench"] == "optimizer") & (df["status"] == "ok")].copy()
    d["M params/s"] = d["params_per_s"] / 1e6
    fig, ax = plt.subplots(figsize=(6.5, 3.0))
    sns.barplot(d, y="backend", x="M params/s", ax=ax, orient="h")
    ax.set(ylabel="", title="Optimizer step")
    return _png(fig)


def findings(records: list[dict]) -> list[str]:
    """Plain statements, each computed from the records it names."""
    ok = [r for r in records if r["status"] == "ok"]
    out = []
    for dtype in sorted({r["dtype"] for r in ok if r["bench"] == "gemm"}):
        g = [r for r in ok if r["bench"] == "gemm" and r["dtype"] == dtype]
        best = max(g, key=lambda r: r["tflops"])
        model_shapes = [r for r in g if not r["case"].startswith("square")]
        text = f"GEMM {dtype}: achievable peak {best['tflops']:.3g} TFLOP/s ({best['shape']})"
        if best.get("datasheet_peak_tflops"):
            text += f", {100 * best['tflops'] / best['datasheet_peak_tflops']:.0f}% of the datasheet's {best['datasheet_peak_tflops']:.0f}"
        if model_shapes:
            worst = min(model_shapes, key=lambda r: r["tflops"])
            text += (f"; the model's own matmuls reach {min(r['tflops'] for r in model_shapes):.3g}–"
                     f"{max(r['tflops'] for r in model_shapes):.3g} (slowest: {worst['case']})")
        out.append(text)
    for dtype in sorted({r["dtype"] for r in ok if r["bench"] == "attention"}):
        for op in ("fwd", "fwd+bwd"):
            a = {r["backend"]: r for r in ok if r["bench"] == "attention" and r["dtype"] == dtype and r["op"] == op}
            if "eager" in a and len(a) > 1:
                sdpa = min((r for k, r in a.items() if k != "eager"), key=lambda r: r["median_s"])
                speed = a["eager"]["median_s"] / sdpa["median_s"]
                out.append(f"Attention {op} {dtype}: the fastest SDPA backend, {sdpa['backend']}, runs at {speed:.2f}× "
                           f"the eager formula's speed" + (" (slower: the eager formula wins here)" if speed < 1 else ""))
    opt = {r["case"]: r for r in ok if r["bench"] == "optimizer"}
    if opt:
        best = max(opt.values(), key=lambda r: r["params_per_s"])
        ref = opt.get("adamw-foreach")
        text = f"Optimizer step: fastest is {best['backend']} at {best['params_per_s'] / 1e6:,.0f} M params/s"
        if ref and ref is not best:
            text += f" ({best['params_per_s'] / ref['params_per_s']:.2f}× torch AdamW foreach)"
        out.append(text)
    for op in sorted({r["op"] for r in ok if r["bench"] == "collective"}):
        c = [r for r in ok if r["bench"] == "collective" and r["op"] == op]
        best = max(c, key=lambda r: r["busbw_gbs"])
        out.append(f"{op} over {best['world_size']} ranks ({best['backend']}): peak bus bandwidth "
                   f"{best['busbw_gbs']:.3g} GB/s at {best['bytes']:,} bytes")
    missing: dict[tuple[str, str], set] = {}
    for r in records:
        if r["status"] != "ok":
            missing.setdefault((r["backend"], (r["reason"] or "").split(". ")[0]), set()).add(r["dtype"])
    for (backend, reason), dtypes in missing.items():
        out.append(f"{backend} ({', '.join(sorted(dtypes))}): not available here — {reason}")
    return out


def kernel_figures(records: list[dict]) -> dict[str, str]:
    df = kernels_frame(records)
    figs = {}
    if df.empty:
        return figs
    have = set(df[df["status"] == "ok"]["bench"])
    if "gemm" in have:
        figs["GEMM TFLOP/s"] = gemm_figure(df)
    if "attention" in have:
        figs["Attention backends vs the eager formula"] = attention_figure(df)
    if "optimizer" in have:
        figs["Optimizer step, parameters per second"] = optimizer_figure(df)
    if "collective" in have:
        figs["Collective bus bandwidth vs message size"] = collectives_figure(df)
    return figs
