"""The standard LLM: Hugging Face transformers models built from a config, never downloaded.

A catalog of named sizes with published shapes, a builder for a random-init model (or a
local model directory's config), exact parameter counts and the training FLOPs per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FAMILIES = ("llama", "gpt2")


@dataclass(frozen=True)
class ModelShape:
    """One catalog entry: the transformer's shape, and where it was published."""

    name: str
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    vocab_size: int
    max_seq_len: int
    source: str


def _llama_ffn(hidden: int, multiple: int = 256) -> int:
    """Llama's SwiGLU width: 2/3 of 4·d rounded up to a multiple (Touvron et al. 2023, §2.2)."""
    return multiple * math.ceil(int(8 * hidden / 3) / multiple)


# GPT-3 paper (Brown et al. 2020, Table 2.1) shapes for 125M..6.7B; the 1.3B and 2.7B use
# 64-dim heads as OPT (Zhang et al. 2022, Table 1) does. Llama-2 (Touvron et al. 2023,
# Table 1 and the released configs) for 7B, 13B and 70B. "tiny" is ours: ~1M parameters,
# small enough to train in seconds on two CPU ranks.
CATALOG: dict[str, ModelShape] = {
    s.name: s
    for s in [
        ModelShape("tiny", 4, 128, 4, 4, 344, 512, 512, "llmbench (CPU smoke size)"),
        ModelShape("125m", 12, 768, 12, 12, _llama_ffn(768), 32000, 2048, "GPT-3 Small, Brown et al. 2020 Table 2.1"),
        ModelShape("350m", 24, 1024, 16, 16, _llama_ffn(1024), 32000, 2048, "GPT-3 Medium, Brown et al. 2020 Table 2.1"),
        ModelShape("760m", 24, 1536, 16, 16, _llama_ffn(1536), 32000, 2048, "GPT-3 Large, Brown et al. 2020 Table 2.1"),
        ModelShape("1.3b", 24, 2048, 32, 32, _llama_ffn(2048), 32000, 2048, "GPT-3 XL / OPT-1.3B, Zhang et al. 2022 Table 1"),
        ModelShape("2.7b", 32, 2560, 32, 32, _llama_ffn(2560), 32000, 2048, "GPT-3 2.7B / OPT-2.7B, Zhang et al. 2022 Table 1"),
        ModelShape("6.7b", 32, 4096, 32, 32, _llama_ffn(4096), 32000, 2048, "GPT-3 6.7B, Brown et al. 2020 Table 2.1"),
        ModelShape("7b", 32, 4096, 32, 32, 11008, 32000, 4096, "Llama-2-7B config"),
        ModelShape("13b", 40, 5120, 40, 40, 13824, 32000, 4096, "Llama-2-13B config"),
        ModelShape("70b", 80, 8192, 64, 8, 28672, 32000, 4096, "Llama-2-70B config (GQA, 8 KV heads)"),
    ]
}


class ModelNotFound(ValueError):
    """A model name that is neither in the catalog nor a local model directory."""


def is_local_model(model: str) -> bool:
    return Path(model).expanduser().is_dir()


