"""The inference scenario: one process measures a trained model, quantized or not.

For a trial it (1) gets the standard model trained on the Markov source until its loss is
within `TRAIN_TOLERANCE_NATS` of the entropy floor (trainedmodel.py: cached on disk, so the
`none` trial and every quantized trial start from the same weights), (2) casts it to the trial's precision,
prunes it (prune.py) and quantizes its linear layers with torchao, (3) measures the weight bytes its tensors
really hold (collect/weights.py), the perplexity on held-out batches of the source, the prefill latency and the
greedy decode rate with the KV cache at several batch sizes, and the peak memory.

Threads: the worker pool's share of cores per rank (on the 2-core CPU machine, 1). A 2-thread
decode loop competing with another process on those 2 cores ran ~30× slower here (OpenMP
threads wait on each other), so the inference process keeps the pool's usual share.

A method this hardware cannot run (torchao refuses to quantize, or the first forward fails)
raises `Unsupported` with torchao's own message; the worker records it and the sweep goes on.
"""

from __future__ import annotations

import gc
import hashlib
import inspect
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from .collect.memory import peak_memory
from .collect.timing import step_timer
from .device import DTYPES, rank_device, release_host_memory, release_memory, sync
from .collect.stats import median, median_ci95
from .collect.weights import weight_bytes
from . import prune
from .data import MarkovSource
from .models import build_config, build_model, config_to_dict
from .spec import TrialSpec, compression
from .trainedmodel import EVAL_STREAM, TRAIN_TOLERANCE_NATS, trained_state
from .failures import Unsupported, recorded
from .rank_result import InferenceResult

QUANT_CONFIGS = {  # quant value → torchao.quantization config class name
    "int8-wo": "Int8WeightOnlyConfig",
    "int8-dyn": "Int8DynamicActivationInt8WeightConfig",
    "int4-wo": "Int4WeightOnlyConfig",
    "fp8-wo": "Float8WeightOnlyConfig",
    "fp8-dyn": "Float8DynamicActivationFloat8WeightConfig",
}


def eval_batches(source: MarkovSource, n: int, batch: int, seq_len: int) -> torch.Tensor:
    """Held-out [n, batch, seq_len] tokens: streams no training or validation batch uses."""
    return torch.from_numpy(np.stack([source.batch(batch, seq_len, stream=EVAL_STREAM + i) for i in range(n)]))


def tokens_sha256(tokens: torch.Tensor) -> str:
    """Fingerprint of the eval tokens: equal fingerprints prove two trials scored the same batches."""
    return hashlib.sha256(tokens.contiguous().numpy().astype("<i8").tobytes()).hexdigest()


def perplexity(model, batches: torch.Tensor, device: torch.device) -> tuple[float, float, int]:
    """Perplexity = exp(mean negative log-likelihood per predicted token), every token after
    the first of each sequence predicted from its prefix (Jelinek et al. 1977; Jurafsky &
    Martin, Speech and Language Processing, 3rd ed., §3.3; Hugging Face's "Perplexity of
    fixed-length models"). Logits are scored in fp32. Returns (ppl, mean NLL, tokens)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for x in batches:
            x = x.to(device)
            logits = model(input_ids=x).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1),
                                                    reduction="sum")
            total += nll.item()
            count += x[:, 1:].numel()
    mean = total / count
    return math.exp(mean), mean, count


def _forward_kwargs(model) -> tuple[str, dict]:
    """The KV-cache keyword of this transformers version (`cache` since 5.x, `past_key_values`
    before), and `logits_to_keep=1` where supported: generation needs only the last logits,
    as `generate()` itself asks for."""
    params = inspect.signature(model.forward).parameters
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    return ("cache" if "cache" in params else "past_key_values"), extra


def generate_timed(model, prompt: torch.Tensor, new_tokens: int, device: torch.device) -> tuple[float, list[float], list[float]]:
    """Prefill the prompt, then greedy-decode `new_tokens` tokens one at a time with the KV
    cache. Returns (prefill seconds, seconds per decoded token, CPU seconds per decoded token
    on a CPU, empty elsewhere): the prefill produces the first new token; each decode step
    feeds the last token and produces the next one, timed by the device's step timer
    (collect/timing.py; CPU seconds are what `llmbench gate` compares on a CPU, where other
    processes move wall time)."""
    cache_kw, extra = _forward_kwargs(model)
    timer = step_timer(device.type)
    with torch.no_grad():
        sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True, **extra)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        sync(device)
        prefill = time.perf_counter() - t0
        timer.start()
        for _ in range(new_tokens - 1):
            timer.begin_step()
            past = getattr(out, "cache", None) or out.past_key_values
            out = model(input_ids=nxt, use_cache=True, **{cache_kw: past}, **extra)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            sync(device)
            timer.end_step()
        steps = timer.stop()
    return prefill, steps["step_times_s"], steps["step_cpu_s"]


def decode_tokens_per_s(batch: int, step_times_s: list[float]) -> float:
    """Decode throughput = batch × decoded tokens / decode wall time (the prefill excluded),
    as vLLM's and optimum-benchmark's decode throughput define it."""
    return batch * len(step_times_s) / sum(step_times_s)


def quantize(model, quant: str) -> str:
    """Quantize the model's linear layers in place with torchao; returns the config's repr.
    Refusals (missing kernels, hardware checks) become `Unsupported` with torchao's message."""
    if quant == "none":
        return "none"
    try:
        import torchao.quantization as tq

        config = getattr(tq, QUANT_CONFIGS[quant])()
        tq.quantize_(model, config)
    except Exception as e:  # noqa: BLE001 - torchao refuses with ImportError, AssertionError, RuntimeError...
        raise Unsupported(f"torchao {QUANT_CONFIGS[quant]} refused on this machine: {type(e).__name__}: {e}") from None
    return repr(config)


