"""Memory per rank, predicted before launch: model states, DeepSpeed's buffers, activations, fixed costs.

Every term follows DeepSpeed 0.19's real layout (file:line below are in the installed
`deepspeed/` package: s12 = runtime/zero/stage_1_and_2.py, s3 = runtime/zero/stage3.py,
eng = runtime/engine.py) and the activation derivation of plan/activations.py. Ψ parameters,
N data-parallel ranks, p bytes per 16/32-bit parameter (2 in bf16/fp16, 4 in fp32), B =
reduce_bucket_size, S = Ψ/N (one rank's partition).

Model states (the ZeRO paper's, Rajbhandari et al. 2020 §3, as DeepSpeed holds them):
- stage 0: p·Ψ parameters; p·Ψ gradients (alive from backward to the step); Adam: 8Ψ, plus a
  4Ψ fp32 master in mixed precision (FP16_UnfusedOptimizer / FP16_Optimizer clone it,
  eng:2362-2409; fp32 runs the plain optimizer on the parameters themselves, eng:2366);
- stage 1/2: the module's parameters become views of one flat p·Ψ buffer (s12:505-534, no
  copy); fp32 master 4S (a clone, s12:560) and Adam 8S; stage 1 keeps full p·Ψ gradients until
  the boundary reduce (s12:971), stage 2 a p·S partition buffer (s12:2185);
- stage 3: p·S partitions (+ p·n for the n elements under `stage3_param_persistence_threshold`,
  whole on every rank), a p·S gradient partition buffer allocated at init (s3:791), fp32 master
  4S and Adam 8S per sub-group (s3:1168);
- ZeRO-Offload (optimizer): the fp32 master, Adam and an fp32 gradient partition (4S) live on
  the host (s12:1036, s3:1337; what collect/memory.offloaded measures); at ZeRO-1/2 two p-byte
  staging buffers of the largest parameter stay on the device (s12:653-660), at ZeRO-3 the
  gradient-partition buffer follows the optimizer to the host (s3:333); offload_param moves the
  p·S parameter partitions too. On the CPU accelerator the host is the device: nothing is saved;
- ZeRO++ hpZ: a secondary partition of p·Ψ/(ranks per node) per rank (partition_parameters.py:1912).

DeepSpeed's buffers: the reduce (ipg) bucket of B elements in the model dtype, doubled by
overlap_comm at stage 1/2 (s12:3256-3280 `setup_buckets`; allocated at the first gradient hook,
freed by the epilogue after backward, `_release_ipg_buffers` s12:1061, so never alive in the
step), one bucket at stage 3 kept for the whole run (s3:780, overlap_comm only picks a
stream); ZeRO-3's gathered parameters: prefetches (`stage3_prefetch_bucket_size` at a time)
pile up to `stage3_max_live_parameters`, and the parameters kept for reuse
(`stage3_max_reuse_distance` R: the last R/2 elements of the forward stay gathered into
backward) can exceed that cap; plus one coalesced all-gather's flat output, which each
parameter is copied out of and which lives until its last parameter is used
(partition_parameters.py:795; partitioned_param_coordinator.py:452-484, 609, 634-670). An allocator counts a
bucket whole (`allocated_peak`; a CUDA allocator also reserves it whole); on a CPU only the
pages written count in RSS, so there a bucket costs what the gradients fill of it (at most Ψ
elements).

Temporaries, by phase (the peak is the largest phase):
- build: the Hugging Face model is built in fp32 (4Ψ) before DeepSpeed casts it (CPU: in the
  process's RSS; on a GPU the cast happens on the host);
- forward (stage 3): every activation saved, the gathered parameters and the last prefetch's
  all-gather output (measured on the tiny model: the forward's peak was the states + the
  activations + two copies of the parameters, 18.61 MiB against 18.7 predicted);
- backward: activations (plan/activations.py; with checkpointing's closures' keyword
  arguments) + the larger of the loss's transient (forward: the p-byte logits and their fp32
  copy; backward: two fp32 gradients of bsV) and, once the head's and the loss's saved tensors
  are freed, the last layer's backward: under checkpointing the layer recomputed with its
  MLP's backward (`layer_backward`) or eager attention's softmax backward
  (`attention_backward`), whichever is larger, beside (stages 0/1) the gradients held so far
  at the first or the last layer; without it eager's softmax backward in place of the layer's
  own saved tensors; + buckets + ZeRO-3's gathered parameters. Autograd frees a
  layer's saved tensors as its backward runs, about as fast as their gradients appear: on the
  configurations of docs/plan.md the measured allocator peak less states and activations was
  the loss's transient to within 0.5 MiB without checkpointing (SDPA). At the end
  of backward stage 0/1 hold every p·Ψ gradient (with the bucket: ZeRO-1's peak), and ZeRO-1's
  boundary reduce allocates its p·S partition-gradient buffer (s12:2272-2274, 2142-2192):
  beside them (with a bucket above Ψ only in some runs on gloo; counted), beside the
  activations with overlap_comm;
  the stage-3 gradient reduce: reduce_scatter_coalesced copies a bucket's gradients into one
  flat tensor whose views the reduce-scatter writes (coalesced_collectives.py:81-137); on gloo
  the reduce-scatter held a second full copy (measured, 125M fp32: 2·p·Ψ above the bucket at
  the epilogue's reduce, 4303.3 MiB measured and predicted);
- step: stage 0 mixed precision: fp32 copies of every gradient (4Ψ; FusedAdam's FP16_Optimizer
  also flattens them: 8Ψ, fused_optimizer.py:283-291); stage 1/2 (s12:3101-3133): the larger of
  two moments, the partition flattened (a p·S copy at stage 1; stage 2's contiguous buffer is
  used as is) and cast to fp32 (4S) beside the 16-bit gradients, then the optimizer running on
  that fp32 gradient after every 16-bit one is freed; stage 3: a sub-group's flatten and cast
  ((p + 4)·sub, s3:2683; p·sub in fp32, where the cast is no copy);
  torch's single-tensor AdamW (`torch_adam`, the CPU path: torch/optim/adam.py
  `_single_tensor_adam`, `denom = (exp_avg_sq.sqrt() / c).add_(e)`) holds two fp32 temporaries
  as large as the tensor it updates (the flat partition at ZeRO-1/2); DeepSpeed's CPU Adam and
  FusedAdam update in place.

`allocated_peak` is the largest phase with the buckets whole: what torch's allocator counts
(trial_allocated_peak_bytes, on a CPU and on CUDA). `peak` is the record's trial_peak_mem_bytes:
on a CPU the RSS, which adds the fixed costs below and whatever glibc's heap keeps.

Fixed: on the CPU accelerator, what a trial's process adds beyond these (allocator slack,
DeepSpeed's and gloo's own objects): a constant calibrated on the set stated in docs/plan.md;
on CUDA the allocator's peak is the trial's own, and fitting the device adds the CUDA context,
NCCL's buffers and the caching allocator's reserved-but-unallocated slack (stated constants,
unmeasured here: tests/gpu/gpu_check.sh measures them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..collect.memory import deepspeed_model_state_bytes
from ..models import ModelStats
from .activations import Activations, activation_bytes, shape_of

GiB = 1024**3
MiB = 1024**2

# CPU accelerator: a trial's own RSS peak beyond the modelled terms, calibrated (docs/plan.md:
# the median residual of the calibration set, `python -m llmbench.plan.accuracy`); and what a rank's
# process holds before any trial (torch, DeepSpeed, transformers imported, gloo up), the
# baseline the own peak sits on.
CPU_FIXED_BYTES = 28 * MiB  # the median residual of two runs of `llmbench sweep zero` (docs/plan.md), 2026-11-30
CPU_PROCESS_BASELINE_BYTES = 700 * MiB
# The first trial a rank process runs also pays its one-time costs inside its window (the
# model's modeling module imported, DeepSpeed's and gloo's first allocations): the first
# trial's residual less the median residual, on the same calibration set.
CPU_FIRST_TRIAL_BYTES = 95 * MiB
# CUDA: outside the allocator's peak (assumptions until tests/gpu/gpu_check.sh measures them):
# the context with lazy module loading (CUDA_MODULE_LOADING=LAZY, the default since CUDA 11.7)
# and NCCL's channel buffers (NCCL_BUFFSIZE 4 MiB per channel and peer); the caching allocator
# reserves about this much more than it allocates.
CUDA_CONTEXT_BYTES = 600 * MiB
CUDA_NCCL_BYTES = 512 * MiB
CUDA_RESERVED_SLACK = 0.10


@dataclass
class MemoryPrediction:
    """Predicted bytes per rank, by term; `peak` is what the record's trial_peak_mem_bytes measures."""

    states_device: float
    states_host: float
    params: float
    grads: float
    optimizer: float
    buffers: float
    activations: float
    fixed: float
    peak: float  # the trial's own peak on the device (CPU: its RSS above the process baseline)
    allocated_peak: float  # the tensors' own peak, buckets whole: the record's trial_allocated_peak_bytes (CPU and CUDA)
    one_time: float  # of fixed: the processes' one-time costs a pool's first trial pays (not held against a budget)
    device_total: float  # what must fit a device: baseline/context + peak (+ allocator slack on CUDA)
    host_total: float  # per rank on the host: offloaded states (+ the whole process on a CPU)
    phase: str  # which phase sets the peak: build, forward (ZeRO-3), backward or step
    phases: dict = field(default_factory=dict)  # each phase's own bytes (resident states included)
    allocated_phases: dict = field(default_factory=dict)  # the same with the buckets whole: allocated_peak is their largest
    allocated_phase: str = ""  # the phase that sets allocated_peak
    allocated_peak_terms: dict = field(default_factory=dict)  # its parts: states, buffers, activations, temporaries (sum: allocated_peak)
    peak_terms: dict = field(default_factory=dict)  # the peak phase's parts: states, buffers, activations, temporaries, fixed (sum: peak)
    activation_terms: dict = field(default_factory=dict)
    deepspeed_estimate: float | None = None  # DeepSpeed's own model-state estimator, device bytes
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def zero_knobs(ds_config: dict | None, stage: int) -> dict:
    """The ZeRO settings the engine will run with: the config's, else DeepSpeed's defaults
    (its own config class, deepspeed/runtime/zero/config.py, so a default change follows)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    zero = dict((ds_config or {}).get("zero_optimization") or {"stage": stage})
    z = DeepSpeedZeroConfig(**zero)
    return dict(reduce_bucket_size=int(z.reduce_bucket_size), overlap_comm=bool(z.overlap_comm),
                contiguous_gradients=bool(z.contiguous_gradients), sub_group_size=int(z.sub_group_size),
                prefetch_bucket_size=int(z.prefetch_bucket_size), max_live_parameters=int(z.max_live_parameters),
                persistence_threshold=int(z.param_persistence_threshold), reduce_scatter=bool(z.reduce_scatter),
                allgather_bucket_size=int(z.allgather_bucket_size), max_reuse_distance=int(z.max_reuse_distance),
                offload_optimizer=z.offload_optimizer is not None and str(getattr(z.offload_optimizer.device, "value",
                                                                                   z.offload_optimizer.device)) != "none",
                offload_param=z.offload_param is not None and str(getattr(z.offload_param.device, "value",
                                                                           z.offload_param.device)) != "none")


def _optimizer_type(ds_config: dict | None) -> tuple[str, bool]:
    opt = (ds_config or {}).get("optimizer") or {}
    return str(opt.get("type", "adamw")).lower(), bool((opt.get("params") or {}).get("torch_adam"))


def deepspeed_estimate(stats: ModelStats, stage: int, world_size: int, ranks_per_node: int, offload: str) -> float | None:
    """DeepSpeed's own per-GPU model-state estimate (deepspeed.runtime.zero.stage_1_and_2 /
    stage3 `estimate_zero{2,3}_model_states_mem_needs`, additional_buffer_factor 1.5 is for the
    CPU side only); None for stages 0-1, which it does not estimate."""
    nodes = max(1, world_size // ranks_per_node)
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        _, gpu = estimate_zero2_model_states_mem_needs(stats.n_params, ranks_per_node, nodes, offload != "none")
        return float(gpu)
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        largest = stats.param_numels[0] if stats.param_numels else 0
        _, gpu, _ = estimate_zero3_model_states_mem_needs(stats.n_params, largest, ranks_per_node, nodes,
                                                          offload != "none", offload == "optimizer+params")
        return float(gpu)
    return None


def predict(spec, stats: ModelStats, config, device: str = "cpu", ds_config: dict | None = None,
            ranks_per_node: int | None = None, first_in_process: bool = False) -> MemoryPrediction:
    """Predicted memory per rank of a training trial (TrialSpec) on `device` ("cpu" or "cuda");
    `first_in_process`: the first trial its rank processes run (a fresh pool)."""
    psi, n = float(stats.n_params), max(1, spec.world_size)
    ranks_per_node = ranks_per_node or n
    p = 4 if spec.precision == "fp32" else 2
    mixed = spec.precision != "fp32"
    stage = spec.zero_stage
    knobs = zero_knobs(ds_config, stage)
    opt_type, torch_adam = _optimizer_type(ds_config)
    cpu = device == "cpu"
    numels = stats.param_numels or (int(psi),)
    largest = float(numels[0])
    notes: list[str] = []
    off_opt = spec.offload != "none" and stage >= 1
    off_par = spec.offload == "optimizer+params" and stage == 3
    fused_adam = not cpu and not torch_adam and opt_type in ("adam", "adamw")

    s = psi / n  # one rank's partition (DeepSpeed pads to 2N; negligible)
    persist = float(sum(x for x in numels if x <= knobs["persistence_threshold"])) if stage == 3 else 0.0
    # -- model states: the total is DeepSpeed's layout (collect/memory.deepspeed_model_state_bytes,
    # cross-checked against the engine's tensors); here it is split into its three states
    total = deepspeed_model_state_bytes(int(psi), stage, n, spec.precision, int(persist))
    params = p * psi if stage < 3 else p * s + p * persist
    grads = p * psi if stage < 2 else p * s  # stage 0/1: full gradients until the step / boundary reduce
    optimizer = total - params - grads  # Adam's moments, and the fp32 master where DeepSpeed keeps one
    resident_grads = 0.0 if stage < 2 else grads  # stage 0/1 gradients do not outlive the step
    host = 0.0
    extra_device = 0.0  # DeepSpeed's own tensors that live as long as the engine
    if off_opt:
        host += optimizer + 4.0 * s  # fp32 master + Adam + the fp32 gradient partition (s12:1036, s3:1337)
        if stage in (1, 2):
            extra_device += 2 * p * largest  # temp_grad_buffer_for_{cpu,gpu}_offload (s12:653-660)
        else:
            host += grads  # ZeRO-3's gradient-partition buffer follows the optimizer's device (s3:333, 791)
    if off_par:
        host += p * s
    hpz = 0.0
    if stage == 3 and spec.quant in ("zeropp-hpz", "zeropp"):
        hpz = p * psi / max(1, min(ranks_per_node, n))  # hpZ's secondary partition within a node (partition_parameters.py:1912)
        notes.append("ZeRO++ hpZ: its secondary partition (p·Ψ/ranks per node) is counted in the model states")
    if spec.quant in ("zeropp-qw", "zeropp-qg", "zeropp"):
        notes.append(f"quant={spec.quant}: ZeRO++'s quantization buffers are not modelled")
    opt_dev = 0.0 if off_opt else optimizer
    par_dev = params - (p * s if off_par else 0.0)
    grads_dev = grads - (grads if off_opt and stage == 3 else 0.0)
    states_device = par_dev + grads_dev + opt_dev + hpz + extra_device
    # -- DeepSpeed's buffers -------------------------------------------------------------------
    b = float(knobs["reduce_bucket_size"])
    # as allocated (what an allocator's count holds, and a CUDA allocator reserves), and on a
    # CPU as pages written (what its RSS holds)
    if stage == 0 or not knobs["contiguous_gradients"]:
        allocated_buckets = written_buckets = 0.0
    elif stage in (1, 2):  # bucket 0 fills with up to B gradient elements, bucket 1 with the next B
        allocated_buckets = p * b * (2 if knobs["overlap_comm"] else 1)
        written_buckets = p * (min(b, psi) + (min(b, max(0.0, psi - b)) if knobs["overlap_comm"] else 0.0))
    else:
        allocated_buckets, written_buckets = p * b, p * min(b, psi)
    buckets = written_buckets if cpu else allocated_buckets
    gathered = inflight = inflight_bwd = 0.0
    if stage == 3:
        # ZeRO-3's gathered parameters (partitioned_param_coordinator.py). Every module's fetch
        # (parameterless ones too) all-gathers its parameters and prefetches the trace's next
        # ones, up to `stage3_prefetch_bucket_size` elements at a time, in one coalesced
        # all-gather (:452-484, :609), while fewer than `stage3_max_live_parameters` are
        # available (:453): prefetched parameters pile up to that cap. A parameter is released
        # after its module only if its next use is more than `stage3_max_reuse_distance` (R)
        # elements of the trace away (:634-670); after its forward its next use is its backward,
        # 2·(elements after it) away (about 3× under checkpointing, whose recompute fetches
        # again), so the last R/2 elements stay gathered into backward, beyond the cap.
        ahead = min(float(knobs["prefetch_bucket_size"]), float(knobs["max_live_parameters"]))
        partitioned = psi - persist
        kept_for_reuse = float(knobs["max_reuse_distance"]) / 2
        gathered = p * min(partitioned, max(float(knobs["max_live_parameters"]), kept_for_reuse) + largest)
        # one coalesced all-gather's flat output beside the copies of its parameters: each is
        # copied out of it (torch.cat, partition_parameters.py:795) and it is freed when the
        # last one is used. In a forward always; in backward only where parameters were
        # released after their forward and are fetched again.
        inflight = p * min(partitioned, largest + ahead)
        inflight_bwd = inflight if partitioned > kept_for_reuse else 0.0
    # -- activations and the phases ---------------------------------------------------------------
    acts: Activations = activation_bytes(shape_of(config), spec.micro_batch, spec.seq_len, p,
                                         spec.attn_implementation, spec.activation_checkpointing, device)
    notes += acts.notes
    if spec.quant == "fp8":
        notes.append("quant=fp8: torchao's float8 casts are not modelled (activations at the trial's precision)")
    if spec.compile:
        notes.append("compile: the activations predicted are eager's; torch.compile's saved tensors may differ")
    # states held from step to step (on the CPU accelerator the offloaded ones sit in the same process)
    resident = par_dev + opt_dev + (resident_grads - (grads if off_opt and stage == 3 else 0.0)) + hpz + extra_device \
        + (host if cpu else 0.0)
    # stage 0/1 gradients: complete at the end of backward, gone after the step. ZeRO-1 with
    # overlap_comm reduces them from the backward's hooks at the accumulation boundary
    # (s12:2290, 2296), so with no accumulation they are never all held.
    overlap_1 = stage == 1 and knobs["overlap_comm"] and spec.grad_accum == 1
    held = grads if stage == 0 or (stage == 1 and not overlap_1) else 0.0
    grad_branch = held + (p * min(5e8, psi) if stage == 0 else 0.0)  # stage 0's all-reduce flattens up to 5e8 elements
    during_backward = 0.0  # transients of a gradient reduce that runs beside the activations
    if stage == 1 and knobs["contiguous_gradients"] and not off_opt:
        # ZeRO-1 copies its partition's reduced gradients into a p·S buffer allocated at the first
        # one (s12:2272-2274, copy_grads_in_partition s12:2142-2192). With a bucket smaller than
        # Ψ the first reduce comes while most gradients are still held. With a larger one every
        # gradient is moved into the bucket first (s12:1455-1459), but on gloo the moved
        # gradients were sometimes still alive when the buffer came (+4S on one rank, in some
        # runs of the same configuration: docs/plan.md), so it is counted there too. With
        # overlap_comm it is allocated during backward, beside the activations.
        if overlap_1:
            during_backward = p * s
        else:
            grad_branch += p * s
    if stage == 3:
        # ZeRO-3 reduces a bucket with reduce_scatter_coalesced when reduce_scatter is on (the
        # default) or gradients are not contiguous (s3:1673-1678, 1912-1931;
        # runtime/comm/coalesced_collectives.py:81-137): its gradients are copied into one padded
        # flat tensor (torch.cat) and the reduce-scatter's output is a view of it; on gloo the
        # reduce-scatter held a second full copy (measured: 2·p·E above the bucket, 125M fp32,
        # docs/plan.md). Without contiguous gradients the E elements wait as separate tensors.
        # Otherwise the contiguous bucket is all-reduced in place and postscale_gradients (the
        # default) multiplies it into a copy when gradient_predivide_factor differs from N
        # (s3:1863-1886). The gradients stay on the device when the optimizer is offloaded. A
        # bucket holding the whole model is reduced once, by the epilogue after backward, when
        # the activations are gone and the last module's parameters are still gathered; a
        # smaller one fills and is reduced during backward, after the loss's transient is gone.
        coalesced = knobs["reduce_scatter"] or not knobs["contiguous_gradients"]

        def reduce_tmp(elements: float) -> float:
            if not coalesced:
                return p * elements
            waiting = 0.0 if knobs["contiguous_gradients"] else p * elements
            return waiting + p * elements * (2.0 if cpu else 1.0)
        if b >= psi:
            grad_branch = p * largest + reduce_tmp(psi)
        else:
            during_backward = reduce_tmp(b)
    held_acts = acts.total + acts.kwargs_held  # saved for backward, and what checkpointing's closures keep
    # Backward, beside the activations: first the loss's transient; then, with the head's and the
    # loss's saved tensors freed, the last layer's backward (plan/activations.py): under
    # checkpointing the layer recomputed and its MLP's backward, or eager attention's softmax
    # backward; without it only eager's softmax backward can outgrow the loss's transient, its
    # working set replacing the layer's own saved tensors (already in the total)
    past_head = held_acts - acts.head - acts.loss
    if spec.activation_checkpointing:
        # every layer's backward has the same working set; what lies beside it changes: stages
        # 0/1 keep each gradient from the layer that made it to the step (`held`), while each
        # layer's checkpointed input is freed by its backward, so the peak is at the first
        # layer's backward (the head's gradients) or the last's (every gradient but the
        # embedding's and that layer's, one layer input left), whichever is larger
        n_layers = max(1, stats.n_layers)
        share = held / max(1, stats.n_params)
        head_grads = share * max(0.0, stats.n_params - stats.n_embedding_params - stats.n_layer_params)
        before_last = share * max(0.0, stats.n_params - stats.n_embedding_params - stats.n_layer_params / n_layers)
        beside = max(past_head + head_grads, past_head - acts.layers * (n_layers - 1) / n_layers + before_last)
        act_branch = max(held_acts + acts.logits_transient,
                         beside + max(acts.layer_backward, acts.attention_backward) + during_backward)
    else:
        act_branch = held_acts + max(acts.logits_transient, during_backward)
        if acts.attention_backward:
            act_branch = max(act_branch, past_head - acts.per_layer + acts.attention_backward + during_backward)
    act_branch += gathered + inflight_bwd
    # the optimizer step's temporaries; Adam's: torch's single-tensor AdamW (CPU tensors) two fp32
    # copies of the tensor it updates, its foreach path (CUDA) one of all it updates, FusedAdam
    # and DeepSpeed's CPU Adam none (in place)
    def adam_tmp(largest_tensor: float, all_elements: float, on_host: bool) -> float:
        if (not on_host and fused_adam) or (on_host and not torch_adam and off_opt):
            return 0.0
        return 8.0 * largest_tensor if (cpu or on_host) else 4.0 * all_elements
    if stage == 0:
        step_tmp = ((8.0 if fused_adam else 4.0) * psi) if mixed else 0.0  # fp32 gradient copies (flattened by FusedAdam's wrapper)
        step_tmp += adam_tmp(largest, psi, False)
    elif stage in (1, 2) and not off_opt:
        step_tmp = 0.0  # set below: the step's two moments
    elif stage in (1, 2):
        step_tmp = adam_tmp(s, s, off_opt)
    else:
        sub = min(float(knobs["sub_group_size"]), float(s))
        # the sub-group's gradients flattened (p·sub) and cast to fp32 (4·sub; `.to` is no copy in fp32)
        step_tmp = ((p + (4.0 if mixed else 0.0)) * sub if not off_opt else 0.0) + adam_tmp(sub, sub, off_opt)
    build = {"states": 0.0, "buffers": 0.0, "activations": 0.0, "temporaries": 4.0 * psi if (cpu and stage < 3) else 0.0}

    def phases_with(bucket_bytes: float) -> dict[str, dict[str, float]]:
        kept = bucket_bytes if stage == 3 else 0.0  # ZeRO-3 keeps its bucket; ZeRO-1/2 allocate theirs per backward
        bwd = kept + (bucket_bytes if stage in (1, 2) else 0.0)
        if act_branch >= grad_branch:
            backward = {"states": resident, "buffers": bwd, "activations": acts.total, "temporaries": act_branch - acts.total}
        else:
            backward = {"states": resident + held, "buffers": bwd, "activations": 0.0, "temporaries": grad_branch - held}
        step = {"states": resident + held, "buffers": kept, "activations": 0.0, "temporaries": step_tmp}
        # ZeRO-3's forward ends with every activation saved, the parameters gathered and the
        # last prefetch's all-gather output still alive (the loss's transient comes after it)
        forward = {"states": resident, "buffers": kept, "activations": acts.total,
                   "temporaries": acts.kwargs_held + gathered + inflight}
        if stage in (1, 2) and not off_opt:
            # s12 step(): the gradients outside the partition are freed, the partition's are
            # flattened (stage 1: a copy; stage 2: its contiguous buffer, no copy) and cast to fp32
            # (4S), then every 16-bit gradient is freed before the optimizer runs on the fp32 one
            flatten = {"states": resident + (p * s if stage == 1 else 0.0), "buffers": kept, "activations": 0.0,
                       "temporaries": (p * s if stage == 1 else 0.0) + 4.0 * s}
            optimizer_step = {"states": resident - resident_grads, "buffers": kept, "activations": 0.0,
                              "temporaries": 4.0 * s + adam_tmp(s, s, False)}
            step = max(flatten, optimizer_step, key=lambda d: sum(d.values()))
        phases = {"build": build, "forward": forward, "backward": backward, "step": step}
        if stage != 3:
            del phases["forward"]  # only ZeRO-3 gathers in its forward
        return phases

    phases = phases_with(buckets)
    totals = {k: sum(v.values()) for k, v in phases.items()}
    phase = max(totals, key=totals.get)
    own = totals[phase]
    allocated_parts = phases_with(allocated_buckets)
    allocated_phases = {k: sum(v.values()) for k, v in allocated_parts.items()}
    allocated_phase = max(allocated_phases, key=allocated_phases.get)
    allocated_peak = allocated_phases[allocated_phase]
    if cpu:
        fixed = CPU_FIXED_BYTES + (CPU_FIRST_TRIAL_BYTES if first_in_process else 0)
        own_peak = own + fixed
        device_total = CPU_PROCESS_BASELINE_BYTES + own_peak
        host_total = device_total  # the CPU accelerator's device is the host
    else:
        fixed = CUDA_CONTEXT_BYTES + CUDA_NCCL_BYTES  # outside the allocator: not in the own peak
        own_peak = own
        device_total = own * (1 + CUDA_RESERVED_SLACK) + fixed
        host_total = host
    peak_terms = dict(phases[phase], fixed=fixed if cpu else 0.0)
    return MemoryPrediction(
        states_device=states_device, states_host=host, params=params, grads=grads, optimizer=optimizer,
        buffers=buckets, activations=acts.total, fixed=fixed, peak=own_peak, allocated_peak=allocated_peak,
        one_time=CPU_FIRST_TRIAL_BYTES if (cpu and first_in_process) else 0.0,
        device_total=device_total, host_total=host_total, phase=phase, phases=totals, allocated_phases=allocated_phases,
        allocated_phase=allocated_phase,
        allocated_peak_terms=dict(allocated_parts[allocated_phase]),
        peak_terms=peak_terms,
        activation_terms={k: v for k, v in asdict(acts).items() if k != "notes"},
        deepspeed_estimate=deepspeed_estimate(stats, stage, n, ranks_per_node, spec.offload), notes=notes)
