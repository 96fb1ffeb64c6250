"""Pruning in the inference scenario: what is zeroed (checked against an independent count and
order), that dense zeros save no bytes, and 2:4 refused on a CPU with the library's reason."""

import math

import pytest
import torch

from llmbench.failures import Unsupported
from llmbench.models import build_config, build_model, initialize_weights
from llmbench import prune


def _tiny():
    model = build_model(build_config("tiny", "llama", 64))
    initialize_weights(model, 0)
    return model.eval()


def _decoder_linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]


@pytest.mark.parametrize("amount", [0.25, 0.5])
def test_magnitude_zeroes_each_layers_smallest_weights(amount):
    model = _tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    prune.magnitude(model, amount)
    after = dict(model.named_parameters())
    names = _decoder_linear_names(model)
    assert len(names) == 7 * model.config.num_hidden_layers  # q, k, v, o, gate, up, down per layer
    for n in names:
        w0, w = before[n + ".weight"], after[n + ".weight"]
        k = round(amount * w0.numel())  # torch.nn.utils.prune's count: round(amount × n)
        zeroed = w == 0
        assert int(zeroed.sum()) == k, n
        assert w0.abs()[zeroed].max() <= w0.abs()[~zeroed].min(), n  # the smallest |w| went first
        assert torch.equal(w[~zeroed], w0[~zeroed])  # the rest untouched
        assert not hasattr(dict(model.named_modules())[n], "weight_orig")  # made permanent: no mask left
    for n in before:  # the LM head, the embeddings and the norms are not pruned
        if not any(n == x + ".weight" for x in names):
            assert torch.equal(before[n], after[n]), n
    total = sum(after[n + ".weight"].numel() for n in names)
    expected = sum(round(amount * after[n + ".weight"].numel()) for n in names) / total
    assert prune.weight_sparsity(model) == pytest.approx(expected)


def test_two_four_is_refused_on_cpu_before_anything_changes_and_its_pattern_keeps_two_of_four():
    from torchao.sparsity import apply_fake_sparsity

    model = _tiny()
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if prune.is_decoder_linear(m, n)}
    with pytest.raises(Unsupported, match="Only CUDA tensors") as info:
        prune.apply(model, "2:4", "none")
    h = model.config.hidden_size
    assert f"2:4 sparsity refused on this machine: model.layers.0.self_attn.q_proj ({h}, {h}) float32 on cpu" in str(info.value)
    assert "\n" not in str(info.value)
    assert all(torch.equal(m.weight, before[n]) for n, m in model.named_modules() if n in before)  # untouched
    apply_fake_sparsity(model, filter_fn=prune.is_decoder_linear)  # the pattern prune.two_four writes on CUDA
    for n, m in model.named_modules():
        if n in before:
            w0, w = before[n].reshape(-1, 4), m.weight.detach().reshape(-1, 4)
            assert ((w == 0).sum(1) == 2).all(), n
            kept = w0.abs().topk(2, dim=1).indices.sort(1).values
            assert torch.equal((w != 0).nonzero()[:, 1].reshape(-1, 2), kept), n


def test_gpt2_conv1d_layers_are_pruned_and_refused_for_two_four():
    """GPT-2's projections are transformers Conv1D, not nn.Linear: magnitude pruning finds them;
    2:4 refuses them by name (their transposed weight is not what torchao converts)."""
    model = build_model(build_config("tiny", "gpt2", 64))
    initialize_weights(model, 0)
    from transformers.pytorch_utils import Conv1D

    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, Conv1D)]
    assert len(convs) == 4 * model.config.n_layer  # c_attn, attn c_proj, c_fc, mlp c_proj
    done, sparsity, _ = prune.apply(model, "magnitude-25", "none")
    n = sum(m.weight.numel() for _, m in convs)
    assert sparsity == pytest.approx(sum(round(0.25 * m.weight.numel()) for _, m in convs) / n)
    assert sum(int((m.weight == 0).sum()) for _, m in convs) == sum(round(0.25 * m.weight.numel()) for _, m in convs)
    assert f"on {len(convs)} decoder linear layers" in done
    with pytest.raises(Unsupported, match="transformers Conv1D"):
        prune.apply(model, "2:4", "none")


def test_old_inference_records_still_render(quant_sweep):
    """Records stored before pruning existed (no prune, weight_sparsity, prune_config keys) render."""
    from llmbench.report.html import render

    recs = list(quant_sweep["records"].values())
    run = {"run_id": "old", "suite": "quant", "label": None, "status": "finished", "env": recs[0]["env"]}
    old = [{k: v for k, v in r.items() if k not in ("prune", "weight_sparsity", "prune_config", "warmup_losses", "warmup_lrs")}
           for r in quant_sweep["records"].values() if r.get("prune", "none") == "none"]
    html = render(run, old)
    assert 'id="quantization"' in html and "int8-wo: weights" in html and 'id="missing"' not in html


