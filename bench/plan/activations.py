"""Activation bytes a training step saves for backward, derived op by op for the models llmbench runs.

Korthikanti et al. 2022 (arXiv 2205.05198, §4.1) count what a GPT layer saves: sbh(34 + 5as/h)
bytes with 2-byte activations (s sequence, b micro-batch, h width, a heads), the 5as/h term
being the s×s attention scores, softmax output and dropout mask. The modules llmbench runs are
not that GPT: Hugging Face's Llama upcasts RMSNorm to fp32 and has a SwiGLU MLP and rotary
embeddings; its GPT-2 computes `gelu_new` from five elementwise ops; SDPA (flash or memory
efficient) saves no scores but a logsumexp; the loss upcasts the logits to fp32. So each term
below is what autograd saves for backward in the ops these modules call (each storage once,
parameters excluded), written from the ops' backward formulas (torch/csrc/autograd/
derivatives.yaml) and the modules' forward code in transformers 5:

- a linear layer saves its input (its weight is a parameter); q/k/v (and gate/up) share one input;
- RMSNorm (LlamaRMSNorm): `x.to(fp32)` (4 bytes/element; in fp32 it is x itself), rsqrt of the
  variance (4 bytes per token), x·rsqrt (mul saves its inputs; in bf16 the product's
  `.to(bf16)` is saved again by `weight *`) and the normed output (the next linear's input):
  (4 + 2p)·bsh + 4bs;
- LayerNorm (GPT-2): its input, mean and rstd (the input's dtype on the CPU, fp32 on CUDA);
- rotary embeddings: q·cos + rotate_half(q)·sin saves only cos and sin (they need no gradient),
  once for the whole model (shape 1 × s × head_dim);
- SDPA (flash / memory-efficient): q, k, v (k and v at the KV heads: GQA is passed through),
  the output and a logsumexp of b·heads·s fp32; the output projection reads the output's storage;
- eager attention: the score matmul's operands, the softmax output (fp32 in Llama, which upcasts,
  then its bf16 copy; the input dtype in GPT-2), the value matmul's operands (k, v repeated to
  all heads) and the contiguous output: b·heads·s² scores, the term SDPA removes;
- SwiGLU: silu saves its input (gate), the product saves silu(gate) and up, down_proj its input:
  4p·bsf; GPT-2's `gelu_new` = 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))) saves x, tanh, 1 + tanh
  and 0.5·x, and c_proj its output: 5p·bsf (`gelu`/`gelu_pytorch_tanh`, one op: 2p·bsf);
- the loss: HF's ForCausalLMLoss casts the logits to fp32 and log_softmax saves its fp32 output
  (4·bsV); nll_loss saves the int64 targets; the embedding saves the int64 token ids (GPT-2 also
  its position ids);
- full activation checkpointing (non-reentrant, Hugging Face's `gradient_checkpointing_enable`):
  inside a checkpointed layer torch's own saved-tensor hooks replace what is saved, so a layer
  keeps only its input (p·bsh; seen by an outer hook in torch 2.13); cos/sin are passed as
  keyword arguments and kept by the recompute closure, not saved; GPT-2 passes its eager
  attention mask (b × 1 × s × s, activation dtype) positionally, so checkpointing saves it once.

Not saved, but held (`kwargs_held`): under checkpointing Llama's layers get cos/sin and, with
eager attention, its 4-D float mask (b × 1 × s × s) as keyword arguments, which the recompute
closures keep alive until the last layer's backward (measured: 3.52 MiB held after the forward
at b = 8, s = 480 in bf16, beside the hook-counted bytes).

A checkpointed layer's backward (`layer_backward`): the first unpack recomputes the whole
layer, so its backward starts with all of its saved tensors beside the incoming gradient, and
the MLP's backward adds two bsf gradients at the product's (or gelu_new's) backward, while
down_proj's saved input is freed for the gradient that replaces it: per_layer + 2p·bsf + p·bsh.
Measured with the counting allocator, one layer's backward above what was held: Llama SDPA
bf16 b = 8, s = 480: 26.54 MiB (27.39 derived); GPT-2 eager fp32 b = 2, s = 320: 14.32 (14.70);
Llama SDPA fp32 b = 2, s = 192: 4.89 (4.91). In fp32 Llama's input norm saves the layer's input
itself (`x.to(fp32)` is no copy), which the checkpoint holds already: counted once.

Eager attention's backward (`attention_backward`): the layer's backward peaks in its softmax's
backward, `_softmax_backward_data(grad, out)`, which allocates its result while the saved
softmax output and the incoming gradient (in the softmax's dtype: Llama's `.to(bf16)` backward
casts the probabilities' gradient up to fp32) are alive: 3·soft·b·heads·s² bytes, beside what
the layer still holds for the backward to come (the input norm's saved tensors, q and k; GPT-2's
q, k, v are views of c_attn's one output, alive whole) and the gradients waiting (v's, the
residual stream's). By then the MLP's, the output projection's and the probabilities' saved
tensors are freed (autograd frees a node's saved tensors after it runs). Measured with the
counting allocator, one layer's backward (tiny, bf16, b = 8, checkpointed): Llama s = 480
91.24 MiB above what was held (91.89 derived), GPT-2 fp32 b = 2, s = 640: 40.58 (41.88). On CUDA
in fp16 Llama's softmax takes the half-to-float path and its backward's result is fp16
(10 bytes per score, not 12): over-counted there, not modelled.

Dropout with p = 0 (llmbench's GPT-2 and Llama) saves nothing. Every term is tested against the
bytes `torch.autograd.graph.saved_tensors_hooks` sees (collect/activations.py) on shapes held
out from the derivation (tests/test_plan_memory.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

ACT_SAVES = {"gelu_new": 5, "gelu_fast": 5, "gelu": 2, "gelu_pytorch_tanh": 2, "relu": 2, "silu": 2}


@dataclass(frozen=True)
class Shape:
    """What the derivation needs of a model: its family and dimensions."""

    family: str  # "llama" or "gpt2"
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    activation: str = "silu"  # GPT-2's activation_function
    dropout: float = 0.0  # the largest dropout probability of the config


def shape_of(config) -> Shape:
    """A Shape from a transformers config (Llama-like or GPT-2)."""
    from ..models import config_shape, intermediate_size

    s = config_shape(config)
    gpt2 = config.model_type == "gpt2"
    drops = [getattr(config, k, 0.0) or 0.0 for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout",
                                                        "hidden_dropout", "mlp_dropout")]
    return Shape("gpt2" if gpt2 else "llama", s["n_layers"], s["hidden_size"], s["n_heads"], s["n_kv_heads"],
                 s["head_dim"], intermediate_size(config), s["vocab_size"],
                 getattr(config, "activation_function", "gelu_new") if gpt2 else getattr(config, "hidden_act", "silu"),
                 max(drops))


@dataclass
class Activations:
    """Bytes saved for backward by one micro-batch's forward, by where they are saved."""

    layers: float = 0.0  # all decoder layers (with checkpointing: their inputs)
    per_layer: float = 0.0  # one layer without checkpointing (what its recompute re-saves)
    attention_scores: float = 0.0  # of per_layer: the s² terms (eager attention only)
    embedding: float = 0.0  # token (and position) ids, rotary cos/sin
    head: float = 0.0  # the final norm and the LM head's input
    loss: float = 0.0  # fp32 log-softmax of the logits, targets
    logits_transient: float = 0.0  # not saved: the logits' peak while the loss forward/backward runs
    kwargs_held: float = 0.0  # not saved: checkpointed layers' keyword arguments, held until backward ends
    layer_backward: float = 0.0  # checkpointing: one layer recomputed, at its MLP's backward
    attention_backward: float = 0.0  # eager attention: one layer's working set at its softmax backward (its own saved tensors included)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.layers + self.embedding + self.head + self.loss


