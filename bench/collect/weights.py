"""Bytes a model's weights really hold, measured from its tensors' storages.

Quantized tensors (torchao's Int8Tensor, Float8Tensor, ...) are tensor subclasses whose data
lives in inner tensors (quantized data, scales, zero points): they are summed through
`__tensor_flatten__`, recursively. Each storage counts once (tied or shared weights).
"""

from __future__ import annotations

import io

import torch


def _storage_bytes(t: torch.Tensor, seen: set) -> int:
    """Bytes of a tensor's storage(s): a tensor subclass (torchao's Int8Tensor, Float8Tensor)
    is summed over its inner tensors (`__tensor_flatten__`), recursively; each storage once."""
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
        names, _ = t.__tensor_flatten__()
        return sum(_storage_bytes(getattr(t, n), seen) for n in names if getattr(t, n, None) is not None)
    data = t.data if isinstance(t, torch.nn.Parameter) else t
    if hasattr(data, "__tensor_flatten__") and type(data) is not torch.Tensor:
        return _storage_bytes(data, seen)
    storage = data.untyped_storage()
    key = (storage.data_ptr(), data.device)
    if key in seen:
        return 0
    seen.add(key)
    return storage.nbytes()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's parameters and buffers really hold, measured from their storages
    (quantized data, scales and zero points included; tied or shared storages once)."""
    seen: set = set()
    tensors = [p for _, p in model.named_parameters(remove_duplicate=False)] + \
              [b for _, b in model.named_buffers(remove_duplicate=False)]
    return sum(_storage_bytes(t, seen) for t in tensors)


def state_dict_bytes(model: torch.nn.Module) -> int:
    """Size of `torch.save(model.state_dict())`: an independent check of `weight_bytes`."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return len(buf.getvalue())
