"""Bytes torch's CPU allocator holds live, and their peak: on a CPU what CUDA's
`memory_allocated` / `max_memory_allocated` are on a GPU.

A CPU process's RSS high-water mark (collect/memory.PeakMemory) is the tensors' peak plus
whatever glibc's heap kept from before: the same trial measured 69 to 392 MiB in one pair of
processes (docs/plan.md). c10 keeps no counter for CPU tensors, so llmbench installs one:
csrc/counting_allocator.cpp wraps c10's CPU allocator (c10::SetCPUAllocator), counts the bytes
every block asked for until its deleter runs, and keeps the peak. It is compiled once by
torch's JIT extension builder (3 s on the 2-core VM: it includes c10's headers only; cached in TORCH_EXTENSIONS_DIR like DeepSpeed's
ops) and costs an atomic add and a hash-map entry per allocation.

Blocks allocated before `install()` are not counted, and freeing them does not lower the count,
so a trial's own peak is `peak - current` at its start, after a reset (as on CUDA). torch's
profiler also reports CPU allocations, but keeping its records moved the ranks' RSS peak by
60-70 MiB on the tiny model: not a measurement to run beside another.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

_lib: ctypes.CDLL | None = None
error: str | None = None  # why the counter is not installed in this process, if it is not


def install() -> bool:
    """Build (once per machine) and install the counting allocator in this process; False,
    with `error` set, where it could not be (no compiler, another allocator installed)."""
    global _lib, error
    if _lib is not None:
        return True
    if error is not None:
        return False
    try:
        from torch.utils.cpp_extension import load

        src = Path(__file__).with_name("csrc") / "counting_allocator.cpp"
        path = load(name="llmbench_counting_allocator", sources=[str(src)], extra_cflags=["-O2"],
                    is_python_module=False, verbose=False)
        lib = ctypes.CDLL(os.fspath(path))
        for fn in ("llmbench_current", "llmbench_peak"):
            getattr(lib, fn).restype = ctypes.c_int64
        if lib.llmbench_install() != 1:
            error = "another CPU allocator is installed with a higher priority"
            return False
        _lib = lib
        return True
    except Exception as e:  # noqa: BLE001 - a build failure is recorded, the trial goes on
        error = f"the counting allocator could not be built: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return False


def installed() -> bool:
    return _lib is not None


def current() -> int:
    """Bytes of counted blocks alive now (0 if not installed)."""
    return int(_lib.llmbench_current()) if _lib is not None else 0


def peak() -> int:
    """The most bytes alive at once since the last `reset_peak`."""
    return int(_lib.llmbench_peak()) if _lib is not None else 0


def reset_peak() -> None:
    if _lib is not None:
        _lib.llmbench_reset_peak()