@dataclass
class _Inference:
    """What the phases of one inference trial share; `teardown` frees the model whatever happened."""

    spec: TrialSpec
    accelerator: str
    dev: torch.device
    state: dict | None = None  # the trained weights, dropped once loaded
    model: object = None

    def teardown(self) -> None:
        self.model = self.state = None
        release_memory(self.dev)


def _inputs(t: _Inference, res: InferenceResult):
    """The model's config, the source, the trained weights (cached) and the held-out tokens."""
    spec = t.spec
    config = build_config(spec.model, spec.family, spec.seq_len, spec.attn_implementation)
    res.transformers_config = config_to_dict(config)
    source = MarkovSource(config.vocab_size, seed=spec.seed)
    res.entropy_floor = source.entropy_rate_nats
    from .precision import detect_capabilities, emulated_bf16_note

    res.notes += [n for n in [emulated_bf16_note(spec.precision, detect_capabilities(t.accelerator))] if n]
    t.state, meta, res.trained_cache = trained_state(spec, config, source, t.dev)
    res.train_loss_final, res.train_steps, res.train_s = meta["train_loss_final"], meta["train_steps"], meta["train_s"]
    if not meta["reached_tolerance"]:
        res.notes.append(f"the model stopped at the {meta['train_steps']}-step cap with validation loss "
                         f"{meta['valid_loss_final']:.3f}, {meta['valid_loss_final'] - res.entropy_floor:.3f} nats "
                         f"above the floor (tolerance {TRAIN_TOLERANCE_NATS})")
    tokens = eval_batches(source, spec.eval_batches, spec.micro_batch, spec.seq_len)
    res.eval_batches_sha256, res.eval_tokens = tokens_sha256(tokens), spec.eval_batches * spec.micro_batch * (spec.seq_len - 1)
    return config, source, tokens


def _load(t: _Inference, config, tokens: torch.Tensor, res: InferenceResult) -> None:
    """The trained model at the trial's precision, quantized, and its first forward (where a
    method without a kernel for this device fails: `Unsupported`)."""
    spec = t.spec
    t.model = build_model(config)
    t.model.load_state_dict(t.state)
    t.state = None
    t.model.to(device=t.dev, dtype=DTYPES[spec.precision]).eval()
    res.weight_bytes_reference = weight_bytes(t.model)
    res.prune_config, res.weight_sparsity, quantized = prune.apply(t.model, spec.prune, spec.quant)
    res.quant_config = spec.quant if quantized else quantize(t.model, spec.quant)
    if spec.prune.startswith("magnitude-"):
        res.notes.append(f"{spec.prune} leaves dense tensors: its zeros are stored and multiplied, so it saves no bytes "
                         f"and no time by itself (weight sparsity {res.weight_sparsity:.1%}, counted)")
    res.weight_bytes = weight_bytes(t.model)
    try:
        with torch.no_grad():
            t.model(input_ids=tokens[0, :1, :8].to(t.dev), use_cache=True)
    except Exception as e:  # noqa: BLE001
        if spec.quant == "none" and spec.prune == "none":
            raise
        raise Unsupported(f"{compression(spec.prune, spec.quant)} model cannot run on {t.accelerator}: {type(e).__name__}: {e}") from None


