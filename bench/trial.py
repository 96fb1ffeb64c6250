"""One trial on one rank: model + data + DeepSpeed engine → warmup → timed steps → teardown.

This is the inner loop; keep it as direct as nanoGPT's bench.py. A step is one optimizer
step: every micro-batch of the gradient accumulation, the reduction and the update, timed by
the wall clock around all of it. Nothing in the timed window synchronises the device per
micro-step: losses stay on the device until the window closes.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .collect.activations import probe_activations
from .collect.breakdown import Breakdown
from .collect.collector import Base, observe
from .collect.memory import peak_memory, probe_model_states
from .collect.peak import model_peak
from .collect.reference import ReferenceSpeed, reference_operands
from .collect.signals import TrainingSignals
from .collect.telemetry import telemetry_sampler
from .collect.timing import step_timer
from .data import MarkovSource
from .device import DTYPES, rank_device, release_host_memory, release_memory, sync
from .engine import ds_config
from .failures import Diverged, check_runnable, first_divergence, recorded
from .models import build_config, build_model, config_to_dict, hidden_size, initialize_weights, model_class
from .rank_result import RankResult
from .spec import TrialSpec


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


def train_step(engine, micro_batches: list[torch.Tensor], dev: torch.device, probe=None, poison: bool = False) -> torch.Tensor:
    """One optimizer step: forward and backward of every micro-batch of the accumulation, each
    followed by DeepSpeed's step (which applies the update at the accumulation boundary).
    Returns the mean loss, left on the device (reading it would synchronise). `probe`, if
    given, runs the last micro-batch's forward+backward itself (model-state probing).
    `poison` (tests only: LLMBENCH_TEST_NAN) makes the loss NaN, and its gradients with it."""
    total = torch.zeros((), device=dev)
    for m, x in enumerate(micro_batches):
        loss: list[torch.Tensor] = []

        def forward_backward(x: torch.Tensor = x) -> None:
            out = engine(input_ids=x, labels=x).loss
            loss.append(out * float("nan") if poison else out)
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
    slowdown: float = 0.0  # test-only (injected_slowdown): sleep this fraction of each step's time
    poison_step: int | None = None  # test-only (LLMBENCH_TEST_NAN): the step whose loss is made NaN
    beat: Callable[[int, bool], None] | None = None  # tells the driver a step ended (launch/watchdog.py)
    watch: bool = False  # whether the driver's watchdog should expect the next beat within a few steps

    def step(self, i: int, probe=None) -> torch.Tensor:
        """Optimizer step i (its micro-batches wrap around after the warmup and window)."""
        ga, n = self.spec.grad_accum, self.spec.warmup_steps + self.spec.steps
        j = i % n
        t0 = time.perf_counter()
        loss = train_step(self.engine, self.batches[j * ga:(j + 1) * ga], self.dev, probe, i == self.poison_step)
        if self.slowdown:
            sync(self.accelerator)
            time.sleep(self.slowdown * (time.perf_counter() - t0))
        if self.beat is not None:
            self.beat(i, self.watch)
        return loss

    def teardown(self) -> None:
        """Destroy the engine and free everything the trial held (also after a failure)."""
        if self.engine is not None:
            self.engine.destroy()
        self.engine = self.model = self.batches = None
        release_memory(self.dev)


def _prepare(t: _Trial, rank: int, world_size: int, device: str, base_config, ranks_per_node: int, res: RankResult):
    """Config, data (each rank its own seeded stream, made before any timed region) and the measured peak."""
    spec = t.spec
    torch.manual_seed(spec.seed)
    check_runnable(spec, t.accelerator, max(1, world_size // ranks_per_node), res.notes)
    config = build_config(spec.model, spec.family, spec.seq_len, spec.attn_implementation)
    cfg = ds_config(spec, t.accelerator, hidden_size(config), base_config, ranks_per_node)
    res.ds_config, res.transformers_config = copy.deepcopy(cfg), config_to_dict(config)  # as passed, before DeepSpeed sees it
    res.fp32_matmul_precision = torch.get_float32_matmul_precision()  # "highest": fp32 matmuls without TF32
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
    """Warmup steps (never in the window): the first one's last micro-batch counts the
    activations saved for backward, the last one probes the model states."""
    t0 = time.perf_counter()
    warm: list[torch.Tensor] = []
    skipped: list[bool] = []  # fp16: steps DeepSpeed skipped for overflow
    for i in range(t.spec.warmup_steps):
        if i == t.spec.warmup_steps - 1:
            probe = lambda run: setattr(res, "model_state", asdict(probe_model_states(t.engine, run)))  # noqa: E731
        elif i == 0 and not t.spec.compile:  # compiled graphs save what the compiler chose: not eager's
            probe = lambda run: setattr(res, "activations", probe_activations(t.engine.module, run))  # noqa: E731
        else:
            probe = None
        t.watch = True  # from the first step's end on: the watchdog's clock starts at its third beat
        before = t.engine.skipped_steps
        res.warmup_lrs.append(t.engine.get_lr()[0])  # the lr this step applies (DeepSpeed's scheduler steps after it)
        warm.append(t.step(i, probe))
        skipped.append(t.engine.skipped_steps > before)
    sync(t.accelerator)
    res.warmup_s = time.perf_counter() - t0
    res.warmup_losses = [float(x) for x in torch.stack(warm).float().cpu()] if warm else []
    first = first_divergence(res.warmup_losses, skipped if t.spec.precision == "fp16" else [],
                             0) if warm else None
    if first:
        raise Diverged(f"loss became {first[1]} at step {first[0]} (warm-up step {first[0] + 1} of {t.spec.warmup_steps})")


def _timed_window(t: _Trial, res: RankResult) -> None:
    """The timed steps under their collectors (the reference speed brackets the window, the step
    timer is innermost); nothing synchronised inside, the losses read after."""
    spec = t.spec
    signals = TrainingSignals(t.engine, spec.precision)
    beat, t.beat = t.beat, None  # in the window the beats go out after the step timer stops (_Beats, outermost)
    collectors = [_Beats(beat, spec.warmup_steps), ReferenceSpeed(t.accelerator), telemetry_sampler(t.accelerator),
                  signals, step_timer(t.accelerator)]
    try:
        losses, fields = observe(collectors, t.step, range(spec.warmup_steps, spec.warmup_steps + spec.steps),
                                 lambda: sync(t.accelerator))
    finally:
        t.beat, t.watch = beat, False  # what follows (extra passes, teardown) is covered by the trial's timeout_s
    if t.beat is not None:
        t.beat(spec.warmup_steps + spec.steps - 1, False)
    res.fill(fields)
    res.losses = [float(x) for x in torch.stack(losses).float().cpu()]
    res.tokens = spec.steps * spec.grad_accum * spec.micro_batch * spec.seq_len
    first = first_divergence(res.losses, signals.skipped_flags if spec.precision == "fp16" else [], spec.warmup_steps)
    if first:
        k = first[0] - spec.warmup_steps
        raise Diverged(f"loss became {first[1]} at step {first[0]} (the timed window's step {k + 1} of {spec.steps}; "
                       f"{k} finite before it), read after the window")


class _Beats(Base):
    """The window's beats (launch/watchdog.py), sent after each step's timer stopped: first in
    the collectors, so its end_step runs last."""

    def __init__(self, beat: Callable[[int, bool], None] | None, first: int) -> None:
        self.send, self.step = beat, first - 1

    def end_step(self) -> None:
        self.step += 1
        if self.send is not None:
            self.send(self.step, True)


def _extra_passes(t: _Trial, world_size: int, trace_path: str | None, res: RankResult) -> None:
    """After the window, what synchronises, each in its own pass: DeepSpeed's breakdown timers,
    the comms recorder, a profile."""
    from .collect.comms import CommsRecorder
    from .collect.profile import Profile

    spec = t.spec
    passes = [(spec.breakdown_steps, lambda: Breakdown(t.engine, spec)),
              (spec.comms_steps, lambda: CommsRecorder(world_size, t.accelerator)),
              (2 if trace_path else 0, lambda: Profile(trace_path, t.dev.type))]
    for steps, collector in passes:
        if steps:
            res.fill(observe([collector()], t.step, range(steps), lambda: sync(t.accelerator))[1])


def _fp16_collapse(spec: TrialSpec, res: RankResult) -> None:
    """Diverged when fp16's dynamic loss scale fell to its floor while skipping most steps."""
    if spec.precision == "fp16" and res.skipped_steps > spec.steps // 2 and res.loss_scales and \
            res.loss_scales[-1] <= (spec.min_loss_scale or 1):
        raise Diverged(f"fp16 loss scale collapsed to {res.loss_scales[-1]:g}: {res.skipped_steps} of "
                       f"{spec.steps} steps skipped for overflow")


