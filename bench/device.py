"""The device a rank computes on: its torch.device, the dtype names, and the one synchronise.

Every timing in llmbench reads the wall clock at the edges of device work; on CUDA that work
is asynchronous, so the edges synchronise (`sync`), on a CPU there is nothing to wait for.
"""

from __future__ import annotations

import torch

# The precisions llmbench names, as torch dtypes (one table for trials, inference, kernels).
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def rank_device(accelerator: str) -> torch.device:
    """This rank's device: its current CUDA device (set from LOCAL_RANK by the worker), or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if accelerator == "cuda" else torch.device("cpu")


def sync(device: torch.device | str | None = None) -> None:
    """Wait for the device's queued work (CUDA); a no-op on a CPU. Accepts a torch.device, a
    device string ("cuda:0", "cpu") or an accelerator name ("cuda", "cpu")."""
    if device is None:
        return
    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    if kind == "cuda":
        torch.cuda.synchronize()


def release_host_memory() -> None:
    """Hand freed heap back to the OS (glibc `malloc_trim`), so the next trial in a warm
    worker starts from a process about as small as a fresh one."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def release_memory(device: torch.device) -> None:
    """After a trial: collect garbage, return the CUDA caching allocator's free blocks, trim the heap."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    release_host_memory()
