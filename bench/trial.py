"""One trial on one rank: model + data + DeepSpeed engine → warmup → timed steps → teardown.

This is the inner loop; keep it as direct as nanoGPT's bench.py. A step is one optimizer
step: every micro-batch of the gradient accumulation, the reduction and the update, timed by
the wall clock around all of it. Nothing in the timed window synchronises the device per
micro-step: losses stay on the device until the window closes.
"""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import asdict, dataclass, field

import torch

from .collect import breakdown as bd
from .collect.memory import PeakMemory, probe_model_states
from .collect.peak import model_peak
from .collect.telemetry import telemetry_sampler
from .collect.timing import step_timer
from .data import MarkovSource
from .engine import ds_config
from .failures import Diverged, Unsupported, classify
from .device import DTYPES, rank_device, release_host_memory, release_memory, sync
from .models import build_config, build_model, config_to_dict, hidden_size, initialize_weights, model_class
from .spec import TrialSpec


@dataclass
class RankResult:
    """What one rank measured in one trial; the driver aggregates these into the record."""

    rank: int
    status: str = "ok"
    error: str | None = None
    host: str = ""
    device: str = ""
    setup_s: float = 0.0
    teardown_s: float = 0.0
    warmup_s: float = 0.0
    window_s: float = 0.0
    step_times_s: list[float] = field(default_factory=list)
    step_cpu_s: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float | None] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    loss_scales: list[float] = field(default_factory=list)
    skipped_steps: int = 0
    tokens: int = 0
    model_state: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    ds_config: dict = field(default_factory=dict)
    model_config: dict = field(default_factory=dict)
    entropy_floor: float | None = None
    notes: list[str] = field(default_factory=list)
    breakdown: dict = field(default_factory=dict)
    comms: dict = field(default_factory=dict)
    telemetry: dict = field(default_factory=dict)
    measured_peak_tflops: float | None = None
    measured_peak_source: str | None = None  # "measured" (this trial ran the probe) or "cache"
    measured_peak_probe_s: float | None = None  # seconds spent on it (reading the cache or measuring)
    reference_s: list[float] = field(default_factory=list)
    reference_cpu_s: list[float] = field(default_factory=list)
    data_s: float | None = None
    trace: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


_REFERENCE: dict[str, tuple] = {}


def reference_samples(accelerator: str, n: int = 5) -> tuple[list[float], list[float]]:
    """Seconds of a fixed reference workload (a fp32 256³ matmul ×16 on a CPU rank's threads;
    a 16-bit 4096³ matmul ×10 on a GPU: bf16, fp16 before Ampere), `n` samples, taken next to
    a trial's window; with the CPU seconds of each sample on a CPU (empty on a GPU).

    A trial's step time divided by this is its speed relative to what the machine could do
    at that moment: on a shared machine whose effective speed drifts (other tenants, CPU
    steal), both slow down together and the ratio holds, which is what `llmbench gate`
    compares on CPU (the design's "ratio against a reference, measured in the same run")."""
    if accelerator not in _REFERENCE:
        if accelerator == "cuda":
            dtype = torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else torch.float16  # native only
            a = torch.randn(4096, 4096, device=rank_device(accelerator), dtype=dtype)
            _REFERENCE[accelerator] = (a, a.clone(), 10)
        else:
            g = torch.Generator().manual_seed(0)
            _REFERENCE[accelerator] = (torch.randn(256, 256, generator=g), torch.randn(256, 256, generator=g), 16)
    a, b, reps = _REFERENCE[accelerator]
    wall, cpu = [], []
    for i in range(n + 1):  # the first is a warmup
        sync(accelerator)
        t, c = time.perf_counter(), time.process_time()
        for _ in range(reps):
            a @ b
        sync(accelerator)
        if i:
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    return wall, (cpu if accelerator != "cuda" else [])


