"""Predicted step time of a training trial: compute + DeepSpeed's collectives + a cost per call.

    step_s = a + b·F + Σ_collectives [calls·α-term + bytes·β-term] + γ·calls

- **F**, the step's FLOPs per rank: hardware FLOPs per token (collect/flops.hfu_flops_per_token,
  6N + 12LHQT, plus the recomputed forward under checkpointing) × the tokens a rank trains in
  one optimizer step (micro-batch × sequence × accumulation). `b` (seconds per FLOP, the
  inverse of the achieved rate) and `a` (what a step costs whatever its size: Python,
  launches, the optimizer's pass over its partition) are calibrated from trials already run
  (`calibrate`); before any trial, `b` is the measured matmul rate at the model's shapes
  (collect/peak.py) when given.
- **The collectives** DeepSpeed 0.19 really issues per optimizer step (`comm_pattern`, each
  read from its source and checked against the comms recorder, tests/test_plan_throughput.py),
  timed by the alpha-beta ring model (Thakur, Rabenseifner & Gropp 2005, "Optimization of
  Collective Communication Operations in MPICH"; nccl-tests doc/PERFORMANCE.md for the bus
  factors): an all-reduce of S bytes over n ranks costs 2(n−1)·α + 2(n−1)/n · S/β, an
  all-gather or reduce-scatter (S the whole buffer) (n−1)·α + (n−1)/n · S/β, with α the
  per-hop latency and β the link (bus) bandwidth, fitted to measured collectives
  (`fit_collectives`: `llmbench kernels` rows, or supplied figures such as nccl-tests').
- **γ**, a cost per collective call beyond the wire (DeepSpeed's hooks and bucket
  bookkeeping, ZeRO-3's per-module fetch, waiting for the slower rank), calibrated with `a`
  and `b`; zero until a calibration set has trials that differ in their number of calls.
- **Overlap**: on a CPU (gloo) a collective runs on the cores that compute, so nothing is
  hidden. On CUDA with `overlap_comm`, the gradient reduction of stages 1-2 and ZeRO-3's
  reduce-scatter hide behind backward (2/3 of the compute) and ZeRO-3's prefetched all-gathers
  behind forward (1/3): the exposed time is what exceeds the compute it overlaps. This is an
  assumption (no GPU has measured it here), stated in every prediction's notes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..collect.comms import bus_factor
from ..collect.flops import hfu_flops_per_token
from ..models import ModelStats
from .memory import zero_knobs

KINDS = ("all_reduce", "all_gather", "reduce_scatter")


@dataclass(frozen=True)
class Collective:
    """One kind of collective in a step: `calls` of `bytes_per_call` each (S, nccl-tests' buffer)."""

    kind: str
    calls: float
    bytes_per_call: float
    what: str = ""

    @property
    def bytes(self) -> float:
        return self.calls * self.bytes_per_call


def ring_factors(kind: str, n: int) -> tuple[float, float]:
    """(latency hops, bandwidth factor) of the ring algorithm over n ranks: the α multiplier,
    2(n−1) for an all-reduce and n−1 for the others, and the multiplier of S/β, nccl-tests'
    bus factor (collect/comms.bus_factor)."""
    if n <= 1:
        return 0.0, 0.0
    if kind not in KINDS + ("broadcast",):
        raise ValueError(f"unknown collective {kind!r}")
    return (2.0 if kind == "all_reduce" else 1.0) * (n - 1), bus_factor(kind, n)


def ring_time(kind: str, n: int, size_bytes: float, alpha_s: float, beta_Bps: float) -> float:
    """Seconds of one collective of S = size_bytes over n ranks by the alpha-beta ring model."""
    hops, factor = ring_factors(kind, n)
    return hops * alpha_s + factor * size_bytes / beta_Bps


@dataclass
class LinkFit:
    """α (seconds per hop) and β (bus bytes per second) of one kind of collective, and where they came from."""

    alpha_s: float
    beta_Bps: float
    world_size: int
    source: str
    points: int = 0


def fit_collectives(rows: list[dict], world_size: int, source: str) -> dict[str, LinkFit]:
    """α and β per collective kind from measured (size, seconds) points: the least-squares fit
    of t = hops·α + factor·S/β in relative error (each point weighted by 1/t, so a 1 KiB call
    counts as much as a 16 MiB one), both kept ≥ 0. `rows`: `llmbench kernels` collective
    records (bench "collective", op, bytes, median_s, status ok)."""
    import numpy as np

    out: dict[str, LinkFit] = {}
    if world_size < 2:  # one rank communicates nothing: no link to fit
        return out
    for kind in KINDS:
        pts = [(float(r["bytes"]), float(r["median_s"])) for r in rows
               if r.get("bench") == "collective" and r.get("op") == kind and r.get("status") == "ok"
               and r.get("median_s") and r.get("bytes")]
        if len(pts) < 2:
            continue
        hops, factor = ring_factors(kind, world_size)
        x = np.array([[hops, factor * s] for s, _ in pts])
        y = np.array([t for _, t in pts])
        w = 1.0 / y
        coef, *_ = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)
        alpha, inv_beta = (max(float(c), 0.0) for c in coef)
        if inv_beta <= 0:  # no bandwidth term measurable: the largest point's bus bandwidth
            s, t = max(pts)
            inv_beta = max(t - hops * alpha, 1e-12) / (factor * s)
        out[kind] = LinkFit(alpha, 1.0 / inv_beta, world_size, source, len(pts))
    return out