def _measure(t: _Inference, source: MarkovSource, tokens: torch.Tensor, res: InferenceResult) -> None:
    """Perplexity on the held-out tokens, then prefill and decode timed at every batch size."""
    spec, model, dev = t.spec, t.model, t.dev
    ppl, nll, count = perplexity(model, tokens, dev)
    res.perplexity, res.eval_nll_nats = ppl, nll
    if not math.isfinite(ppl):
        res.notes.append(f"perplexity is not finite ({ppl}): the quantized model's outputs overflow")
    gen = torch.from_numpy(source.batch(max(spec.decode_batches), spec.prompt_len, stream=EVAL_STREAM - 1)).to(dev)
    for b in spec.decode_batches:
        prompt = gen[:b]
        generate_timed(model, prompt, spec.new_tokens, dev)  # warmup: allocator, kernels, caches
        pre, dec, steps, cpu = [], [], [], []
        for _ in range(spec.repeats):
            p, s, c = generate_timed(model, prompt, spec.new_tokens, dev)
            pre.append(p)
            dec.append(sum(s))
            steps += s
            cpu += c
        res.prefill_times_s[str(b)], res.decode_times_s[str(b)], res.decode_step_times_s[str(b)] = pre, dec, steps
        res.decode_step_cpu_s[str(b)] = cpu


def run_inference(spec: TrialSpec, accelerator: str, host: str = "", device_name: str = "") -> InferenceResult:
    """The inference trial: trained model → precision → quantize → measure. Never raises
    (except KeyboardInterrupt): failures are recorded with their status and reason, on the
    failure and teardown path training trials take (failures.recorded)."""
    res = InferenceResult(host=host, device=device_name, threads=torch.get_num_threads())
    memory = peak_memory(accelerator)
    t = _Inference(spec, accelerator, rank_device(accelerator))
    with recorded(res, memory, t.teardown):
        t0 = time.perf_counter()
        config, source, tokens = _inputs(t, res)
        gc.collect()
        release_host_memory()  # training's freed heap back to the OS: the peak below is inference's own
        memory.start()
        _load(t, config, tokens, res)
        res.setup_s = time.perf_counter() - t0
        _measure(t, source, tokens, res)
        res.fill(memory.stop())
    return res


def summarise(res: InferenceResult, spec: TrialSpec) -> dict:
    """The record fields from an InferenceResult: medians and 95% intervals per batch."""
    out: dict = {}
    batches = [str(b) for b in spec.decode_batches]
    pre = {b: res.prefill_times_s.get(b) or [] for b in batches}
    dec = {b: res.decode_step_times_s.get(b) or [] for b in batches}
    per_repeat = {b: res.decode_times_s.get(b) or [] for b in batches}
    n_steps = spec.new_tokens - 1
    first = batches[0]
    out["prefill_latency_s"] = median(pre[first]) if pre[first] else None
    out["prefill_latency_ci95_s"] = median_ci95(pre[first]) if pre[first] else None
    out["prefill_latency_s_per_batch"] = {b: median(v) for b, v in pre.items() if v}
    out["decode_latency_s_per_token"] = {b: median(v) for b, v in dec.items() if v}
    out["decode_latency_ci95_s_per_token"] = {b: median_ci95(v) for b, v in dec.items() if v}
    # tokens/s of the median repeat (decode_tokens_per_s: batch × decoded tokens / decode seconds);
    # its 95% interval from the interval of the median decode time.
    out["decode_tokens_per_s"] = {b: decode_tokens_per_s(int(b), [median(v) / n_steps] * n_steps)
                                  for b, v in per_repeat.items() if v}
    out["decode_tokens_per_s_ci95"] = {}
    for b, v in per_repeat.items():
        ci = median_ci95(v) if v else None
        if ci:
            out["decode_tokens_per_s_ci95"][b] = [int(b) * n_steps / ci[1], int(b) * n_steps / ci[0]]
    out["step_times_s"] = dec[first]  # per decoded token at the first batch size: the store's steps table
    out["step_cpu_s"] = res.decode_step_cpu_s.get(first) or []
    return out
