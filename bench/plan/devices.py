"""Named devices a plan can be made for without having them: memory and datasheet peak.

Memory is what the driver reports as the device's total (`nvidia-smi`'s "MiB" column; torch's
`total_memory` may read a little lower), not the marketing GB: A100 40GB
40,960 MiB and 80GB 81,920 MiB (NVIDIA A100 datasheet, 2021: 40 / 80 GB HBM2e); H100 SXM and
PCIe 81,559 MiB (H100 datasheet, 2023: 80 GB HBM3 / HBM2e); H100 NVL 95,830 MiB (94 GB HBM3);
H200 143,771 MiB (H200 datasheet, 2024: 141 GB HBM3e). The peaks are collect/flops.PEAK_TFLOPS
(dense, each cited there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..collect.flops import PEAK_TFLOPS

MiB = 1024**2


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: int
    peak_key: str | None  # the row of collect/flops.PEAK_TFLOPS; None: no datasheet peak
    accelerator: str = "cuda"

    def peak_tflops(self, precision: str) -> float | None:
        return PEAK_TFLOPS.get(self.peak_key or "", {}).get(precision)


DEVICES: dict[str, Device] = {d.name: d for d in [
    Device("a100-40g", 40_960 * MiB, "A100"),
    Device("a100-80g", 81_920 * MiB, "A100"),
    Device("h100-sxm", 81_559 * MiB, "H100 SXM"),
    Device("h100-pcie", 81_559 * MiB, "H100 PCIe"),
    Device("h100-nvl", 95_830 * MiB, "H100 NVL"),
    Device("h200", 143_771 * MiB, "H200"),
]}


def parse_bytes(text: str) -> int:
    """`80GiB`, `80GB`, `512MiB`, `1.5e9` → bytes (GB/MB are powers of 10, GiB/MiB of 2).
    ValueError names a malformed size."""
    t = text.strip().replace(" ", "")
    units = {"TIB": 1024**4, "GIB": 1024**3, "MIB": 1024**2, "KIB": 1024, "TB": 10**12, "GB": 10**9, "MB": 10**6,
             "KB": 10**3, "B": 1}
    for unit, mult in units.items():
        if t.upper().endswith(unit):
            number = t[: -len(unit)]
            break
    else:
        number, mult = t, 1
    try:
        value = float(number) * mult
    except (ValueError, OverflowError):
        raise ValueError(f"{text!r} is not a size (use e.g. 80GiB, 512MiB, 40GB)") from None
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"{text!r}: a size must be a finite number of bytes, at least 1")
    return int(value)