def zero3_fetches(stats: ModelStats) -> int:
    """ZeRO-3's all-gather calls in a forward: the parameter coordinator gathers each decoder
    layer's attention block and MLP block (their Linear layers' parameters coalesced into one
    `all_gather_coalesced` with the prefetch), plus the embeddings and the LM head: 2·L + 2.
    The comms recorder counted 10 on the 4-layer tiny Llama (tests/test_plan_throughput.py
    checks it on a real run)."""
    return 2 * stats.n_layers + 2


def bucket_count(numels: tuple[int, ...] | list[int], bucket: float, total: float) -> int:
    """How many buckets DeepSpeed fills with gradients of these sizes: a bucket is reduced when the
    next gradient would overflow it (stage_1_and_2.py `reduce_independent_p_g_buckets_and_remove_grads`,
    stage3.py `__add_grad_to_ipg_bucket`), so a gradient larger than the bucket is a bucket of its
    own. Packed largest first (the real order is the backward's; the count rarely differs)."""
    if not numels:
        return max(1, math.ceil(total / bucket))
    count, fill = 0, 0.0
    for x in numels:
        if fill and fill + x > bucket:
            count, fill = count + 1, 0.0
        fill += x
    return count + (1 if fill else 0)


def comm_pattern(spec, stats: ModelStats, ds_config: dict | None) -> list[Collective]:
    """The collectives DeepSpeed 0.19 issues per optimizer step on one data-parallel group of
    n = world_size ranks, with p bytes per element of the communicated dtype and Ψ parameters:

    - stage 0: the engine's `allreduce_gradients` → `buffered_allreduce_fallback` all-reduces
      the flattened gradients in buckets of `allreduce_bucket_size` (engine.py; 5e8 elements),
      once per optimizer step (at the accumulation boundary).
    - stages 1-2: `average_tensor` / `allreduce_no_retain` (stage_1_and_2.py:1690-1721) all-reduce
      each bucket of `reduce_bucket_size` gradient elements (`bucket_count`) once per destination
      partition it covers (each rank keeps its slice; the n − 1 partition boundaries split a
      bucket each): an all-reduce, not a reduce-scatter, so 2(n−1)/n·S on the ring; at stage 1
      once per optimizer step, at stage 2 every micro-step. Then the updated
      partitions are all-gathered (`all_gather_dp_groups`, allgather_bucket_size).
    - stage 3: forward gathers the non-persistent parameters (`zero3_fetches` calls, p·Ψ in all)
      each micro-step; backward re-gathers only when the model exceeds `stage3_max_reuse_distance`
      (1e9 elements by default: a parameter used again sooner is kept), and the gradients are
      reduce-scattered in buckets of `reduce_bucket_size` (`bucket_count`) every micro-step.
    - plus one small all-reduce per step (the overflow / gradient-norm check) at stages 1-3.

    Measured on 2 ranks (records' `comms`, the comms recorder) the bytes match; the calls match
    at DeepSpeed's default buckets and come within one of the recorder's at small ones; at
    accumulation 2 ZeRO-3's coordinator coalesces the later micro-steps' fetches (11 calls
    recorded where 20 are counted here; the bytes agree) (docs/search.md)."""
    n = max(1, spec.world_size)
    if n == 1:
        return []
    psi = float(stats.n_params)
    p = 4.0 if spec.precision == "fp32" else 2.0
    ga = max(1, spec.grad_accum)
    stage = spec.zero_stage
    cfg = ds_config or {}
    knobs = zero_knobs(cfg, stage)
    b = float(knobs["reduce_bucket_size"])
    if stage == 0:
        bucket = float(cfg.get("allreduce_bucket_size") or 5e8)  # engine.py: allreduce_bucket_size default 500000000
        calls = math.ceil(psi / bucket)
        return [Collective("all_reduce", calls, p * psi / calls, "gradients, at the accumulation boundary")]
    small = Collective("all_reduce", 1, 8.0, "overflow / gradient-norm check")
    if stage in (1, 2):
        ag_bucket = float(knobs["allgather_bucket_size"])
        per_reduce = 1 if stage == 1 else ga
        calls = per_reduce * bucket_count(stats.param_numels, b, psi) + n - 1
        reduce = Collective("all_reduce", calls, per_reduce * p * psi / calls,
                            "gradients, one all-reduce per bucket and destination partition")
        ag_calls = math.ceil(psi / ag_bucket)
        gather = Collective("all_gather", ag_calls, p * psi / ag_calls, "updated parameter partitions")
        return [reduce, gather, small]
    fetches = zero3_fetches(stats)
    persist = float(sum(x for x in stats.param_numels if x <= knobs["persistence_threshold"]))
    gathered = psi - persist
    regather = 2 if psi > float(knobs["max_reuse_distance"]) else 1
    buckets = bucket_count(stats.param_numels, b, psi)
    return [Collective("all_gather", ga * regather * fetches, p * gathered / fetches, "module parameters (forward"
                       + (" and backward)" if regather == 2 else "; kept for backward)")),
            Collective("reduce_scatter", ga * buckets, p * psi / buckets, "gradients"),
            small]


