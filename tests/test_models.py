"""The standard LLM: exact parameter counts and FLOPs per token against independent arithmetic."""

import json

import pytest

from llmbench.models import CATALOG, ModelNotFound, build_config, config_from_dict, config_to_dict, flops_per_token, model_stats


def llama_params(V, d, L, ffn, h, kv):
    """Llama parameter count written out by hand: untied embedding + head, per-layer q,k,v,o,
    gate/up/down and two RMSNorms, a final norm (no biases)."""
    head = d // h
    attn = d * d + 2 * d * kv * head + d * d
    mlp = 3 * d * ffn
    return 2 * V * d + L * (attn + mlp + 2 * d) + d


def gpt2_params(V, d, L, T):
    """GPT-2: tied wte, learned wpe, per layer c_attn (3d²+3d), c_proj (d²+d), MLP 4d (8d²+5d), 2 LayerNorms (4d)."""
    layer = (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) + 4 * d
    return V * d + T * d + L * layer + 2 * d


@pytest.mark.parametrize("name", ["tiny", "125m", "1.3b", "7b", "13b", "70b"])
def test_llama_param_counts_match_hand_count(name):
    s = CATALOG[name]
    stats = model_stats(build_config(name))
    assert stats.n_params == llama_params(s.vocab_size, s.hidden_size, s.n_layers, s.intermediate_size, s.n_heads, s.n_kv_heads)
    assert stats.n_embedding_params == s.vocab_size * s.hidden_size  # untied: the input embedding only


def test_published_sizes():
    # Llama-2 papers' nominal sizes: 7B = 6.74B, 13B = 13.0B, 70B = 69.0B parameters.
    assert model_stats(build_config("7b")).n_params == 6_738_415_616
    assert round(model_stats(build_config("70b")).n_params / 1e9, 1) == 69.0
    assert 0.8e6 < model_stats(build_config("tiny")).n_params < 1.2e6


def test_gpt2_family_counts_and_tied_embedding():
    s = CATALOG["tiny"]
    stats = model_stats(build_config("tiny", "gpt2"))
    assert stats.n_params == gpt2_params(s.vocab_size, s.hidden_size, s.n_layers, s.max_seq_len)
    # Tied wte does the LM head's matmul, so it is not an embedding for FLOPs; wpe always is.
    assert stats.n_embedding_params == s.max_seq_len * s.hidden_size


def test_flops_per_token_matches_matmul_count():
    """Count forward matmul FLOPs per token by hand (2 per multiply-add), ×3 for training."""
    name, T = "125m", 2048
    s = CATALOG[name]
    d, L, V, ffn = s.hidden_size, s.n_layers, s.vocab_size, s.intermediate_size
    per_layer = 2 * (4 * d * d) + 2 * (3 * d * ffn)  # q,k,v,o projections + SwiGLU
    attention = 2 * 2 * T * d  # QK^T and AV: T·d multiply-adds each per token
    head = 2 * d * V
    forward = L * (per_layer + attention) + head
    stats = model_stats(build_config(name))
    # PaLM's formula counts norms' parameters in N (negligible); agree to 0.1%.
    assert flops_per_token(stats, T) == pytest.approx(3 * forward, rel=1e-3)


def test_local_model_directory(tmp_path):
    cfg = build_config("tiny")
    cfg.save_pretrained(tmp_path)
    local = build_config(str(tmp_path))
    assert model_stats(local).n_params == model_stats(cfg).n_params


def test_unknown_model_and_dir_without_config(tmp_path):
    with pytest.raises(ModelNotFound, match="unknown model 'nope'"):
        build_config("nope")
    with pytest.raises(ModelNotFound, match="no config.json"):
        build_config(str(tmp_path))


def test_config_roundtrip_rebuilds_same_model():
    cfg = build_config("tiny")
    d = json.loads(json.dumps(config_to_dict(cfg)))
    assert d["model_type"] == "llama"
    assert model_stats(config_from_dict(d)).n_params == model_stats(cfg).n_params
