"""Projection of a measured trial to more ranks and nodes: the alpha-beta ring model, labelled
as a projection and never stored as a measurement.

    step(N) = compute(N) + (1 − overlap) · Σ_collectives calls · [hops(N)·α + factor(N)·S/β]

- **compute(N)**: the trial's measured step time less its communication: DeepSpeed's own
  timers (bwd_allreduce, all-gather) where the trial ran its breakdown pass (at ZeRO-3 also the
  model's wire time of the forward gathers, which run under no timer), else the wire time the
  throughput model gives its collectives. Weak scaling keeps the
  micro-batch per rank (the global batch grows with N): compute stays. Strong scaling keeps
  the trial's global batch: each rank trains n0/N of it, and compute scales by n0/N (linear:
  a smaller per-rank GEMM is less efficient, which this ignores); it stops where a rank would
  get less than one sample per step.
- **The collectives** are the trial's own (plan/throughput.comm_pattern) at world size N:
  ZeRO's bytes per rank do not shrink with N (the ring moves ~2S or ~S whatever N), its
  latency term grows with N.
- **α, β**: within a node, the run's measured collectives (`llmbench kernels`, all-reduce fit)
  or a supplied figure; across nodes, supplied figures only (`--inter`: a bus bandwidth in GB/s
  or an nccl-tests all_reduce_perf output). A ring over several nodes runs at the slowest
  link, the inter-node one.
- **overlap**: the fraction of the communication hidden behind compute, 0 unless given.

Ignored, and said so in every projection: NCCL's tree and NVLS algorithms (latency at scale),
congestion and rail topology, stragglers, the memory per rank changing with N (ZeRO's
partitions shrink), pipeline and tensor parallelism, and the data loader.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .throughput import LinkFit, comm_pattern, ring_time

IGNORED = ("NCCL's tree/NVLS algorithms", "congestion and topology", "stragglers", "memory per rank at N",
           "tensor/pipeline parallelism", "the data loader")


@dataclass
class Link:
    """One level of the network: α (s per hop) and β (bus bytes/s), and where they came from."""

    alpha_s: float
    beta_Bps: float
    source: str


def parse_nccl_tests(text: str) -> Link:
    """An nccl-tests (all_reduce_perf) output: β is the out-of-place busbw at the largest size,
    α the smallest size's out-of-place time over the ring's 2(n−1) hops (n: its `# Rank` lines,
    or 2 if it lists none). The columns are found from its header (`size ... time algbw busbw`;
    older versions have no `root` column). Raises ValueError when it holds no usable rows."""
    ranks = len(re.findall(r"^#\s+Rank\s+\d+", text, flags=re.M)) or 2
    cols = None
    rows = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            head = line.lstrip("# \t").split()
            if cols is None and {"size", "time", "busbw"} <= set(head):
                cols = (head.index("size"), head.index("time"), head.index("busbw"))  # the first: out-of-place
            continue
        parts = line.split()
        if cols is None or len(parts) <= max(cols) or not parts[cols[0]].isdigit():
            continue
        try:
            rows.append((int(parts[cols[0]]), float(parts[cols[1]]), float(parts[cols[2]])))  # B, µs, GB/s
        except ValueError:
            continue
    if not rows:
        raise ValueError("no nccl-tests result rows under a `size ... time algbw busbw` header")
    rows.sort()
    if not rows[-1][2] > 0:
        raise ValueError(f"nccl-tests output: busbw {rows[-1][2]:g} GB/s at its largest size; a bandwidth must be positive")
    alpha = rows[0][1] * 1e-6 / max(1, 2 * (ranks - 1))
    return Link(alpha, rows[-1][2] * 1e9, f"nccl-tests output ({ranks} ranks, busbw {rows[-1][2]:g} GB/s at "
                                          f"{rows[-1][0]:,} B, {rows[0][1]:g} µs at {rows[0][0]:,} B)")


def parse_link(value: str, alpha_us: float) -> Link:
    """`--intra`/`--inter`: a bus bandwidth in GB/s, or a path to an nccl-tests output file."""
    try:
        gbps = float(value)
    except ValueError:
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"{value!r} is neither a bus bandwidth in GB/s nor an nccl-tests output file") from None
        try:
            text = path.read_text(errors="replace")
        except OSError as e:
            raise ValueError(f"{value}: cannot read it ({e.strerror or e})") from None
        return parse_nccl_tests(text)
    if not gbps > 0:
        raise ValueError(f"{value!r}: a bus bandwidth must be positive (GB/s)")
    return Link(alpha_us * 1e-6, gbps * 1e9, f"given: busbw {gbps:g} GB/s, α {alpha_us:g} µs")


@dataclass
class ProjectedPoint:
    nodes: int
    ranks: int
    scaling: str  # weak or strong
    micro_batch: float
    compute_s: float
    comm_s: float
    step_s: float
    tokens_per_s: float
    scaling_efficiency: float  # tokens/s over N/N1 × the tokens/s of the scaling's smallest projected point (N1 ranks)
    link: str


@dataclass
class Projection:
    trial_id: str
    measured_tokens_per_s: float
    measured_ranks: int
    compute_s: float
    compute_source: str
    overlap: float
    points: list[ProjectedPoint] = field(default_factory=list)
    inputs: dict = field(default_factory=dict)
    ignores: tuple = IGNORED

    def to_dict(self) -> dict:
        return asdict(self)


def compute_time(rec: dict, stats, links: dict[str, LinkFit]) -> tuple[float, str]:
    """The trial's measured compute per step (module docstring) and how it was obtained."""
    from .throughput import comm_seconds
    from .accuracy import spec_of

    spec = spec_of(rec)
    pattern = comm_pattern(spec, stats, rec.get("ds_config"))
    step = float(rec["step_time_s"])
    if rec.get("comm_s") is not None:
        comm = float(rec["comm_s"]) + float(rec.get("allgather_s") or 0.0)
        how = "measured step time less DeepSpeed's communication timers (bwd_allreduce, all-gather)"
        if spec.zero_stage == 3:  # its gathers run inside forward, under no timer: the model's wire time for them
            comm += comm_seconds([c for c in pattern if c.kind == "all_gather"], links, spec.world_size) if links else 0.0
            how += " and the model's wire time of ZeRO-3's forward gathers" if links else \
                "; ZeRO-3's forward gathers stay in (no collectives measured)"
        return max(0.0, step - comm), how
    wire = comm_seconds(pattern, links, spec.world_size) if links else 0.0
    return max(0.0, step - wire), "measured step time less the model's wire time (no breakdown pass)"


