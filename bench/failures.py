"""Why a trial or a kernel case did not produce a figure: its status, from the exception itself.

Decided before launch where the accelerator can answer (`prelaunch_unsupported`: DeepSpeed's
own `get_accelerator().supported_dtypes()`); otherwise by the exception's type, and only where
a library raises a plain ValueError/RuntimeError for a refusal, by one table of message
patterns (`PATTERNS`), each tied to the library that raises it (tests/test_failures.py checks
every pattern against the pinned versions). Never by words in a log.
"""

from __future__ import annotations

import math
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

_PACKAGE = Path(__file__).resolve().parent  # llmbench's own code (bench/), kernels included below
_KERNELS = _PACKAGE.parent / "kernels"


class Unsupported(RuntimeError):
    """This hardware or software stack cannot run the trial; the message says why."""


class Diverged(RuntimeError):
    """The loss became NaN/inf, or the fp16 loss scale collapsed."""


# (exception type, text in its message, status, who raises it)
PATTERNS: list[tuple[type, str, str, str]] = [
    (ValueError, "is not supported on your device", "unsupported",
     "deepspeed/runtime/engine.py: 'Type fp16 is not supported on your device.'"),
    (ValueError, "not been implemented on CPU backend", "unsupported",
     "deepspeed/ops/op_builder/cpu/no_impl.py: an op (e.g. ZeRO++ quantized weights) without a CPU kernel"),
    (RuntimeError, "No viable backend for scaled_dot_product_attention", "unsupported",
     "torch SDPA: the backend forced by sdpa_kernel() cannot run here"),
    (RuntimeError, "No available kernel", "unsupported", "torch SDPA (CUDA): no kernel for these inputs"),
    (RuntimeError, "no kernel image is available for execution on the device", "unsupported",
     "the CUDA runtime: this torch build has no kernel for the GPU's architecture"),
    (NotImplementedError, "not implemented for '", "unsupported",
     "torch dispatch: no kernel of this op for the dtype on this device, e.g. \"addmm_impl_cpu_\" not implemented for 'UInt16'"),
    (RuntimeError, "DefaultCPUAllocator: can't allocate memory", "oom", "torch's CPU allocator out of memory"),
]


def raised_by_llmbench(exc: BaseException) -> bool:
    """True when llmbench's own code raised it: the innermost frame is ours and its line is a
    `raise` (an error from a C++ op called by our code also has our frame innermost, but not
    on a `raise` line)."""
    import linecache

    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = Path(tb.tb_frame.f_code.co_filename).resolve()
    ours = _PACKAGE in path.parents or _KERNELS in path.parents
    return ours and linecache.getline(str(path), tb.tb_lineno).lstrip().startswith("raise")


def classify(exc: BaseException) -> str:
    """A failure's status: diverged, unsupported, oom, or failed."""
    import torch

    if isinstance(exc, Diverged):
        return "diverged"
    if isinstance(exc, Unsupported):
        return "unsupported"
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return "oom"
    for cls, text, status, _ in PATTERNS:
        if isinstance(exc, cls) and text in str(exc):
            return status
    if isinstance(exc, ImportError) and not raised_by_llmbench(exc):
        return "unsupported"  # an optional library or its compiled extension is not there
    if isinstance(exc, NotImplementedError):
        # a library saying "no implementation here" is a refusal; llmbench's own is a bug
        return "failed" if raised_by_llmbench(exc) else "unsupported"
    return "failed"


def prelaunch_unsupported(precision: str, accelerator: str) -> str | None:
    """Why DeepSpeed's accelerator for this device cannot train at `precision`, asked of the
    accelerator itself (its `supported_dtypes()`), or None. Nothing is launched for such a trial."""
    from .device import DTYPES

    acc = _accelerator(accelerator)
    if acc is None or precision not in DTYPES:
        return None
    supported = acc.supported_dtypes()
    if DTYPES[precision] in supported:
        return None
    names = ", ".join(str(d).replace("torch.", "") for d in supported)
    return (f"precision {precision}: DeepSpeed's {accelerator.upper()} accelerator trains only in {names} "
            f"(get_accelerator().supported_dtypes())")