def build_config(model: str, family: str = "llama", seq_len: int | None = None, attn_implementation: str = "sdpa"):
    """The transformers config for a catalog name, or the config of a local model directory."""
    from transformers import AutoConfig, GPT2Config, LlamaConfig

    if is_local_model(model):
        path = Path(model).expanduser()
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"model directory {path} has no config.json")
        cfg = AutoConfig.from_pretrained(str(path))
    elif model in CATALOG:
        s = CATALOG[model]
        max_pos = max(s.max_seq_len, seq_len or 0)
        if family == "llama":
            cfg = LlamaConfig(
                vocab_size=s.vocab_size,
                hidden_size=s.hidden_size,
                intermediate_size=s.intermediate_size,
                num_hidden_layers=s.n_layers,
                num_attention_heads=s.n_heads,
                num_key_value_heads=s.n_kv_heads,
                max_position_embeddings=max_pos,
                tie_word_embeddings=False,
            )
        elif family == "gpt2":
            cfg = GPT2Config(
                vocab_size=s.vocab_size if model == "tiny" else 50257,
                n_embd=s.hidden_size,
                n_layer=s.n_layers,
                n_head=s.n_heads,
                n_inner=4 * s.hidden_size,
                n_positions=max_pos,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                bos_token_id=s.vocab_size - 1 if model == "tiny" else 50256,
                eos_token_id=s.vocab_size - 1 if model == "tiny" else 50256,
            )
        else:
            raise ModelNotFound(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    else:
        raise ModelNotFound(
            f"unknown model {model!r}: not a catalog size ({', '.join(CATALOG)}) nor a local model directory"
        )
    cfg.use_cache = False
    cfg._attn_implementation = attn_implementation
    return cfg


def model_class(config):
    """The causal-LM class for a config, imported now.

    Import it before entering `deepspeed.zero.Init`: that context patches torch.Tensor.__new__,
    and transformers' lazy import of a modeling module inside it fails (torch 2.13's dynamo
    rejects the patched constructor: "Signature mismatch ... tensor_pynew").
    """
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM._model_mapping[type(config)]


def build_model(config, cls=None):
    """A random-init causal LM from a transformers config (no weights are downloaded)."""
    cls = cls or model_class(config)
    return cls._from_config(config, attn_implementation=config._attn_implementation)


@dataclass(frozen=True)
class ModelStats:
    """Exact counts from the built module, and the shape numbers that FLOPs formulas need."""

    n_params: int
    n_embedding_params: int  # token embedding (unless tied to the LM head) + learned positions
    n_layer_params: int  # inside the transformer blocks (what activation checkpointing recomputes)
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    # every distinct parameter's element count, largest first (the planner: ZeRO-3's persistence
    # threshold, the largest tensor a step's temporaries are sized by)
    param_numels: tuple[int, ...] = ()

    @property
    def n_non_embedding_params(self) -> int:
        return self.n_params - self.n_embedding_params


def hidden_size(config) -> int:
    """The model width: `hidden_size` (Llama and most families) or GPT-2's `n_embd`."""
    return getattr(config, "hidden_size", None) or getattr(config, "n_embd")


def intermediate_size(config) -> int:
    """The MLP width: Llama's `intermediate_size`, GPT-2's `n_inner` (None there means 4·width)."""
    return getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden_size(config)


def config_shape(config) -> dict[str, int]:
    """Layers, width, heads and vocabulary from a transformers config of any supported family."""
    n_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer")
    hidden = hidden_size(config)
    n_heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head")
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or hidden // n_heads
    return dict(n_layers=n_layers, hidden_size=hidden, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
                vocab_size=config.vocab_size)


def model_stats(config) -> ModelStats:
    """Count parameters exactly by building the model on the meta device (no memory used)."""
    import torch

    with torch.device("meta"):
        model = build_model(config)
    numels = tuple(sorted((p.numel() for p in model.parameters()), reverse=True))  # parameters() de-duplicates tied weights
    n_params = sum(numels)
    emb = model.get_input_embeddings()
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is emb.weight
    n_emb = 0 if tied else emb.weight.numel()
    shape = config_shape(config)
    n_layer_params = 0
    for name, mod in model.named_modules():
        if name.endswith("wpe"):  # GPT-2's learned position embeddings always count as embedding
            n_emb += mod.weight.numel()
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == shape["n_layers"] and not n_layer_params:
            n_layer_params = sum(p.numel() for p in mod.parameters())
    return ModelStats(n_params=n_params, n_embedding_params=n_emb, n_layer_params=n_layer_params, param_numels=numels, **shape)


def flops_per_token(stats: ModelStats, seq_len: int) -> float:
    """Training FLOPs per token: 6·N + 12·L·H·Q·T.

    N is the parameter count without embeddings (the token embedding unless it is tied to the
    output layer, where it does the LM head's matmul; learned position embeddings always), L
    layers, H heads, Q head dim, T sequence length. 6·N is forward (2) + backward (4) of every
    weight matmul; 12·L·H·Q·T the attention score and value matmuls, forward and backward.
    Sources: PaLM (Chowdhery et al. 2022) appendix B; nanoGPT `estimate_mfu`; torchtitan
    `get_num_flop_per_token`.
    """
    return 6 * stats.n_non_embedding_params + 12 * stats.n_layers * stats.n_heads * stats.head_dim * seq_len


def config_to_dict(config) -> dict[str, Any]:
    d = config.to_dict()
    d["model_type"] = config.model_type
    return d


def config_from_dict(d: dict[str, Any]):
    """Rebuild a transformers config from a stored record's `model_config`."""
    from transformers import AutoConfig

    d = dict(d)
    return AutoConfig.for_model(d.pop("model_type"), **d)


def initialize_weights(model, seed: int) -> None:
    """Re-initialise every weight the same way whatever the ZeRO stage, module by module.

    Built inside `deepspeed.zero.Init`, a module's parameters are partitioned as soon as it
    is constructed, so transformers' own init (run after construction) touches empty
    tensors and the model keeps PyTorch's default init: ZeRO-3 would train a different
    model (seen here: first loss 6.48 vs 6.25 for the same seed). Here each module's own
    parameters are gathered (only that module's, so the whole model never materialises on a
    rank), seeded from (seed, module index) and initialised with the model's `_init_weights`.
    Stages 0-2 run the same code, so every stage starts from identical weights.
    """
    import contextlib

    import deepspeed
    import torch

    for index, module in enumerate(model.modules()):
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        zero3 = hasattr(own[0], "ds_id")
        ctx = deepspeed.zero.GatheredParameters(own, modifier_rank=0) if zero3 else contextlib.nullcontext()
        with ctx, torch.no_grad():
            for p in own:
                if hasattr(p, "_is_hf_initialized"):
                    p._is_hf_initialized = False
            torch.manual_seed(seed * 1_000_003 + index)
            model._init_weights(module)