def _check_supported(spec: TrialSpec, accelerator: str, nodes: int, res: RankResult) -> None:
    """Refuse what cannot run here, and note options that would have no effect."""
    from .precision import detect_capabilities, emulated_bf16_note

    note = emulated_bf16_note(spec.precision, detect_capabilities(accelerator))
    if note:
        res.notes.append(note)
    if spec.quant == "fp8":
        if accelerator != "cuda" or torch.cuda.get_device_capability() < (8, 9):
            raise Unsupported("fp8 training needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+)")
        try:
            import torchao.float8  # noqa: F401
        except ImportError:
            raise Unsupported("fp8 training needs torchao (pip install torchao)") from None
    if spec.quant in ("zeropp-qg", "zeropp") and nodes < 2:
        res.notes.append("zero_quantized_gradients has no effect on a single node: DeepSpeed quantizes only inter-node gradient traffic")
    if spec.quant in ("zeropp-hpz", "zeropp") and nodes < 2:
        res.notes.append("zero_hpz_partition_size has no effect on a single node: the secondary partition is the whole node")
    if spec.compile and accelerator == "cpu":
        import shutil

        if shutil.which("g++") is None and shutil.which("c++") is None:
            raise Unsupported("torch.compile on CPU needs a C++ compiler (g++)")


def build_trial_model(spec: TrialSpec, config, cfg: dict):
    """The model a trial trains: under ZeRO-3 built inside `deepspeed.zero.Init`, so parameters
    are partitioned as they are created and the whole model never materialises on one rank;
    at every stage initialised identically from the seed."""
    import deepspeed

    cls = model_class(config)  # imported outside zero.Init (see model_class)
    if spec.zero_stage == 3:
        with deepspeed.zero.Init(config_dict_or_path=cfg):
            model = build_model(config, cls)
    else:
        model = build_model(config, cls)
    initialize_weights(model, spec.seed)
    return model


def train_step(engine, micro_batches: list[torch.Tensor], dev: torch.device, probe=None) -> torch.Tensor:
    """One optimizer step: forward and backward of every micro-batch of the accumulation, each
    followed by DeepSpeed's step (which applies the update at the accumulation boundary).
    Returns the mean loss, left on the device (reading it would synchronise). `probe`, if
    given, runs the last micro-batch's forward+backward itself (model-state probing)."""
    total = torch.zeros((), device=dev)
    for m, x in enumerate(micro_batches):
        loss: list[torch.Tensor] = []

        def forward_backward(x: torch.Tensor = x) -> None:
            loss.append(engine(input_ids=x, labels=x).loss)
            engine.backward(loss[0])

        (probe if probe is not None and m == len(micro_batches) - 1 else lambda f: f())(forward_backward)
        engine.step()
        total += loss[0].detach()
    return total / len(micro_batches)


@dataclass
class _Trial:
    """What the phases of one trial share: the spec, the engine, its batches and device."""

    spec: TrialSpec
    accelerator: str
    dev: torch.device
    batches: list = field(default_factory=list)
    engine: object = None
    model: object = None

    def step(self, i: int, probe=None) -> torch.Tensor:
        """Optimizer step i (its micro-batches wrap around after the warmup and window)."""
        ga, n = self.spec.grad_accum, self.spec.warmup_steps + self.spec.steps
        i %= n
        return train_step(self.engine, self.batches[i * ga:(i + 1) * ga], self.dev, probe)