@dataclass
class ComputeFit:
    """The calibrated terms: a (s per step), b (s per FLOP), γ (s per collective call)."""

    a_s: float = 0.0
    s_per_flop: float = 0.0
    gamma_s: float = 0.0
    trials: list[str] = field(default_factory=list)  # what it was calibrated on
    source: str = "uncalibrated"

    @property
    def tflops(self) -> float | None:
        return 1.0 / self.s_per_flop / 1e12 if self.s_per_flop > 0 else None


@dataclass
class StepPrediction:
    compute_s: float
    comm_s: float  # the collectives on the wire (α-β)
    calls: float
    call_overhead_s: float  # γ·calls
    hidden_s: float  # what overlap hides
    step_s: float
    tokens_per_s: float
    flops_per_step: float
    collectives: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def step_flops(spec, stats: ModelStats) -> float:
    """Hardware FLOPs one rank computes in an optimizer step."""
    return hfu_flops_per_token(stats, spec.seq_len, spec.activation_checkpointing) * spec.micro_batch \
        * spec.seq_len * max(1, spec.grad_accum)


def comm_seconds(pattern: list[Collective], links: dict[str, LinkFit], n: int) -> float:
    total = 0.0
    for c in pattern:
        link = links.get(c.kind) or links.get("all_reduce")
        if link is None:
            continue
        total += c.calls * ring_time(c.kind, n, c.bytes_per_call, link.alpha_s, link.beta_Bps)
    return total


