"""`precision: auto`: the training precision that fits the device, decided before launch.

- CUDA: bf16 from compute capability 8.0 (Ampere) on, where tensor cores compute bf16
  (NVIDIA A100 whitepaper); older GPUs (V100 sm70, T4 sm75) have fp16 tensor cores and no
  bf16, so fp16 with DeepSpeed's dynamic loss scaling.
- CPU: bf16 only where the CPU computes it natively: AVX512-BF16 (`vdpbf16ps`) or AMX tiles,
  and oneDNN allowed to use them (ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA at AVX512_CORE_BF16
  or above). Otherwise fp32: without native bf16 torch's bf16 GEMM is emulated, ~30× slower
  than fp32 (1.3 vs 42.6 GFLOP/s on an AVX2 EPYC, 3.2 vs 99.9 with
  `ONEDNN_MAX_CPU_ISA=AVX2` on an AVX-512 one; see docs/precision.md).
  `torch.ops.mkldnn._is_mkldnn_bf16_supported()` alone is not the test: it is true on any
  AVX-512 CPU, including ones without BF16 instructions (there bf16 runs at ~40% of fp32).

The rule is a pure function of `Capabilities`, so a test can inject every kind of device.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

PRECISIONS = ("fp32", "fp16", "bf16")
REQUESTABLE = ("auto",) + PRECISIONS

# oneDNN's CPU ISA names in increasing order (oneDNN docs, "CPU ISA hints / dispatcher control").
_ONEDNN_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
                "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX10_1_512_AMX", "AVX512_CORE_AMX",
                "AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2")


@dataclass(frozen=True)
class Capabilities:
    """What decides the precision; detected by `detect_capabilities`, injected by tests."""

    accelerator: str                       # "cuda" or "cpu"
    cpu_capability: str = ""               # torch.backends.cpu.get_cpu_capability(): DEFAULT, AVX2, AVX512, ...
    avx512_bf16: bool = False              # torch.cpu._is_avx512_bf16_supported()
    amx: bool = False                      # torch.cpu._is_amx_tile_supported()
    mkldnn_bf16: bool = False              # torch.ops.mkldnn._is_mkldnn_bf16_supported() (oneDNN may run bf16)
    onednn_max_isa: str | None = None      # ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA, if set
    cuda_capability: tuple[int, int] | None = None  # (major, minor) of device 0

    def to_dict(self) -> dict:
        return asdict(self)


def onednn_allows_bf16(max_isa: str | None) -> bool:
    """False when the oneDNN ISA limit stops below AVX512_CORE_BF16 (unset or ALL: no limit)."""
    if not max_isa or max_isa.upper() in ("ALL", "DEFAULT"):
        return True
    name = max_isa.upper()
    if name not in _ONEDNN_ISAS:
        return True  # a name we do not know: newer than our table, so not a limit below BF16
    return _ONEDNN_ISAS.index(name) >= _ONEDNN_ISAS.index("AVX512_CORE_BF16")


def native_bf16(c: Capabilities) -> bool:
    """Does this device compute bf16 at full speed?"""
    if c.accelerator == "cuda":
        return c.cuda_capability is not None and c.cuda_capability >= (8, 0)
    return (c.avx512_bf16 or c.amx) and c.mkldnn_bf16 and onednn_allows_bf16(c.onednn_max_isa)


def auto_precision(c: Capabilities) -> str:
    """What `precision: auto` becomes on this device."""
    if c.accelerator == "cuda":
        return "bf16" if native_bf16(c) else "fp16"
    return "bf16" if native_bf16(c) else "fp32"


def resolve(requested: str, c: Capabilities) -> str:
    """The precision a trial runs at: `auto` resolved, an explicit choice kept (fp16 on a CPU
    stays fp16: DeepSpeed refuses it there and the trial is recorded `unsupported`)."""
    if requested not in REQUESTABLE:
        raise ValueError(f"precision {requested!r}: choose one of {', '.join(REQUESTABLE)}")
    return auto_precision(c) if requested == "auto" else requested


def describe(c: Capabilities) -> str:
    """One line on the device's bf16 support, for notes and `llmbench env`."""
    if c.accelerator == "cuda":
        cc = ".".join(map(str, c.cuda_capability)) if c.cuda_capability else "?"
        return f"compute capability {cc}: " + ("bf16 tensor cores" if native_bf16(c) else "no bf16 tensor cores (fp16 only)")
    units = [n for n, on in (("AVX512-BF16", c.avx512_bf16), ("AMX", c.amx)) if on]
    text = f"torch CPU capability {c.cpu_capability or '?'}, " + (f"{' and '.join(units)}" if units else "no AVX512-BF16 or AMX")
    if units and not onednn_allows_bf16(c.onednn_max_isa):
        text += f", but oneDNN is limited to {c.onednn_max_isa}"
    elif units and not c.mkldnn_bf16:
        text += ", but oneDNN reports no bf16 support"
    return text


def emulated_bf16_note(precision: str, c: Capabilities) -> str | None:
    """The note a bf16 trial carries on a CPU without native bf16 (it was asked for explicitly)."""
    if precision != "bf16" or c.accelerator != "cpu" or native_bf16(c):
        return None
    return (f"bf16 on a CPU without native bf16 ({describe(c)}): its matmuls are emulated, typically ~30x slower "
            f"than fp32, so its throughput says little about bf16 hardware; precision=auto picks fp32 here")


def detect_capabilities(accelerator: str) -> Capabilities:
    """Ask torch about the device a trial will run on."""
    import torch

    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    cap = torch.backends.cpu.get_cpu_capability()

    def probe(fn) -> bool:
        try:
            return bool(fn())
        except (AttributeError, RuntimeError):
            return False

    # private torch probes (present in torch 2.3-2.13): an older or newer torch without one
    # reads as "no", so `auto` errs towards fp32 rather than crashing
    cpu = dict(cpu_capability=cap, avx512_bf16=probe(lambda: torch.cpu._is_avx512_bf16_supported()),
               amx=probe(lambda: torch.cpu._is_amx_tile_supported()),
               mkldnn_bf16=probe(lambda: torch.ops.mkldnn._is_mkldnn_bf16_supported()), onednn_max_isa=onednn)
    if accelerator == "cuda":
        return Capabilities("cuda", cuda_capability=tuple(torch.cuda.get_device_capability(0)), **cpu)
    return Capabilities("cpu", **cpu)
