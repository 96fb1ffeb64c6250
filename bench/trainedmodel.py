"""The model the inference scenario measures: the standard model trained on the Markov source
until its loss approaches the entropy floor, cached on disk so every trial of a sweep (and of
later sweeps) measures the same weights without training again.

A random-weight model's perplexity says nothing about quantization error: only a model that
has learnt the source has accuracy to lose.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from pathlib import Path

import torch

from .data import MarkovSource
from .models import build_model, initialize_weights
from .spec import TrialSpec

# Training recipe for the model that inference measures (AdamW, fp32, linear warmup then
# cosine decay over the step cap). Measured on the 2-core CPU machine: the tiny model gets
# within ~0.11 nats of the floor in ~200 steps of 2,048 tokens (30-60 s, load-dependent).
TRAIN_TOKENS_PER_STEP = 2048
TRAIN_LR = 1e-2
TRAIN_WARMUP_STEPS = 20
TRAIN_MAX_STEPS = 300
TRAIN_TOLERANCE_NATS = 0.12  # stop once the validation loss is within this of the entropy floor
TRAIN_CHECK_EVERY = 25
# Disjoint RNG streams of the same source (the chain is defined by the seed, so held-out data
# is the same chain with other streams): training uses streams 1.., validation and eval these.
VALID_STREAM = 1 << 39
EVAL_STREAM = 1 << 40

def cache_dir() -> Path:
    """Where trained weights are cached: $LLMBENCH_CACHE/trained, else ~/.cache/llmbench/trained."""
    from .collect.peak import cache_root

    return cache_root() / "trained"


def _cache_path(spec: TrialSpec) -> Path:
    key = (f"{spec.model}|{spec.family}|seq{spec.seq_len}|seed{spec.seed}|steps{TRAIN_MAX_STEPS}|tol{TRAIN_TOLERANCE_NATS}"
           f"|lr{TRAIN_LR}|tok{TRAIN_TOKENS_PER_STEP}|torch{torch.__version__}")
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    name = Path(spec.model).name if Path(spec.model).name else "model"
    return cache_dir() / f"{name}-{spec.family}-seq{spec.seq_len}-seed{spec.seed}-{digest}.pt"


def _mean_loss(model, batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return float(sum(model(input_ids=x, labels=x).loss.item() for x in batches) / len(batches))


def train_to_floor(spec: TrialSpec, config, source: MarkovSource, device: torch.device) -> tuple[dict, dict]:
    """Train the standard model (fp32, AdamW) on the source until its validation loss is
    within TRAIN_TOLERANCE_NATS of the entropy floor, or TRAIN_MAX_STEPS; returns the
    state_dict and what happened (final losses, steps, seconds)."""
    torch.manual_seed(spec.seed)
    model = build_model(config)
    initialize_weights(model, spec.seed)
    model.to(device=device, dtype=torch.float32).train()
    batch = max(1, TRAIN_TOKENS_PER_STEP // spec.seq_len)
    valid = [torch.from_numpy(source.batch(16, spec.seq_len, stream=VALID_STREAM + i)).to(device) for i in range(4)]
    opt = torch.optim.AdamW(model.parameters(), lr=TRAIN_LR, betas=(0.9, 0.95), weight_decay=0.0)

    def lr_at(step: int) -> float:
        warm = min(1.0, (step + 1) / TRAIN_WARMUP_STEPS)
        return warm * 0.5 * (1 + math.cos(math.pi * min(step, TRAIN_MAX_STEPS) / TRAIN_MAX_STEPS))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    floor = source.entropy_rate_nats
    t0 = time.perf_counter()
    loss = valid_loss = float("nan")
    step = 0
    for step in range(1, TRAIN_MAX_STEPS + 1):
        x = torch.from_numpy(source.batch(batch, spec.seq_len, stream=step)).to(device)
        out = model(input_ids=x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % TRAIN_CHECK_EVERY == 0 or step == TRAIN_MAX_STEPS:
            loss = out.loss.item()
            model.eval()
            valid_loss = _mean_loss(model, valid)
            model.train()
            if not math.isfinite(valid_loss):
                raise RuntimeError(f"training the inference model diverged: validation loss {valid_loss}")
            if valid_loss - floor <= TRAIN_TOLERANCE_NATS:
                break
    meta = {"train_loss_final": loss, "valid_loss_final": valid_loss, "train_steps": step,
            "train_s": time.perf_counter() - t0, "entropy_floor_nats": floor,
            "reached_tolerance": valid_loss - floor <= TRAIN_TOLERANCE_NATS}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return state, meta


def trained_state(spec: TrialSpec, config, source: MarkovSource, device: torch.device) -> tuple[dict, dict, str]:
    """The trained weights from the cache, or trained now and cached (atomically)."""
    path = _cache_path(spec)
    if path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            return blob["state_dict"], blob["meta"], "hit"
        except Exception:  # a corrupt cache file is retrained and replaced
            pass
    state, meta = train_to_floor(spec, config, source, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"state_dict": state, "meta": meta}, tmp)
    os.replace(tmp, path)
    return state, meta, "miss"
