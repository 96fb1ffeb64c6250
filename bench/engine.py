"""TrialSpec → the DeepSpeed config a trial runs with."""

from __future__ import annotations

from .spec import TrialSpec

NEVER = 10**9  # steps_per_print: DeepSpeed's periodic logging stays out of the timed window


def persistence_threshold(spec: TrialSpec, hidden_size: int) -> int:
    """ZeRO-3's `stage3_param_persistence_threshold` for this trial.

    DeepSpeed keeps every parameter with fewer elements than this whole on every rank
    (default 1e5). For the tiny CPU model nearly every tensor is under 1e5, so the default
    would make ZeRO-3 partition nothing; min(1e5, hidden size) keeps the intent (norms and
    biases persist, weight matrices are partitioned) at every size.
    """
    if spec.param_persistence_threshold is not None:
        return spec.param_persistence_threshold
    return min(100_000, hidden_size)


def ds_config(spec: TrialSpec, accelerator: str, hidden_size: int) -> dict:
    """A real DeepSpeed config (see https://www.deepspeed.ai/docs/config-json/)."""
    zero: dict = {"stage": spec.zero_stage}
    if spec.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = persistence_threshold(spec, hidden_size)
    if spec.offload in ("optimizer", "optimizer+params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": accelerator == "cuda"}
    if spec.offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": accelerator == "cuda"}
    optimizer_params = {"lr": spec.lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}
    if accelerator == "cpu" and spec.offload == "none":
        # FusedAdam would JIT-build a CUDA-style op on CPU (~30 s); torch's AdamW is the CPU path.
        optimizer_params["torch_adam"] = True
    return {
        "train_batch_size": spec.global_batch,
        "train_micro_batch_size_per_gpu": spec.micro_batch,
        "gradient_accumulation_steps": spec.grad_accum,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "zero_optimization": zero,
        "bf16": {"enabled": spec.precision == "bf16"},
        "fp16": {"enabled": spec.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "steps_per_print": NEVER,
        # DeepSpeed's throughput timer is on by default and synchronises the device every
        # step; the wall-clock breakdown synchronises too. Both stay off while we measure.
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
        "wall_clock_breakdown": False,
    }
