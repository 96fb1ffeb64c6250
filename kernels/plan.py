"""What `llmbench kernels` measures: validated once in the driver, sent to every rank."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

BENCHES = ("gemm", "attention", "norm", "mlp", "optimizer", "collective")
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "broadcast")
OPTIMIZERS = ("adamw-foreach", "adamw-forloop", "adamw-fused", "deepspeed")


class KernelPlan(BaseModel):
    """The kernel micro-benchmarks to run, at the shapes of one standard model."""

    model_config = ConfigDict(extra="forbid")

    model: str = "tiny"
    family: Literal["llama", "gpt2"] = "llama"
    seq_len: int = Field(128, ge=8)
    micro_batch: int = Field(4, ge=1)
    precisions: list[Literal["fp32", "bf16", "fp16"]] = ["fp32", "bf16"]
    benches: list[str] = list(BENCHES)
    square_sizes: list[int] = [256, 512, 1024, 2048]
    collectives: list[str] = list(COLLECTIVES)
    message_bytes: list[int] = [2**k for k in range(10, 25, 2)]   # 1 KiB .. 16 MiB
    optimizers: list[str] = list(OPTIMIZERS)
    repeats: int = Field(15, ge=3)
    world_size: int = Field(2, ge=1)

    @field_validator("benches")
    @classmethod
    def _benches(cls, v):
        bad = [b for b in v if b not in BENCHES]
        if bad:
            raise ValueError(f"unknown bench {bad[0]!r}; choose from {', '.join(BENCHES)}")
        return v

    @field_validator("collectives")
    @classmethod
    def _collectives(cls, v):
        bad = [c for c in v if c not in COLLECTIVES]
        if bad:
            raise ValueError(f"unknown collective {bad[0]!r}; choose from {', '.join(COLLECTIVES)}")
        return v

    @field_validator("optimizers")
    @classmethod
    def _optimizers(cls, v):
        bad = [o for o in v if o not in OPTIMIZERS]
        if bad:
            raise ValueError(f"unknown optimizer {bad[0]!r}; choose from {', '.join(OPTIMIZERS)}")
        return v

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len
