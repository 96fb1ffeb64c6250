"""Memory per rank: the model-state bytes the engine really holds, and each trial's own peak."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from . import allocated
from .collector import Base

_KB = 1024


@dataclass
class ModelStateBytes:
    """Bytes of distinct tensor storages the engine holds, by kind (ZeRO paper's three states)."""

    params: int = 0
    grads: int = 0
    optimizer: int = 0  # fp32 master copies + Adam moments
    buffers: int = 0  # communication buckets: not model states ("the rest" of the memory)
    host: int = 0  # of params + grads + optimizer: what ZeRO-Offload keeps on the host (offloaded)
    detail: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def _walk(obj, path: str, depth: int, seen_obj: set[int]):
    """Yield (path, tensor) for every tensor reachable through lists, dicts and DeepSpeed objects."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
        ds_tensor = getattr(obj, "ds_tensor", None)  # a ZeRO-3 parameter's own partition
        if isinstance(ds_tensor, torch.Tensor):
            yield path + ".ds_tensor", ds_tensor
        if obj.grad is not None:
            yield path + ".grad", obj.grad
        return
    if depth <= 0 or id(obj) in seen_obj:
        return
    seen_obj.add(id(obj))
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, f"{path}[{k if isinstance(k, (str, int)) else type(k).__name__}]", depth - 1, seen_obj)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{path}[{i}]", depth - 1, seen_obj)
    elif isinstance(obj, torch.nn.Module):
        return  # the model's parameters are counted from the module itself
    elif type(obj).__module__.startswith(("deepspeed", "torch.optim")) and hasattr(obj, "__dict__"):
        for k, v in vars(obj).items():
            yield from _walk(v, f"{path}.{k}", depth - 1, seen_obj)


_BUFFER = re.compile(r"bucket", re.I)
_GRAD = re.compile(r"grad", re.I)
_OPT_STATE = re.compile(r"\.state\[|exp_avg|master|fp32|single_partition", re.I)


class _Ledger:
    """Bytes per kind, counting each byte of each storage once (first claim wins).

    DeepSpeed keeps flat buffers with views into them (fp32 partitions, gradient buckets,
    parameter partitions); a byte range already claimed is not counted again, and a view
    counts its own range, not its whole storage (a gradient that lives in a 1 GB bucket is
    a gradient; the unused rest of the bucket is a buffer).
    """

    def __init__(self, out: ModelStateBytes):
        self.out = out
        self.claimed: dict[int, list[tuple[int, int]]] = {}

    def add(self, kind: str, path: str, t: torch.Tensor, host: bool = False) -> None:
        if t.numel() == 0 or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0:
            return
        esz = t.element_size()
        start = t.storage_offset() * esz
        span = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))  # elements from first to last
        end = min(start + span * esz, storage.nbytes())
        new = end - start
        ranges = self.claimed.setdefault(ptr, [])
        for a, b in ranges:
            new -= max(0, min(b, end) - max(a, start))
        if new <= 0:
            return
        ranges.append((start, end))
        setattr(self.out, kind, getattr(self.out, kind) + new)
        if host and kind != "buffers":
            self.out.host += new
        top = path.split("[")[0]
        self.out.detail[top] = self.out.detail.get(top, 0) + new


def model_state_bytes(engine) -> ModelStateBytes:
    """Read the bytes of parameters, gradients and optimizer states held by this rank.

    Walks the engine's module parameters (a ZeRO-3 parameter's `ds_tensor` partition, and
    its full data only where it persists whole; a parameter gathered for compute is a
    temporary, counted as `buffers`), the module's gradients, and everything reachable from
    `engine.optimizer`: the ZeRO wrapper's fp32 partitions, gradient partitions and the inner
    optimizer's Adam moments. Communication buckets (ZeRO's `ipg_buckets`, reduce_bucket_size
    elements) are `buffers` too, outside the model-state total. Call it while gradients
    exist: see `probe_model_states`.
    """
    out = ModelStateBytes()
    ledger = _Ledger(out)
    params = list(engine.module.parameters())
    found = list(_walk(engine.optimizer, "optimizer", depth=6, seen_obj=set())) if engine.optimizer is not None else []
    host = offloaded(engine)
    for p in params:
        ds = getattr(p, "ds_tensor", None)
        if ds is not None:
            ledger.add("params", "module.ds_tensor", ds, host(ds, "param"))
            secondary = getattr(p, "ds_secondary_tensor", None)  # ZeRO++ hpZ: the node-local secondary partition
            if isinstance(secondary, torch.Tensor):
                ledger.add("params", "module.ds_secondary_tensor", secondary)
            persistent = getattr(p, "ds_persist", False)
            ledger.add("params" if persistent else "buffers", "module.param" if persistent else "module.gathered", p.data)
        else:
            ledger.add("params", "module.param", p.data)
    # Buckets before gradients: a gradient waiting in a reduce bucket is communication
    # buffer space (constant-size, as ZeRO-R §6 treats it), not a held gradient.
    for path, t in found:
        if _BUFFER.search(path):
            ledger.add("buffers", path, t)
    for p in params:
        if p.grad is not None:
            ledger.add("grads", "module.grad", p.grad)
    for path, t in found:
        if _OPT_STATE.search(path):
            ledger.add("optimizer", path, t, host(t, "optimizer"))
        elif _GRAD.search(path):
            ledger.add("grads", path, t, host(t, "optimizer"))
        else:
            ledger.add("optimizer", path, t, host(t, "optimizer"))
    return out


def offloaded(engine):
    """Whether a tensor the ZeRO optimizer holds lives on the host under ZeRO-Offload:
    `host(tensor, "optimizer" | "param")`. On a GPU the tensor's own device says it. On the
    CPU accelerator every tensor is on the host, so DeepSpeed's own offload settings say it
    (engine.zero_offload_optimizer / zero_offload_param): with the optimizer offloaded, its
    fp32 tensors (master partitions, Adam moments, fp32 gradient partitions: what
    ZeRO-Offload moves, Ren et al. 2021 §4) are the host's and the 16-bit ones the device's;
    with parameters offloaded (ZeRO-3), the parameter partitions too."""
    on_cpu = torch.device(getattr(engine, "device", "cpu")).type == "cpu"
    def device_of(cfg) -> str:
        d = getattr(cfg, "device", None)
        return str(getattr(d, "value", d) or "none")
    opt = device_of(engine.zero_offload_optimizer()) in ("cpu", "nvme") if hasattr(engine, "zero_offload_optimizer") else False
    par = device_of(engine.zero_offload_param()) in ("cpu", "nvme") if hasattr(engine, "zero_offload_param") else False

    def host(t: torch.Tensor, owner: str) -> bool:
        if not on_cpu:
            return t.device.type == "cpu"
        if owner == "param":
            return par
        return opt and t.dtype == torch.float32
    return host


def zero_paper_bytes(n_params: int, stage: int, dp: int) -> float:
    """Model-state bytes per rank for mixed-precision Adam (Rajbhandari et al. 2020, ZeRO, §3 and Fig. 1).

    K = 12 bytes of optimizer state per parameter (fp32 master, momentum, variance), 2 bytes of
    fp16/bf16 parameters and 2 of gradients: stage 0: 16Ψ; 1: 4Ψ + 12Ψ/N_d; 2: 2Ψ + 14Ψ/N_d;
    3: 16Ψ/N_d.
    """
    psi, n = float(n_params), float(dp)
    return {0: 16 * psi, 1: 4 * psi + 12 * psi / n, 2: 2 * psi + 14 * psi / n, 3: 16 * psi / n}[stage]


def deepspeed_model_state_bytes(n_params: int, stage: int, dp: int, precision: str, n_persistent: int = 0) -> float:
    """Model-state bytes per rank as DeepSpeed (0.19) really lays them out, with Adam.

    p = bytes of a module parameter (2 in bf16/fp16, 4 in fp32); gradients take p as well;
    Adam keeps 8 bytes (momentum + variance, fp32) and, in ZeRO 1-3 or any mixed precision,
    a separate 4-byte fp32 master copy. The difference from the ZeRO paper (which assumes
    16-bit parameters): in fp32, stage 0 keeps no master copy (16Ψ), but stages 1-3 do
    (the fp32 partition is a clone), so fp32 ZeRO-1 holds 8Ψ + 12Ψ/N_d, ZeRO-2 4Ψ + 16Ψ/N_d,
    ZeRO-3 20Ψ/N_d. ZeRO-1 holds full gradients until they are reduced; ZeRO-2/3 reduce them
    in buckets during backward (buckets are buffers, not model states). ZeRO-3 keeps the
    `n_persistent` parameters under `stage3_param_persistence_threshold` whole on every
    rank, besides their partition. For bf16 this equals `zero_paper_bytes`.
    Cross-checked against the engine's tensors on 2 ranks in tests/test_collector.py.
    """
    psi, n = float(n_params), float(dp)
    p = 4.0 if precision == "fp32" else 2.0
    master = 0.0 if (stage == 0 and precision == "fp32") else 4.0
    opt = 8.0 + master
    if stage == 0:
        return (p + p + opt) * psi
    if stage == 1:
        return (p + p) * psi + opt * psi / n
    if stage == 2:
        return p * psi + (p + opt) * psi / n
    return (p + p + opt) * psi / n + p * n_persistent


# glibc's mallopt(3) parameters (malloc.h). glibc serves a block above M_MMAP_THRESHOLD with its
# own mmap and unmaps it when freed, so every such allocation faults its pages in again. By
# default the threshold is dynamic: 128 KiB in a fresh process, rising to each freed mmapped
# block's size up to 32 MiB (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit), trim threshold twice it.
# So a CPU trial ran slower as the first of a pool than later in it (a 32-sample micro-batch of
# the tiny Llama: 0.37 vs 0.352 s a step, docs/search.md). CPU ranks fix both at the values
# the dynamic rule ends at, from their start (worker.py), so a trial's speed does not depend
# on what ran before it. A user's MALLOC_* / GLIBC_TUNABLES environment wins.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
STEADY_MALLOC = {M_MMAP_THRESHOLD: 32 * _KB * _KB, M_TRIM_THRESHOLD: 64 * _KB * _KB}
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
malloc_setting: str | None = None  # what set_malloc did in this process (each record's memory readings carry it)


def set_malloc(settings: dict[int, int]) -> str:
    """Apply glibc mallopt settings to this process; returns (and remembers) what was done."""
    import os

    global malloc_setting
    users = [k for k in MALLOC_ENV if os.environ.get(k)]
    if users:
        malloc_setting = "the user's: " + ", ".join(f"{k}={os.environ[k]}" for k in users)
        return malloc_setting
    try:
        import ctypes

        mallopt = ctypes.CDLL("libc.so.6").mallopt
        done = all(mallopt(k, v) == 1 for k, v in settings.items())
    except (OSError, AttributeError):
        done = False
    malloc_setting = (f"glibc mmap threshold {settings[M_MMAP_THRESHOLD] // _KB // _KB} MiB, trim threshold "
                      f"{settings[M_TRIM_THRESHOLD] // _KB // _KB} MiB (fixed)") if done else "the allocator's defaults"
    return malloc_setting


class PeakMemory(Base):
    """Each trial's own peak, a collector (collector.py) over the span it watches: the process
    RSS high-water mark (the peak on a CPU) and, where collect/allocated.py's counter is
    installed, torch's allocator's own peak (`allocated_peak_bytes`, what the memory model
    predicts); `CudaPeakMemory` takes both from CUDA's caching allocator.

    RSS's high-water mark (VmHWM) never falls by itself, so a trial in a warm worker would see
    its predecessors' peak; Linux resets it when "5" is written to /proc/self/clear_refs
    (proc(5), since Linux 4.0). Where that is not possible we say so (`hwm_reset=False`).
    """

    def __init__(self) -> None:
        self.hwm_reset = False
        self.rss_at_reset: int | None = None
        self.allocated_at_reset = 0

    def start(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        import psutil

        self.rss_at_reset = psutil.Process().memory_info().rss
        allocated.reset_peak()
        self.allocated_at_reset = allocated.current()

    @staticmethod
    def rss_peak_bytes() -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * _KB
        except OSError:
            pass
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _KB  # Linux reports KiB

    def stop(self) -> dict:
        rss = self.rss_peak_bytes()
        return {"memory": {"rss_peak_bytes": rss, "rss_peak_reset": self.hwm_reset,
                           "rss_at_start_bytes": self.rss_at_reset, "peak_mem_bytes": rss,
                           "baseline_bytes": self.rss_at_reset, "malloc": malloc_setting, **self.allocator_peak()}}

    def allocator_peak(self) -> dict:
        """The tensors' own peak from llmbench's counting CPU allocator, or why there is none."""
        if not allocated.installed():
            return {"allocated_peak_bytes": None, "allocated_error": allocated.error or "not installed"}
        return {"allocated_peak_bytes": allocated.peak() - self.allocated_at_reset,
                "allocated_at_start_bytes": self.allocated_at_reset}


class CudaPeakMemory(PeakMemory):
    """On a GPU the peak is the caching allocator's (`torch.cuda.max_memory_allocated`), from
    what it held at start; the RSS figures stay alongside."""

    cuda_at_reset = 0

    def start(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.cuda_at_reset = torch.cuda.memory_allocated()
        super().start()

    def stop(self) -> dict:
        out = super().stop()
        mem, stats = out["memory"], torch.cuda.memory_stats()
        mem.update(
            cuda_peak_allocated_bytes=stats.get("allocated_bytes.all.peak", 0),
            cuda_peak_reserved_bytes=stats.get("reserved_bytes.all.peak", 0),
            cuda_alloc_retries=stats.get("num_alloc_retries", 0),
            cuda_ooms=stats.get("num_ooms", 0),
        )
        mem["peak_mem_bytes"] = mem["cuda_peak_allocated_bytes"]
        mem["baseline_bytes"] = self.cuda_at_reset
        return out

    def allocator_peak(self) -> dict:
        """The caching allocator's own counters."""
        return {"allocated_peak_bytes": max(0, torch.cuda.max_memory_allocated() - self.cuda_at_reset),
                "allocated_at_start_bytes": self.cuda_at_reset}


