"""Pruning a trained model before it is measured (the inference scenario's `prune` axis).

What is pruned: every linear layer of the decoder (attention and MLP projections: `nn.Linear`,
GPT-2's transformers `Conv1D`), not the LM head nor the embeddings, which the pruning literature leaves dense (Frantar & Alistarh 2023,
SparseGPT §4; Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks", the 2:4 recipe).

- `magnitude-NN`: in each layer, the NN% of weights with the smallest |w| are zeroed
  (`torch.nn.utils.prune.l1_unstructured`, then `prune.remove`: the zeros are written into the
  weight and the mask is gone). The tensor stays dense: its zeros are stored and multiplied,
  so it saves neither bytes nor time; the record's weight bytes show it.
- `2:4`: in every group of 4 consecutive weights of a row, the 2 smallest |w| are zeroed
  (torchao's `apply_fake_sparsity`, torch.ao's WeightNormSparsifier with 1×4 blocks), then
  the weights are stored in torch's semi-structured sparse format (torchao `sparsify_` with
  `SemiSparseWeightConfig`: half the values plus metadata, run by cuSPARSELt/CUTLASS), or,
  with quant=fp8-dyn, quantized to fp8 in torchao's 2:4 packing. Both need CUDA and shapes
  torch's semi-structured format accepts, checked by torch before anything changes; a refusal,
  a Conv1D layer or a layer torchao leaves dense records the trial `unsupported` with why.
"""

from __future__ import annotations

import torch

from .failures import Unsupported


def _linear_types() -> tuple[type, ...]:
    """nn.Linear, and transformers' Conv1D: GPT-2's projections (c_attn, c_proj, c_fc) are
    Conv1D, a linear layer whose weight is stored transposed ([in, out])."""
    from transformers.pytorch_utils import Conv1D

    return torch.nn.Linear, Conv1D


def is_decoder_linear(module: torch.nn.Module, name: str) -> bool:
    """The layers pruning touches: every linear layer (nn.Linear, GPT-2's Conv1D) but the LM head."""
    return isinstance(module, _linear_types()) and not name.split(".")[-1] == "lm_head"


def decoder_linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if is_decoder_linear(m, n)]


def weight_sparsity(model: torch.nn.Module) -> float:
    """Zeros among the decoder linear layers' weights, counted (dense weights only)."""
    layers = decoder_linears(model)
    zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
    return zeros / max(1, sum(m.weight.numel() for _, m in layers))


def magnitude(model: torch.nn.Module, fraction: float) -> None:
    """Zero `fraction` of each decoder linear layer's weights, smallest |w| first, permanently."""
    from torch.nn.utils import prune

    for _, m in decoder_linears(model):
        prune.l1_unstructured(m, name="weight", amount=fraction)
        prune.remove(m, "weight")


def two_four(model: torch.nn.Module, quant: str) -> tuple[str, float]:
    """2:4 pattern by magnitude, then torchao's semi-structured storage (or its 2:4 fp8 packing
    with quant=fp8-dyn). Returns the torchao config's name and the sparsity counted on the
    dense weights before they are converted; `Unsupported` with torchao's or torch's message
    where this device has no 2:4 kernels."""
    from torchao.sparsity import apply_fake_sparsity

    layers = decoder_linears(model)
    conv = [n for n, m in layers if not isinstance(m, torch.nn.Linear)]
    if conv:
        raise Unsupported(f"2:4 sparsity needs nn.Linear layers: {len(conv)} of this model's ({conv[0]}, ...) are "
                          f"transformers Conv1D (GPT-2), whose transposed weight torchao's sparsify_ does not convert")
    _check_semi_structured(layers)
    apply_fake_sparsity(model, filter_fn=is_decoder_linear)
    sparsity = weight_sparsity(model)
    kind = "Float8DynamicActivationFloat8WeightConfig(2:4 packing)" if quant == "fp8-dyn" else "SemiSparseWeightConfig"
    try:
        if quant == "fp8-dyn":
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
            from torchao.quantization.quantize_.workflows.float8.float8_packing_format import Float8PackingFormat

            config = Float8DynamicActivationFloat8WeightConfig(
                granularity=PerRow(), packing_format=Float8PackingFormat.SPARSE_2D_DATA_2D_METADATA)
            quantize_(model, config, filter_fn=is_decoder_linear)
        else:
            from torchao.sparsity import semi_sparse_weight, sparsify_  # SemiSparseWeightConfig's exported name

            config = semi_sparse_weight()
            sparsify_(model, config, filter_fn=is_decoder_linear)
    except Exception as e:  # noqa: BLE001 - torch and torchao refuse with RuntimeError, AssertionError, ...
        raise Unsupported(f"2:4 sparsity refused on this machine (torchao {kind}): "
                          f"{type(e).__name__}: {e}") from None
    converted = [n for n, m in decoder_linears(model) if type(m.weight) not in (torch.Tensor, torch.nn.Parameter)]
    if len(converted) != len(layers):  # torchao skips a layer it has no kernel for, silently (fp8: _fp8_mm_compat)
        left = [n for n, _ in layers if n not in converted]
        raise Unsupported(f"2:4: torchao converted {len(converted)} of {len(layers)} decoder linear layers ({kind}); "
                          f"{left[0]} and {len(left) - 1} more stayed dense: a 2:4 label would not describe the model")
    return type(config).__name__, sparsity


def _check_semi_structured(layers: list[tuple[str, torch.nn.Module]]) -> None:
    """What torch's semi-structured format accepts, checked on every layer by torch's own
    validation (device, dtype, and both dimensions multiples of its backend's minimum: CUTLASS
    or cuSPARSELt), before anything is changed; `Unsupported` naming the first layer refused."""
    from torch.sparse import SparseSemiStructuredTensor, SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    cls = SparseSemiStructuredTensorCUTLASS if SparseSemiStructuredTensor._FORCE_CUTLASS else SparseSemiStructuredTensorCUSPARSELT
    for name, m in layers:
        try:
            cls._validate_device_dim_dtype_shape(m.weight)
        except Exception as e:  # noqa: BLE001 - torch refuses with RuntimeError
            raise Unsupported(f"2:4 sparsity refused on this machine: {name} {tuple(m.weight.shape)} "
                              f"{str(m.weight.dtype).removeprefix('torch.')} on {m.weight.device.type}: "
                              f"{type(e).__name__}: {e}") from None


def apply(model: torch.nn.Module, prune: str, quant: str) -> tuple[str, float | None, bool]:
    """Prune the model in place as `prune` says. Returns (what was done, the sparsity counted
    on the dense weights, whether `quant` was applied with it: 2:4 + fp8-dyn is one torchao
    step)."""
    if prune == "none":
        return "none", None, False
    n = len(decoder_linears(model))
    if not n:
        raise Unsupported(f"prune={prune}: the model has no linear layer outside its LM head to prune")
    if prune.startswith("magnitude-"):
        fraction = int(prune.removeprefix("magnitude-")) / 100
        magnitude(model, fraction)
        return (f"torch.nn.utils.prune.l1_unstructured(amount={fraction}) + prune.remove on {n} decoder linear layers "
                f"(dense: zeros stored)"), weight_sparsity(model), False
    if prune == "2:4":
        done, sparsity = two_four(model, quant)
        return f"2:4 by magnitude on {n} decoder linear layers, then {done}", sparsity, quant == "fp8-dyn"
    raise ValueError(f"prune={prune!r}")