def test_pruned_trials_measured_against_the_same_baseline(quant_sweep):
    recs = quant_sweep["records"]
    none, int8 = recs["inf-none"], recs["inf-int8-wo"]
    model = _tiny()
    names = _decoder_linear_names(model)
    shapes = [dict(model.named_modules())[n].weight.numel() for n in names]
    for amount in (25, 50):
        alone, with_int8 = recs[f"inf-magnitude-{amount}-none"], recs[f"inf-magnitude-{amount}-int8-wo"]
        for r in (alone, with_int8):
            assert r["status"] == "ok", r["error"]
            assert r["weight_sparsity"] == pytest.approx(sum(round(amount / 100 * n) for n in shapes) / sum(shapes))
            assert r["eval_batches_sha256"] == none["eval_batches_sha256"] and math.isfinite(r["perplexity"])
            assert any("saves no bytes" in n for n in r["notes"])
        assert alone["weight_bytes"] == none["weight_bytes"]  # dense zeros are stored: nothing saved
        assert with_int8["weight_bytes"] == int8["weight_bytes"]  # int8 saves what it saves, pruned or not
    # zeroing half the weights of a model trained to its floor costs perplexity
    assert recs["inf-magnitude-50-none"]["perplexity"] > none["perplexity"]
    for t in ("inf-2:4-none", "inf-2:4-fp8-dyn"):
        assert recs[t]["status"] == "unsupported" and "2:4 sparsity refused" in recs[t]["error"], recs[t]["error"]


def test_report_states_pruning_with_the_pay_rule(quant_sweep):
    html = next(quant_sweep["out"].glob("report-*.html")).read_text()
    assert "magnitude-50: weights +0%" in html and "kept dense: zeros stored in a dense tensor save no bytes" in html
    assert "magnitude-25+int8-wo: weights" in html and "2:4: unsupported here" in html
    assert "<th class=\"l\">prune</th>" in html and "50.0%" in html


def _inf(quant, prune, wbytes, ppl, tps):
    """An inference record: decode tok/s at batch 1 with a ±2% interval."""
    return {"trial_id": f"inf-{prune}-{quant}", "scenario": "inference", "status": "ok", "error": None, "model": "tiny",
            "family": "llama", "precision": "bf16", "seq_len": 128, "quant": quant, "prune": prune,
            "weight_bytes": wbytes, "weight_bytes_reference": 1000, "weight_sparsity": 0.25 if prune != "none" else None,
            "perplexity": ppl, "prefill_latency_s": 0.01, "eval_batches_sha256": "x",
            "decode_tokens_per_s": {"1": tps}, "decode_tokens_per_s_ci95": {"1": [0.98 * tps, 1.02 * tps]}}


def test_pruning_stacked_on_a_quantization_that_adds_only_error_is_not_recommended():
    from llmbench.report.guidance import quant_statements

    recs = [_inf("none", "none", 1000, 5.000, 400), _inf("int8-wo", "none", 550, 5.001, 300),
            # within the noise of int8-wo's speed, but higher than it (a mean-speed ranking would pick it)
            _inf("int8-wo", "magnitude-25", 550, 5.010, 305)]
    head, *rest = [s["text"] for s in quant_statements(recs)]
    assert head.startswith("For this model and hardware, int8-wo pays for memory")
    both = next(t for t in rest if t.startswith("magnitude-25+int8-wo: "))
    assert "but int8-wo alone pays the same at a lower perplexity (5.0010)" in both
    # faster than int8-wo beyond the intervals: then it is a choice of its own
    recs[2] = _inf("int8-wo", "magnitude-25", 550, 5.010, 360)
    head, *_ = [s["text"] for s in quant_statements(recs)]
    assert head.startswith("For this model and hardware, magnitude-25+int8-wo pays for memory")


def test_prune_values_as_typed_in_set_and_in_a_suite(tmp_path):
    """YAML 1.1 reads an unquoted 2:4 as the base-60 number 124: `--set` takes the text as
    typed; a suite file that writes it unquoted is told to quote it."""
    from llmbench.spec import SpecError, expand, load_suite, parse_override

    assert parse_override("prune=2:4,none") == ("prune", ["2:4", "none"])
    p = tmp_path / "p.yaml"
    p.write_text("name: p\nfixed: {scenario: inference, world_size: 1}\ngrid: {prune: [none, 2:4]}\n")
    with pytest.raises(SpecError, match='YAML read 2:4 as the base-60 number 124: quote it, "2:4"'):
        expand(*load_suite(str(p)), {"model": "tiny"})
    with pytest.raises(SpecError, match=r"prune takes none, magnitude-NN \(NN from 1 to 99"):
        expand(*load_suite("quant"), {"model": "tiny"}, ["prune=magnitude-100"])


def test_set_on_a_suite_of_several_grids_says_why_trials_repeat():
    from llmbench.spec import SpecError, expand, load_suite

    with pytest.raises(SpecError, match=r"repeats a configuration \(inf-2:4-none.*--set applies to each of the suite's 4 grids"):
        expand(*load_suite("quant"), {"model": "tiny"}, ["prune=2:4,magnitude-50"])
