"""Seaborn figures, each returned as an embeddable PNG data URI (the report works offline)."""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")  # headless: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from ..safetext import terminal  # noqa: E402

sns.set_theme(style="whitegrid", context="notebook")


def _label(s) -> str:
    """A trial id as a figure shows it: control characters escaped (matplotlib has no glyph
    for them, and its warning would print them raw); a long one (a model's path) keeps its
    last 40 characters, where ids differ."""
    text = terminal(s, 10**6)
    return text if len(text) <= 40 else "…" + text[-39:]


def _labels(ids) -> dict:
    """_label of each distinct id, made distinct again where cutting made two the same."""
    out, seen = {}, {}
    for tid in dict.fromkeys(ids):
        lab = _label(tid)
        seen[lab] = seen.get(lab, 0) + 1
        out[tid] = lab if seen[lab] == 1 else f"{lab} #{seen[lab]}"
    return out


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def throughput_vs_micro_batch(df: pd.DataFrame) -> str:
    ok = df[df["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    sns.lineplot(data=ok, x="micro_batch", y="tokens_per_s", hue="zero_stage", style="precision", marker="o",
                 palette="viridis", ax=ax)
    ax.set(xlabel="micro-batch per rank", ylabel="global tokens/s", title="Throughput by ZeRO stage")
    ax.set_xticks(sorted(ok["micro_batch"].unique()))
    return _png(fig)


def memory_by_stage(df: pd.DataFrame) -> str:
    """Stacked bars: model states (measured from the engine) and the rest of the peak."""
    ok = df[df["status"] == "ok"].sort_values(["zero_stage", "micro_batch"])
    fig, ax = plt.subplots(figsize=(6.4, 4))
    x = range(len(ok))
    ax.bar(x, ok["model_state_mib"], label="model states (params + grads + optimizer, measured)", color="#3b528b")
    ax.bar(x, ok["rest_mib"], bottom=ok["model_state_mib"], label="rest of the trial's peak (activations, buffers, temporaries)",
           color="#5ec962")
    ax.bar(x, ok["baseline_mib"], bottom=ok["model_state_mib"] + ok["rest_mib"],
           label="held before the trial (runtime, libraries)", color="#cccccc")
    ax.set_xticks(list(x), ok["config"], rotation=30, ha="right")
    ax.set(ylabel="MiB per rank (max over ranks)", title="Memory per rank")
    ax.legend(fontsize=8)
    return _png(fig)


def model_states_by_stage(df: pd.DataFrame) -> str:
    ok = df[df["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    sns.barplot(data=ok, x="zero_stage", y="model_state_mib", hue="micro_batch", palette="crest", ax=ax)
    ax.set(xlabel="ZeRO stage", ylabel="MiB per rank", title="Model-state bytes held per rank")
    return _png(fig)


def loss_curves(losses: pd.DataFrame, floor: float | None) -> str:
    fig, ax = plt.subplots(figsize=(6.4, 4))
    losses = losses.assign(trial=losses["trial_id"].map(_labels(losses["trial_id"])))
    sns.lineplot(data=losses, x="step", y="loss", hue="trial", ax=ax, linewidth=1.2)
    if floor is not None:
        ax.axhline(floor, color="black", linestyle="--", linewidth=1, label=f"entropy floor {floor:.3f}")
    ax.set(xlabel="timed optimizer step", ylabel="loss (nats, mean over ranks)", title="Loss per step")
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)


def step_breakdown(df: pd.DataFrame) -> str:
    """Forward, backward compute, gradient-reduction epilogue, optimizer step and (ZeRO-1/2)
    the parameter all-gather after it, per trial, from DeepSpeed's timers in the pass after
    the window."""
    ok = df[(df["status"] == "ok") & df["fwd_s"].notna()].sort_values(["zero_stage", "micro_batch"])
    fig, ax = plt.subplots(figsize=(6.4, 4))
    bottom = pd.Series(0.0, index=ok.index)
    for col, label, colour in (("fwd_s", "forward", "#3b528b"), ("bwd_compute_s", "backward (compute + overlapped comm)", "#21918c"),
                               ("comm_s", "gradient reduction after backward", "#fde725"), ("optimizer_s", "optimizer step", "#5ec962"),
                               ("allgather_s", "parameter all-gather (ZeRO-1/2)", "#440154")):
        vals = ok[col].fillna(0).astype(float)
        ax.bar(range(len(ok)), vals, bottom=bottom, label=label, color=colour)
        bottom = bottom + vals
    ax.set_xticks(range(len(ok)), ok["config"], rotation=30, ha="right")
    ax.set(ylabel="seconds per optimizer step (slowest rank)", title="Where a step's time goes (DeepSpeed timers)")
    ax.legend(fontsize=7)
    return _png(fig)


def per_rank_step_times(records: list[dict]) -> str:
    """Each rank's step times per trial: a straggler stands out as one rank's higher box."""
    names = _labels(r["trial_id"] for r in records)
    rows = [{"config": names[r["trial_id"]], "rank": f"rank {k}", "step_s": t}
            for r in records if r["status"] == "ok" for k, ts in enumerate(r.get("step_times_per_rank") or []) for t in ts]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    if rows:
        sns.boxplot(data=pd.DataFrame(rows), x="config", y="step_s", hue="rank", ax=ax, fliersize=2)
    ax.tick_params(axis="x", rotation=30)
    ax.set(xlabel="", ylabel="step time (s)", title="Step times per rank")
    return _png(fig)


def mfu_heatmap(df: pd.DataFrame) -> str:
    """MFU over ZeRO stage × micro-batch (against the datasheet peak, or the measured GEMM peak on CPU)."""
    ok = df[df["status"] == "ok"].copy()
    col = "mfu" if ok["mfu"].notna().any() else "mfu_vs_measured_peak"
    grid = ok.pivot_table(index="zero_stage", columns="micro_batch", values=col, aggfunc="max")
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    sns.heatmap(grid, annot=True, fmt=".2f", cmap="viridis", ax=ax, cbar_kws={"label": col})
    ax.set(xlabel="micro-batch per rank", ylabel="ZeRO stage",
           title="MFU" + (" (vs datasheet peak)" if col == "mfu" else " (vs measured GEMM peak)"))
    return _png(fig)


def throughput_vs_accumulation(df: pd.DataFrame) -> str:
    ok = df[df["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    sns.lineplot(data=ok, x="grad_accum", y="tokens_per_s", hue="zero_stage", style="micro_batch", marker="o",
                 palette="viridis", ax=ax)
    ax.set(xlabel="gradient accumulation steps", ylabel="global tokens/s", title="Throughput vs gradient accumulation")
    return _png(fig)


def loss_by_precision(losses: pd.DataFrame, floor: float | None) -> str:
    fig, ax = plt.subplots(figsize=(6.4, 4))
    sns.lineplot(data=losses, x="step", y="loss", hue="precision", units="trial_id", estimator=None, ax=ax, linewidth=1)
    if floor is not None:
        ax.axhline(floor, color="black", linestyle="--", linewidth=1, label=f"entropy floor {floor:.3f}")
    ax.set(xlabel="timed optimizer step", ylabel="loss (nats)", title="Loss per precision")
    ax.legend(fontsize=8)
    return _png(fig)


def pareto(df: pd.DataFrame) -> str:
    """Throughput against memory per rank; the frontier joins the trials no other beats on both."""
    ok = df[df["status"] == "ok"].copy()
    ok["mem_mib"] = ok["model_state_mib"] + ok["rest_mib"]
    front, best = [], -1.0
    for _, r in ok.sort_values(["mem_mib", "tokens_per_s"], ascending=[True, False]).iterrows():
        if r["tokens_per_s"] > best:
            front.append(r)
            best = r["tokens_per_s"]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    sns.scatterplot(data=ok, x="mem_mib", y="tokens_per_s", hue="zero_stage", style="micro_batch", palette="viridis", ax=ax, s=60)
    if front:
        f = pd.DataFrame(front)
        ax.plot(f["mem_mib"], f["tokens_per_s"], color="#b42318", linewidth=1.2, label="Pareto frontier")
        for _, r in f.iterrows():
            ax.annotate(_label(r["trial_id"]), (r["mem_mib"], r["tokens_per_s"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="memory per rank used by the trial (MiB)", ylabel="global tokens/s", title="Throughput vs memory")
    ax.legend(fontsize=7)
    return _png(fig)


def failures(df: pd.DataFrame) -> str:
    """Every trial's status at a glance."""
    colours = {"ok": "#5ec962", "skipped": "#cccccc", "unsupported": "#fde725", "oom": "#b42318", "timeout": "#f08c00",
               "failed": "#7f1d1d", "diverged": "#9d4edd", "interrupted": "#888888", "pruned": "#9ecae1", "stopped": "#c6dbef"}
    fig, ax = plt.subplots(figsize=(6.4, max(2.0, 0.28 * len(df) + 0.8)))
    names = _labels(df["trial_id"])
    ax.barh([names[t] for t in df["trial_id"]], 1, color=[colours.get(s, "#000") for s in df["status"]])
    for i, s in enumerate(df["status"]):
        ax.text(0.5, i, s, ha="center", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set(xticks=[], title="Trial outcomes")
    return _png(fig)


def quant_changes(q: pd.DataFrame) -> str:
    """One chart: each compression method's change against `none` in decode tokens/s (at the
    smallest and largest decode batch), weight bytes and perplexity; methods this hardware
    refused are named with their status instead of bars."""
    rows, refused = [], []
    methods = [m for m in q["method"] if m != "none"]
    for _, r in q[q["method"] != "none"].iterrows():
        if r["status"] != "ok":
            refused.append(r["method"])
            continue
        dc = r["decode_change"] or {}
        if dc:
            lo, hi = min(dc, key=int), max(dc, key=int)
            rows.append({"method": r["method"], "metric": f"decode tok/s, batch {lo}", "change": 100 * dc[lo]})
            if hi != lo:
                rows.append({"method": r["method"], "metric": f"decode tok/s, batch {hi}", "change": 100 * dc[hi]})
        if r["weight_change"] is not None:
            rows.append({"method": r["method"], "metric": "weight bytes", "change": 100 * r["weight_change"]})
        if r["perplexity_change"] is not None:
            rows.append({"method": r["method"], "metric": "perplexity", "change": 100 * r["perplexity_change"]})
    fig, ax = plt.subplots(figsize=(max(7.2, 2 + 0.8 * len(methods)), 4.2))
    if rows:
        sns.barplot(data=pd.DataFrame(rows), x="method", y="change", hue="metric", order=methods, palette="viridis", ax=ax)
        for bars in ax.containers:
            ax.bar_label(bars, fmt="{:+.2f}", fontsize=6)
        ax.legend(fontsize=7, title=None)
    ax.axhline(0, color="black", linewidth=0.8)
    for m in refused:
        ax.text(methods.index(m), 0, "unsupported\nhere", ha="center", va="bottom", fontsize=7, color="#b42318")
    ax.set(xlabel="compression (torchao quantization, pruning)", ylabel="% change vs none (same weights, same batches)",
           title="Compression: speed, memory and perplexity against the uncompressed model")
    if len(methods) > 6:
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    ax.set_xlim(-0.6, len(methods) - 0.4)
    return _png(fig)


def schedule_curves(curves: pd.DataFrame) -> str:
    """Loss above the entropy floor per optimizer step for each learning-rate schedule (the
    mean over seeds, the band their min to max), over the lr each step applied."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.2, 5.4), sharex=True, height_ratios=[3, 1.3])
    palette = dict(zip(curves["schedule"].unique(), sns.color_palette("colorblind", curves["schedule"].nunique())))
    for name, g in curves.groupby("schedule", sort=False):
        per_step = g.groupby("step")["gap"]
        mean, lo, hi = per_step.mean(), per_step.min(), per_step.max()
        n = g["seed"].nunique()
        floor = 1e-3  # a step's loss can fall below its floor by its batch's chance: the log axis shows those at 1e-3
        top.plot(mean.index, mean.clip(lower=floor).values, color=palette[name],
                 label=f"{_label(name)} ({n} seed{'s' if n != 1 else ''})")
        top.fill_between(mean.index, lo.clip(lower=floor).values, hi.clip(lower=floor).values, color=palette[name],
                         alpha=0.2, linewidth=0)
        lr = g[g["seed"] == g["seed"].min()].sort_values("step")
        bottom.plot(lr["step"], lr["lr"], color=palette[name])
    top.set_yscale("log")
    top.set(ylabel="loss − entropy floor (nats)", title="Learning-rate schedules: loss per step (mean over seeds, band min–max)")
    top.legend(fontsize=7)
    bottom.set(xlabel="optimizer step (warm-up steps included)", ylabel="lr applied")
    bottom.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    return _png(fig)