def _norm_bytes(family: str, p: int, b: int, s: int, h: int, device: str) -> float:
    if family == "llama":
        return (4 + 2 * p) * b * s * h + 4 * b * s
    m = 4 if device == "cuda" else p  # LayerNorm mean/rstd: the accumulation type on CUDA, the input's on CPU
    return p * b * s * h + 2 * m * b * s


def activation_bytes(shape: Shape, micro_batch: int, seq_len: int, dtype_bytes: int, attn: str = "sdpa",
                     checkpointing: bool = False, device: str = "cpu") -> Activations:
    """Bytes one micro-batch saves for backward (see the module docstring for each term)."""
    b, s, p = micro_batch, seq_len, dtype_bytes
    h, f, nh, d = shape.hidden, shape.intermediate, shape.n_heads, shape.head_dim
    q, kv = nh * d, shape.n_kv_heads * d
    bs = b * s
    out = Activations()
    norm = _norm_bytes(shape.family, p, b, s, h, device)
    if attn == "eager":
        # q, k and v (repeated to all heads) as the matmuls' operands, the contiguous output
        attention = p * bs * (2 * q + 2 * nh * d)
        soft = 4 if shape.family == "llama" else p  # Llama's softmax runs in fp32, GPT-2's in the input dtype
        scores = soft * b * nh * s * s + (p if shape.family == "llama" and p != 4 else 0) * b * nh * s * s
        out.attention_scores = scores
        attention += scores
        # at the softmax's backward: its output, the incoming gradient and the result (soft
        # bytes each), the input norm's saved tensors, q and k (GPT-2: c_attn's whole output,
        # of which they are views, and its input), the gradients of v and of the residual stream
        held = norm + (p * bs * (q + nh * d) if shape.family == "llama" else p * bs * h + 3 * p * bs * h)
        out.attention_backward = 3 * soft * b * nh * s * s + held + p * bs * (nh * d + h)
    else:  # sdpa / flash_attention_2: q, k, v, output, fp32 logsumexp
        attention = p * bs * (2 * q + 2 * kv) + 4 * b * nh * s
    if shape.family == "llama":
        layer = 2 * norm + attention + 4 * p * bs * f
        out.embedding = 8 * bs + 2 * s * d * p  # token ids; rotary cos and sin (1 × s × head_dim each)
        out.head = norm
    else:
        c_attn_in = p * bs * h
        if attn != "eager":
            # q, k, v are views of c_attn's one output (3h wide), saved once; the output is c_proj's input
            attention = p * bs * 3 * h + 4 * b * nh * s + p * bs * q
        layer = 2 * norm + 2 * c_attn_in + attention + ACT_SAVES.get(shape.activation, 5) * p * bs * f
        out.embedding = 8 * bs + 8 * s  # token ids; position ids (1 × s)
        out.head = norm + p * bs * h  # ln_f and the LM head's input
    if shape.dropout > 0:
        out.notes.append(f"dropout p={shape.dropout:g} masks are not modelled (llmbench's configs use 0)")
    out.per_layer = layer
    # a recomputed layer's backward starts in its MLP: every saved tensor of the layer, the
    # incoming gradient (p·bsh), and at the product's (SwiGLU) or gelu_new's backward two
    # gradients of bsf beside the one coming in, after down_proj/c_proj freed its saved input
    out.layer_backward = layer + 2 * p * bs * f + p * bs * h
    if checkpointing:
        out.layers = shape.n_layers * p * bs * h
        if shape.family == "llama":
            out.embedding -= 2 * s * d * p  # cos/sin go to the layers as keyword arguments: not saved
            if p == 4:
                # in fp32 the input norm's `x.to(fp32)` is the layer's input itself, which the
                # checkpoint already holds: not twice in a recomputed layer's working set
                out.layer_backward -= p * bs * h
                if out.attention_backward:
                    out.attention_backward -= p * bs * h
            out.kwargs_held = 2 * s * d * p + (p * b * s * s if attn == "eager" else 0)  # ... but held, as is eager's mask
        elif attn == "eager":
            out.embedding += p * b * s * s  # GPT-2 passes eager's b × 1 × s × s mask positionally: checkpoint saves it
    else:
        out.layers = shape.n_layers * layer
    v = shape.vocab
    out.loss = 4 * bs * v + 8 * bs + 4  # fp32 log-softmax output; int64 targets; the loss's total weight
    # While the loss runs: forward holds the p-byte logits and their fp32 copy beside the saved
    # log-softmax; backward holds the fp32 gradient of the log-softmax output and of its input.
    out.logits_transient = max(p * bs * v + (4 * bs * v if p != 4 else 0), 8 * bs * v)
    return out
