"""The inference scenario: one process measures a trained model, quantized or not.

For a trial it (1) gets the standard model trained on the Markov source until its loss is
within `TRAIN_TOLERANCE_NATS` of the entropy floor (trainedmodel.py: cached on disk, so the
`none` trial and every quantized trial start from the same weights), (2) casts it to the trial's precision
and quantizes its linear layers with torchao, (3) measures the weight bytes its tensors
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
import traceback
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .collect.memory import PeakMemory
from .device import DTYPES, rank_device, release_host_memory, release_memory, sync
from .collect.stats import median, median_ci95
from .collect.weights import weight_bytes
from .data import MarkovSource
from .models import build_config, build_model, config_to_dict
from .spec import TrialSpec
from .trainedmodel import EVAL_STREAM, TRAIN_TOLERANCE_NATS, trained_state
from .failures import Unsupported, classify

QUANT_CONFIGS = {  # quant value → torchao.quantization config class name
    "int8-wo": "Int8WeightOnlyConfig",
    "int8-dyn": "Int8DynamicActivationInt8WeightConfig",
    "int4-wo": "Int4WeightOnlyConfig",
    "fp8-wo": "Float8WeightOnlyConfig",
    "fp8-dyn": "Float8DynamicActivationFloat8WeightConfig",
}


@dataclass
class InferenceResult:
    """What the inference scenario measured; the driver turns it into the trial record."""

    rank: int = 0
    status: str = "ok"
    error: str | None = None
    host: str = ""
    device: str = ""
    setup_s: float = 0.0
    teardown_s: float = 0.0
    model_config: dict = field(default_factory=dict)
    entropy_floor: float | None = None
    train_loss_final: float | None = None
    train_steps: int | None = None
    train_s: float | None = None
    trained_cache: str | None = None  # "hit" or "miss"
    quant_config: str | None = None
    weight_bytes: int | None = None
    weight_bytes_reference: int | None = None
    eval_batches_sha256: str | None = None
    eval_tokens: int | None = None
    eval_nll_nats: float | None = None
    perplexity: float | None = None
    prefill_times_s: dict = field(default_factory=dict)  # batch → per-repeat seconds
    decode_step_times_s: dict = field(default_factory=dict)  # batch → per-token seconds (all repeats)
    decode_step_cpu_s: dict = field(default_factory=dict)  # batch → per-token CPU seconds (CPU only)
    decode_times_s: dict = field(default_factory=dict)  # batch → per-repeat decode seconds
    memory: dict = field(default_factory=dict)
    threads: int | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


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


def generate_timed(model, prompt: torch.Tensor, new_tokens: int, device: torch.device,
                   cpu_steps: list | None = None) -> tuple[float, list[float]]:
    """Prefill the prompt, then greedy-decode `new_tokens` tokens one at a time with the KV
    cache. Returns (prefill seconds, seconds per decoded token): the prefill produces the
    first new token; each decode step feeds the last token and produces the next one.
    `cpu_steps`, if given, receives each decode step's CPU seconds (what `llmbench gate`
    compares on a CPU, where other processes move wall time)."""
    cache_kw, extra = _forward_kwargs(model)
    with torch.no_grad():
        sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True, **extra)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        sync(device)
        prefill = time.perf_counter() - t0
        steps = []
        for _ in range(new_tokens - 1):
            t, c = time.perf_counter(), time.process_time()
            past = getattr(out, "cache", None) or out.past_key_values
            out = model(input_ids=nxt, use_cache=True, **{cache_kw: past}, **extra)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            sync(device)
            steps.append(time.perf_counter() - t)
            if cpu_steps is not None:
                cpu_steps.append(time.process_time() - c)
    return prefill, steps


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


def run_inference(spec: TrialSpec, accelerator: str, host: str = "", device_name: str = "") -> InferenceResult:
    """The inference trial: trained model → precision → quantize → measure. Never raises
    (except KeyboardInterrupt): failures are recorded with their status and reason."""
    res = InferenceResult(host=host, device=device_name, threads=torch.get_num_threads())
    dev = rank_device(accelerator)
    peak = PeakMemory(accelerator)
    model = None
    try:
        t0 = time.perf_counter()
        config = build_config(spec.model, spec.family, spec.seq_len, spec.attn_implementation)
        res.model_config = config_to_dict(config)
        source = MarkovSource(config.vocab_size, seed=spec.seed)
        res.entropy_floor = source.entropy_rate_nats
        from .precision import detect_capabilities, emulated_bf16_note

        note = emulated_bf16_note(spec.precision, detect_capabilities(accelerator))
        if note:
            res.notes.append(note)
        state, meta, res.trained_cache = trained_state(spec, config, source, dev)
        res.train_loss_final, res.train_steps, res.train_s = meta["train_loss_final"], meta["train_steps"], meta["train_s"]
        if not meta["reached_tolerance"]:
            res.notes.append(f"the model stopped at the {meta['train_steps']}-step cap with validation loss "
                             f"{meta['valid_loss_final']:.3f}, {meta['valid_loss_final'] - res.entropy_floor:.3f} nats "
                             f"above the floor (tolerance {TRAIN_TOLERANCE_NATS})")
        tokens = eval_batches(source, spec.eval_batches, spec.micro_batch, spec.seq_len)
        res.eval_batches_sha256, res.eval_tokens = tokens_sha256(tokens), spec.eval_batches * spec.micro_batch * (spec.seq_len - 1)

        gc.collect()
        release_host_memory()  # training's freed heap back to the OS: the peak below is inference's own
        peak.reset()
        model = build_model(config)
        model.load_state_dict(state)
        del state
        model.to(device=dev, dtype=DTYPES[spec.precision]).eval()
        res.weight_bytes_reference = weight_bytes(model)
        res.quant_config = quantize(model, spec.quant)
        res.weight_bytes = weight_bytes(model)
        try:  # the first forward: where a method without a kernel for this device fails
            with torch.no_grad():
                model(input_ids=tokens[0, :1, :8].to(dev), use_cache=True)
        except Exception as e:  # noqa: BLE001
            if spec.quant == "none":
                raise
            raise Unsupported(f"{spec.quant} quantized model cannot run on {accelerator}: {type(e).__name__}: {e}") from None
        res.setup_s = time.perf_counter() - t0

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
                p, s = generate_timed(model, prompt, spec.new_tokens, dev, cpu if accelerator == "cpu" else None)
                pre.append(p)
                dec.append(sum(s))
                steps += s
            res.prefill_times_s[str(b)], res.decode_times_s[str(b)], res.decode_step_times_s[str(b)] = pre, dec, steps
            res.decode_step_cpu_s[str(b)] = cpu
        res.memory = peak.read()
    except BaseException as e:  # noqa: BLE001 - every failure is recorded, the sweep goes on
        if isinstance(e, KeyboardInterrupt):
            raise
        res.status = classify(e)
        res.error = f"{type(e).__name__}: {e}".strip()[:2000]
        if not isinstance(e, Unsupported):
            res.error += "\n" + traceback.format_exc(limit=8)[-3000:]
        if not res.memory:
            res.memory = peak.read()
    finally:
        t0 = time.perf_counter()
        del model
        release_memory(dev)
        res.teardown_s = time.perf_counter() - t0
    return res


def summarise(res: dict, spec: TrialSpec) -> dict:
    """The record fields from an InferenceResult dict: medians and 95% intervals per batch."""
    out: dict = {}
    batches = [str(b) for b in spec.decode_batches]
    pre = {b: res["prefill_times_s"].get(b) or [] for b in batches}
    dec = {b: res["decode_step_times_s"].get(b) or [] for b in batches}
    per_repeat = {b: res["decode_times_s"].get(b) or [] for b in batches}
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
    out["step_cpu_s"] = (res.get("decode_step_cpu_s") or {}).get(first) or []
    return out
