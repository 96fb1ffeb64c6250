"""What a rank sends the driver after a trial: typed, checked at both ends of the socket.

`RankResult` (a training trial, one per rank) and `InferenceResult` (the single process of an
inference trial) are pydantic models that refuse unknown keys: the rank builds one, sends it
as JSON over the control channel (launch/control.py), and the driver parses the message back
into the same model before aggregating (record.py). A key one side adds and the other does
not know fails the trial loudly instead of vanishing. The record's own fields are defined in
schema.py; these are the raw per-rank measurements it is aggregated from.
"""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

_MESSAGE_KEYS = ("type", "trial_id")  # the control channel's envelope, not the result's


class _Result(BaseModel):
    # assignments are validated where they happen (on the rank, outside any timed window), so
    # a wrong type fails the trial there with its cause, not the driver's parse
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), populate_by_name=True, validate_assignment=True)

    rank: int = 0
    status: str = "ok"
    error: Optional[str] = None
    host: str = ""  # the physical host (its hostname)
    node: str = ""  # the launcher's name for its node (hostfile entry, SLURM node name)
    node_rank: int = 0
    local_rank: int = 0  # the rank's index on its node (its device index on a GPU node)
    threads: int = 0  # torch's intra-op threads in this rank
    device: str = ""
    setup_s: float = 0.0
    teardown_s: float = 0.0
    # (pydantic reserves the name model_config: the field is transformers_config, sent as model_config)
    transformers_config: dict = Field(default_factory=dict, alias="model_config")
    entropy_floor: Optional[float] = None
    memory: dict = Field(default_factory=dict)  # collect.memory.PeakMemory's fields
    notes: list[str] = Field(default_factory=list)

    def message(self) -> dict:
        """The JSON-able body of the control channel's `result` message."""
        return self.model_dump(by_alias=True)  # NaN losses pass as json does (NaN), not as null

    def fill(self, fields: dict) -> None:
        """Set the fields a phase or collector returned (an unknown name raises)."""
        for k, v in fields.items():
            setattr(self, k, v)

    @classmethod
    def from_message(cls, msg: dict):
        return cls.model_validate({k: v for k, v in msg.items() if k not in _MESSAGE_KEYS})


class RankResult(_Result):
    """What one rank measured in one training trial (trial.run_trial)."""

    warmup_s: float = 0.0
    window_s: float = 0.0
    step_times_s: list[float] = Field(default_factory=list)
    step_cpu_s: list[float] = Field(default_factory=list)
    losses: list[float] = Field(default_factory=list)
    warmup_losses: list[float] = Field(default_factory=list)
    warmup_lrs: list[float] = Field(default_factory=list)
    grad_norms: list[Optional[float]] = Field(default_factory=list)
    lrs: list[float] = Field(default_factory=list)
    loss_scales: list[float] = Field(default_factory=list)
    skipped_steps: int = 0
    tokens: int = 0
    model_state: dict = Field(default_factory=dict)  # collect.memory.ModelStateBytes
    activations: dict = Field(default_factory=dict)  # collect.activations.probe_activations: bytes saved for backward
    ds_config: dict = Field(default_factory=dict)
    breakdown: dict = Field(default_factory=dict)
    comms: dict = Field(default_factory=dict)
    telemetry: dict = Field(default_factory=dict)
    measured_peak_tflops: Optional[float] = None
    measured_peak_source: Optional[str] = None  # "measured" (this trial ran the probe) or "cache"
    measured_peak_probe_s: Optional[float] = None  # seconds spent on it (reading the cache or measuring)
    reference_s: list[float] = Field(default_factory=list)
    reference_cpu_s: list[float] = Field(default_factory=list)
    data_s: Optional[float] = None
    trace: Optional[str] = None
    fp32_matmul_precision: Optional[str] = None  # torch.get_float32_matmul_precision(): "highest" keeps TF32 off
    ds_global_steps: Optional[int] = None  # DeepSpeed's engine.global_steps when the trial ended


class InferenceResult(_Result):
    """What the inference scenario measured (inference.run_inference)."""

    train_loss_final: Optional[float] = None
    train_steps: Optional[int] = None
    train_s: Optional[float] = None
    trained_cache: Optional[str] = None  # "hit" or "miss"
    quant_config: Optional[str] = None
    weight_bytes: Optional[int] = None
    weight_bytes_reference: Optional[int] = None
    weight_sparsity: Optional[float] = None
    prune_config: Optional[str] = None
    eval_batches_sha256: Optional[str] = None
    eval_tokens: Optional[int] = None
    eval_nll_nats: Optional[float] = None
    perplexity: Optional[float] = None
    prefill_times_s: dict[str, list[float]] = Field(default_factory=dict)  # batch → per-repeat seconds
    decode_step_times_s: dict[str, list[float]] = Field(default_factory=dict)  # batch → per-token seconds
    decode_step_cpu_s: dict[str, list[float]] = Field(default_factory=dict)  # batch → per-token CPU s (CPU only)
    decode_times_s: dict[str, list[float]] = Field(default_factory=dict)  # batch → per-repeat decode seconds
    threads: Optional[int] = None