def predict_step(spec, stats: ModelStats, ds_config: dict | None, links: dict[str, LinkFit],
                 fit: ComputeFit, accelerator: str = "cpu") -> StepPrediction:
    """The step time and tokens/s of a training trial (module docstring)."""
    n = max(1, spec.world_size)
    pattern = comm_pattern(spec, stats, ds_config)
    flops = step_flops(spec, stats)
    compute = fit.a_s + fit.s_per_flop * flops
    wire = comm_seconds(pattern, links, n)
    calls = sum(c.calls for c in pattern)
    notes = []
    if not links:
        notes.append("no collective measurements: the wire time is left out")
    hidden = 0.0
    if accelerator == "cuda" and zero_knobs(ds_config, spec.zero_stage)["overlap_comm"] and spec.zero_stage > 0:
        bwd, fwd = compute * 2 / 3, compute / 3
        grads = sum(comm_seconds([c], links, n) for c in pattern if c.kind in ("reduce_scatter",) or
                    (c.kind == "all_reduce" and c.bytes_per_call > 8))
        gathers = sum(comm_seconds([c], links, n) for c in pattern if c.kind == "all_gather") if spec.zero_stage == 3 else 0.0
        hidden = min(grads, bwd) + min(gathers, fwd)
        notes.append("overlap_comm: gradient reduction assumed hidden behind backward (2/3 of compute), ZeRO-3's "
                     "prefetched gathers behind forward (1/3); not measured on a GPU here")
    step = compute + wire + fit.gamma_s * calls - hidden
    tokens = spec.micro_batch * spec.seq_len * max(1, spec.grad_accum) * n
    return StepPrediction(compute, wire, calls, fit.gamma_s * calls, hidden, step, tokens / step if step > 0 else 0.0,
                          flops, [asdict(c) for c in pattern], notes)


def calibrate(samples: list[tuple[str, object, ModelStats, dict | None, float]], links: dict[str, LinkFit],
              prior_s_per_flop: float = 0.0) -> ComputeFit:
    """Fit a, b and γ to measured step times: `samples` are (trial_id, spec, stats, ds_config,
    measured step seconds). Least squares in relative error on the time left after the wire
    (α-β) time, all three kept ≥ 0 (non-negative least squares over the subsets of terms);
    γ only when the samples differ in their number of calls, a only with two or more FLOP
    counts. With no sample: b = `prior_s_per_flop` (the measured matmul rate), a = γ = 0."""
    import itertools

    import numpy as np

    if not samples:
        return ComputeFit(s_per_flop=prior_s_per_flop, source="prior: measured matmul rate" if prior_s_per_flop else "uncalibrated")
    rows, y = [], []
    for _, spec, stats, dsc, measured in samples:
        pattern = comm_pattern(spec, stats, dsc)
        rows.append([1.0, step_flops(spec, stats), sum(c.calls for c in pattern)])
        y.append(measured - comm_seconds(pattern, links, max(1, spec.world_size)))
    x, y = np.array(rows), np.array(y)
    w = 1.0 / np.array([s[4] for s in samples])
    usable = [0, 1]
    if len({round(r[2], 6) for r in rows}) > 1:
        usable.append(2)
    if len({round(r[1]) for r in rows}) < 2:
        usable.remove(0)  # one FLOP count: a and b cannot be told apart; all of it is b
    best = None
    for k in range(1, len(usable) + 1):
        for cols in itertools.combinations(usable, k):
            c, *_ = np.linalg.lstsq(x[:, cols] * w[:, None], y * w, rcond=None)
            if (c < 0).any():
                continue
            coef = np.zeros(3)
            coef[list(cols)] = c
            err = float(np.sum(((x @ coef - y) * w) ** 2))
            if best is None or err < best[0] - 1e-15:
                best = (err, coef)
    coef = best[1] if best else np.zeros(3)
    if coef[1] == 0 and prior_s_per_flop:
        coef[1] = prior_s_per_flop
    return ComputeFit(float(coef[0]), float(coef[1]), float(coef[2]), [s[0] for s in samples],
                      f"calibrated on {len(samples)} trial(s)")


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties): Pearson's r of the ranks."""
    if len(xs) < 2:
        return None

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2.0
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None