SLOWDOWN_ENV = "LLMBENCH_TEST_SLOWDOWN"


def parse_slowdown(value: str) -> tuple[float, set[str]]:
    """LLMBENCH_TEST_SLOWDOWN's value: (FRACTION, the trial ids it names; empty: every trial).
    ValueError names a malformed one."""
    frac, _, ids = value.partition(":")
    try:
        f = float(frac)
        if not 0 <= f <= 100:
            raise ValueError
    except ValueError:
        raise ValueError(f"{SLOWDOWN_ENV}={value!r}: use FRACTION (0 to 100) or FRACTION:TRIAL_ID,TRIAL_ID") from None
    return f, set(ids.split(",")) - {""}


NAN_ENV = "LLMBENCH_TEST_NAN"


def injected_nan(trial_id: str, value: str | None) -> int | None:
    """Tests only: LLMBENCH_TEST_NAN=STEP[:TRIAL_ID,...] makes optimizer step STEP's loss NaN
    (counted from the first warm-up step, 0) in the named trials (all when none is named)."""
    if not value:
        return None
    step, _, ids = value.partition(":")
    if not step.isdigit():
        raise ValueError(f"{NAN_ENV}={value!r}: use STEP or STEP:TRIAL_ID,TRIAL_ID")
    named = set(ids.split(",")) - {""}
    return int(step) if not named or trial_id in named else None


