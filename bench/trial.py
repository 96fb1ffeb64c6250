"""One trial on one rank: model + data + DeepSpeed engine → warmup → timed steps → teardown.

This is the inner loop; keep it as direct as nanoGPT's bench.py. A step is one optimizer
step: every micro-batch of the gradient accumulation, the reduction and the update, timed by
the wall clock around all of it. Nothing in the timed window synchronises the device per
micro-step: losses stay on the device until the window closes.
"""

from __future__ import annotations

import gc
import math
import time
import traceback
from dataclasses import asdict, dataclass, field

import torch

from .collect.memory import PeakMemory, probe_model_states
from .data import MarkovSource
from .engine import ds_config
from .models import build_config, build_model, config_to_dict, initialize_weights
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
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    model_state: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    ds_config: dict = field(default_factory=dict)
    model_config: dict = field(default_factory=dict)
    entropy_floor: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class Diverged(RuntimeError):
    pass


def _sync(accelerator: str) -> None:
    if accelerator == "cuda":
        torch.cuda.synchronize()


def classify(exc: BaseException, spec: TrialSpec) -> str:
    """A failure's status from the exception itself (never from words in a log)."""
    if isinstance(exc, Diverged):
        return "diverged"
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return "oom"
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if (spec.precision == "fp16" and not acc.is_fp16_supported()) or (spec.precision == "bf16" and not acc.is_bf16_supported()):
        return "unsupported"
    return "failed"


def run_trial(spec: TrialSpec, rank: int, world_size: int, accelerator: str, host: str, device: str) -> RankResult:
    import deepspeed

    res = RankResult(rank=rank, host=host, device=device)
    peak = PeakMemory(accelerator)
    engine = model = batches = None
    try:
        torch.manual_seed(spec.seed)
        config = build_config(spec.model, spec.family, spec.seq_len, spec.attn_implementation)
        hidden = getattr(config, "hidden_size", None) or config.n_embd
        cfg = ds_config(spec, accelerator, hidden)
        res.ds_config, res.model_config = cfg, config_to_dict(config)

        # Data first, outside every timed region: each rank reads its own seeded stream.
        source = MarkovSource(config.vocab_size, seed=spec.seed)
        res.entropy_floor = source.entropy_rate_nats
        n_micro = (spec.warmup_steps + spec.steps) * spec.grad_accum
        dev = torch.device("cuda", torch.cuda.current_device()) if accelerator == "cuda" else torch.device("cpu")
        batches = [torch.from_numpy(source.batch(spec.micro_batch, spec.seq_len, stream=(rank << 32) + i)).to(dev)
                   for i in range(n_micro)]

        peak.reset()
        t0 = time.perf_counter()
        if spec.zero_stage == 3:
            # Parameters are partitioned as they are created: the whole model never
            # materialises on one rank.
            with deepspeed.zero.Init(config_dict_or_path=cfg):
                model = build_model(config)
        else:
            model = build_model(config)
        initialize_weights(model, spec.seed)  # identical starting weights at every stage
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        engine.train()
        _sync(accelerator)
        res.setup_s = time.perf_counter() - t0

        def step(i: int, probe: bool = False) -> torch.Tensor:
            total = torch.zeros((), device=dev)
            for m in range(spec.grad_accum):
                x = batches[i * spec.grad_accum + m]
                out = {}

                def micro_step() -> None:
                    out["loss"] = loss = engine(input_ids=x, labels=x).loss
                    engine.backward(loss)

                if probe and m == spec.grad_accum - 1:  # outside the timed window
                    res.model_state = asdict(probe_model_states(engine, micro_step))
                else:
                    micro_step()
                loss = out["loss"]
                engine.step()
                total += loss.detach()
            return total / spec.grad_accum

        t0 = time.perf_counter()
        for i in range(spec.warmup_steps):
            warm_loss = step(i, probe=(i == spec.warmup_steps - 1))
        _sync(accelerator)
        res.warmup_s = time.perf_counter() - t0
        if not math.isfinite(warm_loss.item()):
            raise Diverged(f"loss {warm_loss.item()} during warmup")

        losses, times = [], []
        if accelerator == "cuda":
            events = [torch.cuda.Event(enable_timing=True) for _ in range(spec.steps + 1)]
            events[0].record()
        window_start = time.perf_counter()
        for i in range(spec.warmup_steps, spec.warmup_steps + spec.steps):
            s = time.perf_counter()
            losses.append(step(i))
            if accelerator == "cuda":
                events[len(losses)].record()
            else:
                times.append(time.perf_counter() - s)
        _sync(accelerator)
        res.window_s = time.perf_counter() - window_start
        if accelerator == "cuda":
            times = [events[k].elapsed_time(events[k + 1]) / 1000 for k in range(spec.steps)]
        res.step_times_s = times
        res.losses = [float(x) for x in torch.stack(losses).float().cpu()]
        res.tokens = spec.steps * spec.grad_accum * spec.micro_batch * spec.seq_len
        res.memory = peak.read()
        bad = [x for x in res.losses if not math.isfinite(x)]
        if bad:
            raise Diverged(f"non-finite loss {bad[0]} in the timed window")
    except BaseException as e:  # noqa: BLE001 - every failure is recorded, the sweep goes on
        if isinstance(e, KeyboardInterrupt):
            raise
        res.status = classify(e, spec)
        tb = traceback.format_exc(limit=8)
        res.error = f"{type(e).__name__}: {e}".strip()[:2000] + "\n" + tb[-3000:]
        if not res.memory:
            res.memory = peak.read()
    finally:
        t0 = time.perf_counter()
        if engine is not None:
            engine.destroy()
        del engine, model, batches
        gc.collect()
        if accelerator == "cuda":
            torch.cuda.empty_cache()
        res.teardown_s = time.perf_counter() - t0
    return res
