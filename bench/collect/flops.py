"""Achieved FLOP/s, MFU and HFU, and the datasheet peaks they are quoted against."""

from __future__ import annotations

from ..models import ModelStats, flops_per_token

TFLOP = 1e12

# Dense (no 2:4 sparsity) peak TFLOP/s per device and dtype, from the vendors' datasheets:
# A100: NVIDIA A100 Tensor Core GPU datasheet (2021), SXM and PCIe alike: bf16/fp16 312,
#   tf32 156, fp32 19.5.
# H100 SXM / H100 PCIe: NVIDIA H100 Tensor Core GPU datasheet (2023): bf16/fp16 989 / 756
#   (the datasheet's 1,979 / 1,513 are with sparsity), tf32 494 / 378, fp32 67 / 51.
# H100 NVL: the same datasheet, per GPU: bf16/fp16 835.5 (1,671 with sparsity), tf32 417.5,
#   fp32 60.
# fp8 (dense; the datasheets' 3,958 / 3,026 / 3,341 are with sparsity): H100 SXM and H200
#   1,979, H100 PCIe 1,513, H100 NVL 1,670.5; the A100 has no fp8.
# H200: NVIDIA H200 Tensor Core GPU datasheet (2024), same compute as H100 SXM: bf16/fp16
#   989, tf32 494, fp32 67.
# fp32 training runs its matmuls in fp32 unless TF32 is allowed: a trial whose ranks allowed
# it (torch.get_float32_matmul_precision() not "highest", recorded as fp32_matmul_precision)
# is quoted against the tf32 peak, else against the fp32 (non-tensor-core) one. An fp8 trial
# (quant=fp8: torchao's float8 linear layers) is quoted against the fp8 peak.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "H100 SXM": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0, "fp8": 1979.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0, "fp8": 1513.0},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0, "fp8": 1670.5},
    "H200": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0, "fp8": 1979.0},
}


def peak_dtype(precision: str, quant: str = "none", fp32_matmul_precision: str | None = None) -> str:
    """The datasheet column a trial's matmuls run in: fp8 for quant=fp8, tf32 for fp32 with
    TF32 allowed, else the precision itself."""
    if quant == "fp8":
        return "fp8"
    if precision == "fp32" and fp32_matmul_precision not in (None, "highest"):
        return "tf32"
    return precision


def datasheet_peak_tflops(device_name: str, precision: str, quant: str = "none",
                          fp32_matmul_precision: str | None = None) -> float | None:
    """Look a device up by the name torch reports (e.g. "NVIDIA H100 80GB HBM3", "NVIDIA H100
    NVL"); the peak of the column peak_dtype names; None if unknown."""
    name = device_name.upper()
    if "H200" in name:
        key = "H200"
    elif "H100" in name:
        key = "H100 NVL" if "NVL" in name else "H100 PCIe" if "PCIE" in name else "H100 SXM"
    elif "A100" in name:
        key = "A100"
    else:
        return None
    return PEAK_TFLOPS[key].get(peak_dtype(precision, quant, fp32_matmul_precision))


def hfu_flops_per_token(stats: ModelStats, seq_len: int, activation_checkpointing: bool) -> float:
    """Hardware FLOPs per token: model FLOPs plus the forward pass recomputed under activation
    checkpointing (Korthikanti et al. 2022, "Reducing Activation Recomputation", §5: HFU
    counts recomputation, MFU does not).

    Hugging Face checkpointing recomputes the decoder layers only, not the embeddings or the
    LM head, so the extra is one forward of the layers: 2·N_layers + 4·L·H·Q·T (full
    recompute of all layers gives 8·N + 16·L·H·Q·T when N is all in the layers).
    """
    base = flops_per_token(stats, seq_len)
    if not activation_checkpointing:
        return base
    return base + 2 * stats.n_layer_params + 4 * stats.n_layers * stats.n_heads * stats.head_dim * seq_len


def utilisation(stats: ModelStats, seq_len: int, tokens_per_s_per_device: float, activation_checkpointing: bool,
                peak_tflops: float | None, measured_peak_tflops: float | None) -> dict:
    """Achieved TFLOP/s per device, MFU and HFU (against the datasheet peak and the measured GEMM peak).

    MFU = model FLOPs per token × tokens/s per device / peak (PaLM, Chowdhery et al. 2022, App. B).
    """
    fpt = flops_per_token(stats, seq_len)
    hfpt = hfu_flops_per_token(stats, seq_len, activation_checkpointing)
    achieved = fpt * tokens_per_s_per_device / TFLOP
    hw_achieved = hfpt * tokens_per_s_per_device / TFLOP
    return {
        "flops_per_token": fpt,
        "hfu_flops_per_token": hfpt,
        "tflops_per_device": achieved,
        "peak_tflops": peak_tflops,
        "mfu": achieved / peak_tflops if peak_tflops else None,
        "hfu": hw_achieved / peak_tflops if peak_tflops else None,
        "measured_peak_tflops": measured_peak_tflops,
        "mfu_vs_measured_peak": achieved / measured_peak_tflops if measured_peak_tflops else None,
        "hfu_vs_measured_peak": hw_achieved / measured_peak_tflops if measured_peak_tflops else None,
    }


def screen_utilisation(u: dict) -> list[str]:
    """Blank out any utilisation above 1.0 of its peak, in place, and say why.

    A trial cannot run faster than the device's peak: a figure above it means the FLOP count,
    the time or the peak is wrong (on a CPU, typically a peak probe that took a slower kernel
    path than the model), so it is reported as a measurement error, never as a result."""
    notes = []
    for key, peak in (("mfu", "peak_tflops"), ("hfu", "peak_tflops"), ("mfu_vs_measured_peak", "measured_peak_tflops"),
                      ("hfu_vs_measured_peak", "measured_peak_tflops")):
        v = u.get(key)
        if v is not None and v > 1.0:
            notes.append(f"measurement error: {key} came out at {v:.2f}, above the {u.get(peak):.4g} TFLOP/s it is "
                         f"quoted against; it is not reported")
            u[key] = None
    return notes