def injected_slowdown(trial_id: str, value: str | None) -> float:
    """The test-only slowdown for this trial from LLMBENCH_TEST_SLOWDOWN (parse_slowdown): each
    named step then sleeps FRACTION of its own time after it ends (synchronised first), so the
    step is that much slower and the reference workload is not (nor its CPU time: a sleep uses
    none). How the gate's miss rate is measured (docs/gates.md); 0.0 when unset."""
    if not value:
        return 0.0
    f, ids = parse_slowdown(value)
    return f if not ids or trial_id in ids else 0.0


def run_trial(spec: TrialSpec, rank: int, world_size: int, accelerator: str, host: str, device: str,
              base_config: dict | None = None, ranks_per_node: int | None = None,
              trace_path: str | None = None, slowdown: float = 0.0, placement: dict | None = None,
              beat: Callable[[int, bool], None] | None = None, poison_step: int | None = None) -> RankResult:
    """One trial on this rank, as nanoGPT's bench loop reads: prepare, build, warm up, time the
    window, extra passes, tear down. Every failure is recorded in the result, never raised.
    `slowdown` > 0 (tests only: injected_slowdown) makes every step that fraction slower.
    `placement`: the rank's node, node rank and local rank (worker._placement). `beat(step,
    watch)` runs after every step (the driver's progress watchdog). `poison_step` (tests only:
    injected_nan) makes that step's loss NaN."""
    res = RankResult(rank=rank, host=host, device=device, **(placement or {}))
    memory = peak_memory(accelerator)
    t = _Trial(spec, accelerator, rank_device(accelerator), slowdown=slowdown, poison_step=poison_step, beat=beat)
    if slowdown:
        res.notes.append(f"test-only slowdown injected ({SLOWDOWN_ENV}): every step sleeps {slowdown:.0%} of its time")
    with recorded(res, memory, t.teardown):
        config, cfg = _prepare(t, rank, world_size, device, base_config, ranks_per_node or world_size, res)
        reference_operands(accelerator)  # the window's reference GEMM operands exist before its memory window
        memory.start()  # the peak from here to the window's end is this trial's
        _build(t, config, cfg, res)
        _warm_up(t, res)
        _timed_window(t, res)
        res.fill(memory.stop())
        _extra_passes(t, world_size, trace_path, res)
        res.ds_global_steps = t.engine.global_steps  # DeepSpeed's count of optimizer steps taken
        _fp16_collapse(spec, res)
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
    step_times = timer.stop()["step_times_s"]
    engine.destroy()
    del engine, model, batches
    release_memory(dev)
    return {"rank": rank, "status": "ok", "window_s": window, "step_times_s": step_times,
            "tokens": spec.steps * spec.grad_accum * spec.micro_batch * spec.seq_len}
