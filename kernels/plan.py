"""What `llmbench kernels` measures: validated once in the driver, sent to every rank."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

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

    @field_validator("benches", "collectives", "optimizers")
    @classmethod
    def _known(cls, v: list[str], info: ValidationInfo) -> list[str]:
        allowed = {"benches": BENCHES, "collectives": COLLECTIVES, "optimizers": OPTIMIZERS}[info.field_name]
        what = {"benches": "bench", "collectives": "collective", "optimizers": "optimizer"}[info.field_name]
        bad = [x for x in v if x not in allowed]
        if bad:
            raise ValueError(f"unknown {what} {bad[0]!r}; choose from {', '.join(allowed)}")
        return v

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len
