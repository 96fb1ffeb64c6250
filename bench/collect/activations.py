"""Activation bytes saved for backward, measured with autograd's saved-tensor hooks.

`torch.autograd.graph.saved_tensors_hooks` sees every tensor an op saves for its backward
(docs: "Hooks for saved tensors"), on any device. The pack hook returns the tensor itself, so
nothing changes in memory or numerics; it only notes each saved tensor's storage once (views
of one storage, e.g. GPT-2's q, k, v, count once, at the storage's full size). Parameters are
not activations: a saved `nn.Parameter` (ZeRO-3's gathered weight saved by its linear
function, a norm's weight) or a view of a parameter's storage is left out. Under non-reentrant
activation checkpointing torch pushes its own hooks inside each checkpointed layer, so this
hook sees only the layer inputs the checkpoint keeps; the recompute during backward is a
transient and shows only in the peak (collect/memory.py).
"""

from __future__ import annotations

import torch


class SavedActivations:
    """Count the distinct storages saved for backward while the context is open."""

    def __init__(self, module: torch.nn.Module):
        self.params = {p.data.untyped_storage().data_ptr() for p in module.parameters() if p.data.numel()}
        self.storages: dict[int, int] = {}
        self.by_dtype: dict[str, int] = {}
        self._ctx = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, torch.nn.Parameter) or hasattr(t, "ds_id"):
            return t
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # a tensor without storage (e.g. a wrapper subclass)
            return t
        ptr = st.data_ptr()
        if ptr == 0 or ptr in self.params or ptr in self.storages:
            return t
        self.storages[ptr] = st.nbytes()
        key = str(t.dtype).replace("torch.", "")
        self.by_dtype[key] = self.by_dtype.get(key, 0) + st.nbytes()
        return t

    def __enter__(self) -> "SavedActivations":
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def probe_activations(module: torch.nn.Module, run_micro_step) -> dict:
    """Run one micro-batch's forward and backward (`run_micro_step`) under the hooks: the bytes
    it saved for backward, in all and by dtype."""
    with SavedActivations(module) as saved:
        run_micro_step()
    return {"activation_bytes": saved.total, "activation_bytes_by_dtype": dict(saved.by_dtype)}
