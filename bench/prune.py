"""Pruning a trained model before it is measured (the inference scenario's `prune` axis).

What is pruned: every `nn.Linear` of the decoder (attention and MLP projections), not the LM
head nor the embeddings, which the pruning literature leaves dense (Frantar & Alistarh 2023,
SparseGPT §4; Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks", the 2:4 recipe).

- `magnitude-NN`: in each layer, the NN% of weights with the smallest |w| are zeroed
  (`torch.nn.utils.prune.l1_unstructured`, then `prune.remove`: the zeros are written into the
  weight and the mask is gone). The tensor stays dense: its zeros are stored and multiplied,
  so it saves neither bytes nor time; the record's weight bytes show it.
- `2:4`: in every group of 4 consecutive weights of a row, the 2 smallest |w| are zeroed
  (torchao's `apply_fake_sparsity`, torch.ao's WeightNormSparsifier with 1×4 blocks), then
  the weights are stored in torch's semi-structured sparse format (torchao `sparsify_` with
  `SemiSparseWeightConfig`: half the values plus metadata, run by cuSPARSELt/CUTLASS), or,
  with quant=fp8-dyn, quantized to fp8 in torchao's 2:4 packing. Both need CUDA: elsewhere
  the library refuses, and the trial is recorded `unsupported` with its message.
"""

from __future__ import annotations

import torch

from .failures import Unsupported


def is_decoder_linear(module: torch.nn.Module, name: str) -> bool:
    """The layers pruning touches: every linear layer but the LM head."""
    return isinstance(module, torch.nn.Linear) and not name.split(".")[-1] == "lm_head"


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
    with quant=fp8-dyn). Returns the torchao config's repr and the sparsity counted on the
    dense weights before they are converted; `Unsupported` with torchao's or torch's message
    where this device has no 2:4 kernels."""
    from torchao.sparsity import apply_fake_sparsity

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
    return repr(config), sparsity


def apply(model: torch.nn.Module, prune: str, quant: str) -> tuple[str, float | None, bool]:
    """Prune the model in place as `prune` says. Returns (what was done, the sparsity counted
    on the dense weights, whether `quant` was applied with it: 2:4 + fp8-dyn is one torchao
    step)."""
    if prune == "none":
        return "none", None, False
    if prune.startswith("magnitude-"):
        fraction = int(prune.removeprefix("magnitude-")) / 100
        magnitude(model, fraction)
        return (f"torch.nn.utils.prune.l1_unstructured(amount={fraction}) + prune.remove on "
                f"{len(decoder_linears(model))} decoder linear layers (dense: zeros stored)"), weight_sparsity(model), False
    if prune == "2:4":
        done, sparsity = two_four(model, quant)
        return f"2:4 by magnitude on {len(decoder_linears(model))} decoder linear layers, then {done}", sparsity, quant == "fp8-dyn"
    raise ValueError(f"prune={prune!r}")