def project(rec: dict, stats, compute_s: float, compute_source: str, nodes: list[int], gpus_per_node: int,
            intra: Link, inter: Link | None, overlap: float = 0.0, scalings: tuple[str, ...] = ("weak", "strong")) -> Projection:
    """Project a measured training record (module docstring)."""
    from .accuracy import spec_of

    spec = spec_of(rec)
    n0 = spec.world_size
    global_samples = spec.micro_batch * spec.grad_accum * n0
    out = Projection(rec["trial_id"], float(rec["tokens_per_s"]), n0, compute_s, compute_source, overlap,
                     inputs={"intra": asdict(intra), "inter": asdict(inter) if inter else None,
                             "gpus_per_node": gpus_per_node, "nodes": nodes})
    for scaling in scalings:
        for k in nodes:
            n = k * gpus_per_node
            link = intra if k == 1 else inter
            if link is None:
                continue
            if scaling == "weak":
                mb, compute = float(spec.micro_batch), compute_s
            else:
                per_rank = global_samples / n / spec.grad_accum
                if per_rank < 1:
                    continue
                mb, compute = per_rank, compute_s * n0 / n
            at_n = spec.model_copy(update={"world_size": n, "micro_batch": max(1, round(mb))})
            wire = sum(c.calls * ring_time(c.kind, n, c.bytes_per_call, link.alpha_s, link.beta_Bps)
                       for c in comm_pattern(at_n, stats, rec.get("ds_config")))
            step = compute + (1 - overlap) * wire
            tokens = mb * spec.seq_len * spec.grad_accum * n
            tps = tokens / step
            first = next((q for q in out.points if q.scaling == scaling), None)
            eff = 1.0 if first is None else tps / (first.tokens_per_s * n / first.ranks)
            out.points.append(ProjectedPoint(k, n, scaling, mb, compute, (1 - overlap) * wire, step, tps, eff, link.source))
    return out
