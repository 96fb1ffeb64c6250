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
    trial's own peak against --memory-budget, as trial_peak_mem_bytes measures it)."""

    bytes_per_rank: float
    what: str = "device"
    margin: float = PRUNE_MARGIN
    label: str = ""
    shared: bool = False  # the bytes are a CPU host's, shared by the trial's ranks on it

    def per_rank(self, ranks_on_node: int) -> float:
        return self.bytes_per_rank / max(1, ranks_on_node) if self.shared else self.bytes_per_rank


def default_budget(hw, memory_budget: str | None = None) -> Budget:
    """--memory-budget (a size such as 2GiB: the trial's own peak per rank), else the device: a
    GPU's memory, or on the CPU accelerator the host's memory shared by the ranks. A malformed
    size is bad input (SpecError)."""
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
    """What is held against the budget: the own peak (--memory-budget) or what the device needs,
    less a pool's one-time costs: every configuration pays them, whichever runs first, so they
    must not decide which one is pruned (else pruning the first trial makes the next one first)."""
    return (pred.peak if budget.what == "budget" else pred.device_total) - pred.one_time


def prune_reason(pred: MemoryPrediction | None, budget: Budget, ranks_on_node: int = 1) -> str | None:
    """Why the trial is not launched, or None when it is predicted to fit (within the margin)."""
    if pred is None:
        return None
    need, have = predicted_bytes(pred, budget), budget.per_rank(ranks_on_node)
    if need <= have * (1 + budget.margin):
        return None
    term = "own peak" if budget.what == "budget" else "memory"
    return (f"predicted {term} {size(need)} per rank exceeds the {budget.label or budget.what} "
            f"{size(have)} by more than {budget.margin:.0%} "
            f"(states {size(pred.states_device)}, activations {size(pred.activations)}; "
            f"peak in {pred.phase}); --no-prune runs it")


def size(b: float) -> str:
    """Bytes as GiB, or MiB below 1 GiB."""
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"