def peak_memory(accelerator: str) -> PeakMemory:
    return CudaPeakMemory() if accelerator == "cuda" else PeakMemory()


def probe_model_states(engine, run_micro_step) -> ModelStateBytes:
    """Model states at their fullest during one micro-step: the larger of two snapshots.

    One just before DeepSpeed reduces the gradients (`engine.allreduce_gradients`, where
    ZeRO-1 still holds every full gradient) and one after backward (where ZeRO-2/3 hold
    their reduced partitions). `run_micro_step` runs the forward and backward.
    """
    snaps: list[ModelStateBytes] = []
    original = engine.allreduce_gradients

    def measured(*args, **kwargs):
        snaps.append(model_state_bytes(engine))
        return original(*args, **kwargs)

    engine.allreduce_gradients = measured
    try:
        run_micro_step()
    finally:
        del engine.allreduce_gradients  # back to the class's method
    snaps.append(model_state_bytes(engine))
    return max(snaps, key=lambda s: s.total)


def host_oom_kills() -> int | None:
    """The kernel's count of OOM kills in this cgroup (v2 `memory.events`, v1 `memory.oom_control`).

    The driver reads it before and after a trial: a rank that died while the count rose was
    killed by the host's OOM killer (a SIGKILL alone does not say so). None where unreadable.
    """
    for path in ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"):
        try:
            with open(path) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


def oom_killed(pids: list[int]) -> str | None:
    """The kernel log's line if the host's OOM killer ended one of these processes, else None.

    A global OOM kill (the whole host out of memory) does not show in a cgroup's counter;
    the kernel log names the victim's pid. Needs permission to read it (dmesg); None otherwise.
    """
    import subprocess

    if not pids:
        return None
    try:
        log = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in reversed(log.splitlines()):
        for pid in pids:
            if f"Killed process {pid} " in line:
                return line.strip()
    return None
