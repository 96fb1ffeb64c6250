"""The training signals DeepSpeed computed in each step, read after it without synchronising
(a collector, collector.py): gradient norm, learning rate, fp16 loss scale, skipped steps.
The learning rate is the one each step applies: read before the step, since DeepSpeed steps
its scheduler after the optimizer (engine._take_model_step), so a read after a step gives the
next step's.

Host-side attribute reads only: a gradient norm that is a device tensor is cloned (not read)
at the step's end and read after the window's final synchronise.
"""

from __future__ import annotations

import torch

from .collector import Base


class TrainingSignals(Base):
    def __init__(self, engine, precision: str) -> None:
        self.engine, self.precision = engine, precision
        self.norms: list = []
        self.lrs: list[float] = []
        self.scales: list = []
        self.skipped_flags: list[bool] = []  # per step: DeepSpeed skipped it (an fp16 overflow)

    def start(self) -> None:
        self.skipped_before = self._last = self.engine.skipped_steps

    def begin_step(self) -> None:
        self.lrs.append(self.engine.get_lr()[0])

    def end_step(self) -> None:
        skipped = self.engine.skipped_steps  # a host-side count (DeepSpeed's overflow check already synchronised)
        self.skipped_flags.append(skipped > self._last)
        self._last = skipped
        norm = self.engine.get_global_grad_norm()
        self.norms.append(norm.detach().clone() if isinstance(norm, torch.Tensor) else norm)
        if self.precision == "fp16":
            opt = self.engine.optimizer
            self.scales.append(getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", None))

    def stop(self) -> dict:
        return {"grad_norms": [None if n is None else float(n) for n in self.norms],
                "lrs": [float(x) for x in self.lrs],
                "loss_scales": [float(x) for x in self.scales if x is not None],
                "skipped_steps": self.engine.skipped_steps - self.skipped_before}