def _prepare(t: _Trial, rank: int, world_size: int, device: str, base_config, ranks_per_node: int, res: RankResult):
    """Config, data (each rank its own seeded stream, made before any timed region) and the measured peak."""
    spec = t.spec
    torch.manual_seed(spec.seed)
    _check_supported(spec, t.accelerator, max(1, world_size // ranks_per_node), res)
    config = build_config(spec.model, spec.family, spec.seq_len, spec.attn_implementation)
    cfg = ds_config(spec, t.accelerator, hidden_size(config), base_config, ranks_per_node)
    res.ds_config, res.model_config = cfg, config_to_dict(config)
    source = MarkovSource(config.vocab_size, seed=spec.seed)
    res.entropy_floor = source.entropy_rate_nats
    n_micro = (spec.warmup_steps + spec.steps) * spec.grad_accum
    t0 = time.perf_counter()
    t.batches = [torch.from_numpy(source.batch(spec.micro_batch, spec.seq_len, stream=(rank << 32) + i)).to(t.dev)
                 for i in range(n_micro)]
    res.data_s = (time.perf_counter() - t0) / n_micro * spec.grad_accum  # per optimizer step, had it been in the loop
    from deepspeed.accelerator import get_accelerator

    if DTYPES[spec.precision] in get_accelerator().supported_dtypes():  # else DeepSpeed refuses the trial below
        gemm_peak = model_peak(config, spec.micro_batch, spec.seq_len, spec.precision, str(t.dev), device)
        res.measured_peak_tflops, res.measured_peak_source = gemm_peak.tflops, gemm_peak.source
        res.measured_peak_probe_s = gemm_peak.probe_s
        release_host_memory()  # the probe's freed operands leave the heap before the memory window
    return config, cfg


def _build(t: _Trial, config, cfg: dict, res: RankResult) -> None:
    """The model (checkpointing, fp8 if asked) and its DeepSpeed engine."""
    import deepspeed

    spec = t.spec
    t0 = time.perf_counter()
    t.model = build_trial_model(spec, config, cfg)
    if spec.activation_checkpointing:
        t.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec.quant == "fp8":
        from torchao.float8 import convert_to_float8_training

        convert_to_float8_training(t.model, module_filter_fn=lambda m, name: "lm_head" not in name)
    t.engine, *_ = deepspeed.initialize(model=t.model, model_parameters=t.model.parameters(), config=cfg)
    if spec.compile:
        t.engine.compile()
    t.engine.train()
    sync(t.accelerator)
    res.setup_s = time.perf_counter() - t0


def _warm_up(t: _Trial, res: RankResult) -> None:
    """Warmup steps; model states are probed in the last one (never in the window)."""
    t0 = time.perf_counter()
    for i in range(t.spec.warmup_steps):
        last = i == t.spec.warmup_steps - 1
        probe = (lambda run: setattr(res, "model_state", asdict(probe_model_states(t.engine, run)))) if last else None
        warm_loss = t.step(i, probe)
    sync(t.accelerator)
    res.warmup_s = time.perf_counter() - t0
    if not math.isfinite(warm_loss.item()):
        raise Diverged(f"loss {warm_loss.item()} during warmup")


def _timed_window(t: _Trial, res: RankResult) -> None:
    """The timed steps, nothing synchronised inside; the machine's reference speed on either side."""
    spec, engine = t.spec, t.engine
    losses, norms, lrs, scales = [], [], [], []
    skipped_before = engine.skipped_steps
    ref_before, ref_cpu_before = reference_samples(t.accelerator)
    sampler, timer = telemetry_sampler(t.accelerator), step_timer(t.accelerator)
    sampler.start()
    timer.start()
    window_start = time.perf_counter()
    for i in range(spec.warmup_steps, spec.warmup_steps + spec.steps):
        timer.begin_step()
        losses.append(t.step(i))
        timer.end_step()
        # Host-side attribute reads: DeepSpeed computed these during the step already.
        norm = engine.get_global_grad_norm()
        norms.append(norm.detach().clone() if isinstance(norm, torch.Tensor) else norm)
        lrs.append(engine.get_lr()[0])
        if spec.precision == "fp16":
            scales.append(getattr(engine.optimizer, "cur_scale", None) or getattr(engine.optimizer, "loss_scale", None))
    sync(t.accelerator)
    res.window_s = time.perf_counter() - window_start
    ref_after, ref_cpu_after = reference_samples(t.accelerator)
    res.reference_s, res.reference_cpu_s = ref_before + ref_after, ref_cpu_before + ref_cpu_after
    res.telemetry = sampler.stop()
    res.step_times_s, res.step_cpu_s = timer.result()
    res.losses = [float(x) for x in torch.stack(losses).float().cpu()]
    res.grad_norms = [None if n is None else float(n) for n in norms]
    res.lrs = [float(x) for x in lrs]
    res.loss_scales = [float(x) for x in scales if x is not None]
    res.skipped_steps = engine.skipped_steps - skipped_before
    res.tokens = spec.steps * spec.grad_accum * spec.micro_batch * spec.seq_len
    bad = [x for x in res.losses if not math.isfinite(x)]
    if bad:
        raise Diverged(f"non-finite loss {bad[0]} in the timed window")


def _extra_passes(t: _Trial, world_size: int, trace_path: str | None, res: RankResult) -> None:
    """After the window, what synchronises: DeepSpeed's breakdown timers, the comms recorder, a profile."""
    spec = t.spec
    if spec.breakdown_steps:
        bd.enable_breakdown(t.engine)
        parts = []
        for k in range(spec.breakdown_steps):
            t.step(k)
            parts.append(bd.snapshot(t.engine))
        res.breakdown = bd.summarise(parts, spec)
    if spec.comms_steps:
        from .collect.comms import CommsRecorder

        with CommsRecorder(world_size, t.accelerator) as rec:
            for k in range(spec.comms_steps):
                t.step(k)
        res.comms = rec.summary(spec.comms_steps)
    if trace_path:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if t.dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for k in range(2):
                t.step(k)
            sync(t.accelerator)
        prof.export_chrome_trace(trace_path)
        res.trace = trace_path


def run_trial(spec: TrialSpec, rank: int, world_size: int, accelerator: str, host: str, device: str,
              base_config: dict | None = None, ranks_per_node: int | None = None,
              trace_path: str | None = None) -> RankResult:
    """One trial on this rank, as nanoGPT's bench loop reads: prepare, build, warm up, time the
    window, extra passes, tear down. Every failure is recorded in the result, never raised."""
    res = RankResult(rank=rank, host=host, device=device)
    peak = PeakMemory(accelerator)
    t = _Trial(spec, accelerator, rank_device(accelerator))
    try:
        config, cfg = _prepare(t, rank, world_size, device, base_config, ranks_per_node or world_size, res)
        peak.reset()
        _build(t, config, cfg, res)
        _warm_up(t, res)
        _timed_window(t, res)
        res.memory = peak.read()
        _extra_passes(t, world_size, trace_path, res)
        if spec.precision == "fp16" and res.skipped_steps > spec.steps // 2 and res.loss_scales and \
                res.loss_scales[-1] <= (spec.min_loss_scale or 1):
            raise Diverged(f"fp16 loss scale collapsed to {res.loss_scales[-1]:g}: {res.skipped_steps} of "
                           f"{spec.steps} steps skipped for overflow")
    except BaseException as e:  # noqa: BLE001 - every failure is recorded, the sweep goes on
        if isinstance(e, KeyboardInterrupt):
            raise
        res.status = classify(e)
        res.error = f"{type(e).__name__}: {e}".strip()[:2000]
        if not isinstance(e, (Unsupported, Diverged)):  # our own checks need no traceback
            res.error += "\n" + traceback.format_exc(limit=8)[-3000:]
        if not res.memory:
            res.memory = peak.read()
    finally:
        t0 = time.perf_counter()
        if t.engine is not None:
            t.engine.destroy()
        t.engine = t.model = t.batches = None
        release_memory(t.dev)
        res.teardown_s = time.perf_counter() - t0
    return res


def bare_loop(spec: TrialSpec, rank: int, accelerator: str, base_config: dict | None = None) -> dict:
    """The reference: a plain DeepSpeed training loop on the same model, data and config,
    with nothing collected but the wall clock around the whole window. The collector's
    overhead is llmbench's tokens/s against this one's (benchmarks/test_collector_overhead.py)."""
    import deepspeed

    torch.manual_seed(spec.seed)
    config = build_config(spec.model, spec.family, spec.seq_len, spec.attn_implementation)
    cfg = ds_config(spec, accelerator, hidden_size(config), base_config)
    source = MarkovSource(config.vocab_size, seed=spec.seed)
    dev = rank_device(accelerator)
    n_micro = (spec.warmup_steps + spec.steps) * spec.grad_accum
    batches = [torch.from_numpy(source.batch(spec.micro_batch, spec.seq_len, stream=(rank << 32) + i)).to(dev)
               for i in range(n_micro)]
    model = build_trial_model(spec, config, cfg)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    timer, first_timed = step_timer(accelerator), spec.warmup_steps * spec.grad_accum
    for i, x in enumerate(batches):
        if i == first_timed:
            sync(accelerator)
            start = time.perf_counter()
            timer.start()
        if i >= first_timed and i % spec.grad_accum == 0:
            timer.begin_step()
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
        if i >= first_timed and (i + 1) % spec.grad_accum == 0:
            timer.end_step()
    sync(accelerator)
    window = time.perf_counter() - start
    engine.destroy()
    del engine, model, batches
    release_memory(dev)
    return {"rank": rank, "status": "ok", "window_s": window, "step_times_s": timer.result()[0],
            "tokens": spec.steps * spec.grad_accum * spec.micro_batch * spec.seq_len}