def _accelerator(accelerator: str):
    """DeepSpeed's accelerator object for the device the ranks will use (not the driver's own)."""
    import os

    # the driver's DeepSpeed then agrees with its ranks (the pool sets the same for them), and
    # DeepSpeed does not log its auto-detection ("Setting accelerator to CPU ...") on the console
    os.environ.setdefault("DS_ACCELERATOR", accelerator)
    try:
        if accelerator == "cpu":
            from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

            return CPU_Accelerator()
        from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator

        return CUDA_Accelerator()
    except Exception:  # noqa: BLE001 - cannot ask: the rank's own check decides
        return None


@contextmanager
def recorded(res, memory, teardown: Callable[[], None]) -> Iterator[None]:
    """The failure and teardown path every trial shares (training and inference): a failure of
    the body is recorded in `res` (its status from `classify`, the error with a traceback unless
    it is one of our own checks), never raised, except KeyboardInterrupt; the memory collector
    is read if the body did not get that far; `teardown()` always runs and is timed. A
    teardown that fails (a sticky CUDA error in engine.destroy) is recorded too: the trial's
    figures may stand, but the process may not be fit for the next trial."""
    try:
        yield
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - every failure is recorded, the sweep goes on
        res.status = classify(e)
        res.error = f"{type(e).__name__}: {e}".strip()[:2000]
        if not isinstance(e, (Unsupported, Diverged)):  # our own checks need no traceback
            res.error += "\n" + traceback.format_exc(limit=9)[-3000:]  # this frame + the 8 of the body
        # the failed frames' locals (a model, an engine, their tensors) go now, not when the
        # exception is collected: the teardown below then frees them
        traceback.clear_frames(e.__traceback__)
        if not res.memory:
            try:
                res.fill(memory.stop())
            except Exception as m:  # noqa: BLE001 - the trial's own failure is the one to report
                res.notes.append(f"peak memory unreadable after the failure: {type(m).__name__}: {m}")
    finally:
        t0 = time.perf_counter()
        try:
            teardown()
        except Exception as e:  # noqa: BLE001
            res.notes.append(f"teardown failed: {type(e).__name__}: {e}"[:500])
            if res.status == "ok":
                res.status, res.error = "failed", f"teardown failed: {type(e).__name__}: {e}"[:2000]
        res.teardown_s = time.perf_counter() - t0


def first_divergence(losses: list[float], skipped: list[bool], first_step: int) -> tuple[int, float] | None:
    """(step, loss) of the first non-finite loss of a run of steps numbered from `first_step`,
    or None. `skipped` is given for fp16 only: a step whose inf/NaN gradients made dynamic loss
    scaling halve the scale and skip the update is an overflow, not a divergence, even when its
    loss is not finite; a loss scale that collapses is (`_fp16_collapse` in trial.py). In bf16
    and fp32 every non-finite loss counts, even where DeepSpeed's ZeRO optimizer also skipped
    the update (it checks the gradients for inf/NaN whatever the precision). The losses are
    read once, after their steps: nothing synchronises per step."""
    for k, x in enumerate(losses):
        if not math.isfinite(x) and not (k < len(skipped) and skipped[k]):
            return first_step + k, x
    return None


def check_runnable(spec, accelerator: str, nodes: int, notes: list[str]) -> None:
    """On the rank, before anything is built: `Unsupported` for what this device or stack cannot
    run (fp8 without FP8 tensor cores or torchao, torch.compile on a CPU without a C++
    compiler); appends to `notes` what the record should say of options that run but have no
    effect here (kept also when the trial is then refused)."""
    import shutil

    import torch

    from .precision import detect_capabilities, emulated_bf16_note

    notes += [n for n in [emulated_bf16_note(spec.precision, detect_capabilities(accelerator))] if n]
    if spec.quant in ("zeropp-qg", "zeropp") and nodes < 2:
        notes.append("zero_quantized_gradients has no effect on a single node: DeepSpeed quantizes only inter-node gradient traffic")
    if spec.quant in ("zeropp-hpz", "zeropp") and nodes < 2:
        notes.append("zero_hpz_partition_size has no effect on a single node: the secondary partition is the whole node")
    if spec.quant == "fp8":
        if accelerator != "cuda" or torch.cuda.get_device_capability() < (8, 9):
            raise Unsupported("fp8 training needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+)")
        try:
            import torchao.float8  # noqa: F401
        except ImportError:
            raise Unsupported("fp8 training needs torchao (pip install torchao)") from None
    if spec.compile and accelerator == "cpu" and shutil.which("g++") is None and shutil.which("c++") is None:
        raise Unsupported("torch.compile on CPU needs a C++ compiler (g++)")
