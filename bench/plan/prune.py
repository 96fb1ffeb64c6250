"""Which trials a plan does not launch: predicted not to fit their device or the memory budget."""

from __future__ import annotations

from dataclasses import dataclass

from .memory import MemoryPrediction

# A trial is pruned only when its prediction exceeds the budget by more than this: the peak
# prediction's accuracy target (docs/plan.md), so a trial that may fit is run, not guessed.
PRUNE_MARGIN = 0.10


@dataclass(frozen=True)
class Budget:
    """Bytes per rank a trial may use. `what`: "device" (the prediction's device_total against
    the device's memory; on a CPU the host's memory shared by its ranks) or "budget" (the
    tensors' own peak against --memory-budget, as torch's allocator counts it:
    trial_allocated_peak_bytes, on CUDA and on a CPU alike)."""

    bytes_per_rank: float
    what: str = "device"
    margin: float = PRUNE_MARGIN
    label: str = ""
    shared: bool = False  # the bytes are a CPU host's, shared by the trial's ranks on it

    def per_rank(self, ranks_on_node: int) -> float:
        return self.bytes_per_rank / max(1, ranks_on_node) if self.shared else self.bytes_per_rank


def default_budget(hw, memory_budget: str | None = None) -> Budget:
    """--memory-budget (a size such as 2GiB: the tensors' own peak per rank, as the allocator
    counts it), else the device: a GPU's memory, or on the CPU accelerator the host's memory
    shared by the ranks. A malformed size is bad input (SpecError)."""
    if memory_budget:
        from ..spec import SpecError
        from .devices import parse_bytes

        try:
            return Budget(float(parse_bytes(memory_budget)), "budget", label="--memory-budget")
        except ValueError as e:
            raise SpecError(f"--memory-budget: {e}") from None
    if hw.accelerator == "cpu":
        return Budget(float(hw.device_memory_bytes), "device", label="host memory shared by the ranks", shared=True)
    return Budget(float(hw.device_memory_bytes), "device", label=f"{hw.device_name} memory")


def predicted_bytes(pred: MemoryPrediction, budget: Budget) -> float:
    """What is held against the budget.

    --memory-budget: the allocator's peak (`allocated_peak`). On CUDA it is the trial's own peak;
    on a CPU it is the same quantity, counted by llmbench's counting allocator, so a budget means
    the same on a laptop as on a GPU. The CPU's RSS is not judged: glibc's heap keeps freed
    blocks and its mmap threshold moves, so one trial measured 69 to 392 MiB (docs/plan.md,
    "What the CPU's own peak is"), while the allocator's peak repeats to 0.1 MiB and is predicted
    within ±20% on 94 of 94 trials. Buckets count whole, as a GPU allocates them (DeepSpeed's
    default 5e8-element bucket is 1 GB even where a tiny model's RSS writes a few MB of it).

    The device: what it needs (device_total: on a CPU the RSS with the process baseline, which
    is what fills the host), less a pool's one-time costs: every configuration pays them,
    whichever runs first, so they must not decide which one is pruned (else pruning the first
    trial makes the next one first)."""
    if budget.what == "budget":
        return pred.allocated_peak
    return pred.device_total - pred.one_time


def judged_peak(pred: MemoryPrediction, budget: Budget) -> tuple[float, str, dict]:
    """The peak a budget looks at, its phase and that phase's parts: the allocator's (buckets
    whole) for --memory-budget, else the own peak (on a CPU its RSS: buckets as pages written)."""
    if budget.what == "budget":
        return pred.allocated_peak, pred.allocated_phase, pred.allocated_peak_terms
    return pred.peak, pred.phase, pred.peak_terms


def prune_reason(pred: MemoryPrediction | None, budget: Budget, ranks_on_node: int = 1) -> str | None:
    """Why the trial is not launched, or None when it is predicted to fit (within the margin)."""
    if pred is None:
        return None
    need, have = predicted_bytes(pred, budget), budget.per_rank(ranks_on_node)
    if need <= have * (1 + budget.margin):
        return None
    _, phase, terms = judged_peak(pred, budget)
    return (f"predicted {'allocator peak' if budget.what == 'budget' else 'memory'} {size(need)} per rank exceeds the "
            f"{budget.label or budget.what} {size(have)} by more than {budget.margin:.0%} "
            f"(states {size(pred.states_device)}, buckets {size(terms.get('buffers', 0.0))}, "
            f"activations {size(pred.activations)}; peak in {phase}); --no-prune runs it")


def size(b: float) -> str:
    """Bytes as GiB, or MiB below 1 GiB."""
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"
