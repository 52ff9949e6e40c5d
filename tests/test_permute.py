"""V:N:M-aware channel permutation: the search (valid, never worse, better where there is structure) and folding it
into Llama / BERT models without changing what they compute."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from lowc.compress.sparsity.permute import (kept_importance, permute_model, search_input_permutation,
                                            search_output_permutation, search_permutation)
from lowc.compress.sparsity.vnm import VNMSpec, vnm_compress
from lowc.models import build_model

SPEC = VNMSpec(16, 2, 5)

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
         "vocab_size": 50, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
         "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "tie_word_embeddings": True}
BERT = {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 50, "max_position_embeddings": 64,
        "type_vocab_size": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-12}


def _is_perm(p: torch.Tensor, n: int) -> bool:
    return p.dtype == torch.long and p.shape == (n,) and torch.equal(p.sort().values, torch.arange(n))


def _clustered(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """|random| importance whose large columns sit next to each other, so that the identity layout drops some."""
    g = torch.Generator().manual_seed(seed)
    imp = torch.rand(rows, cols, generator=g)
    imp[:, : 2 * SPEC.m] *= 8  # two whole M-groups of large columns: each row keeps only 2 of them per group
    return imp


def test_kept_importance_is_what_the_mask_keeps():
    imp = torch.rand(40, 37)
    st = vnm_compress(imp, SPEC)
    assert kept_importance(imp, SPEC) == pytest.approx(float(st["values"].double().sum()), rel=1e-6)
    assert kept_importance(-imp, SPEC) == pytest.approx(kept_importance(imp, SPEC))


@pytest.mark.parametrize("spec", [SPEC, VNMSpec(16, 2, 8), VNMSpec(32, 2, 4)])
def test_input_search_is_a_valid_permutation_that_helps(spec):
    imp = _clustered(64, 83)
    before = kept_importance(imp, spec)
    p = search_input_permutation([imp], spec)
    assert _is_perm(p, 83)
    assert kept_importance(imp[:, p], spec) > before * 1.01
    # a group of matrices sharing the input axis: the sum is what counts, and never goes down
    other = torch.rand(32, 83)
    p = search_input_permutation([imp, other], spec, seed=3)
    assert _is_perm(p, 83)
    assert (kept_importance(imp[:, p], spec) + kept_importance(other[:, p], spec)
            > before + kept_importance(other, spec))


def test_output_search_groups_similar_rows():
    spec = VNMSpec(16, 2, 8)
    g = torch.Generator().manual_seed(1)
    imp = torch.rand(64, 48, generator=g)
    # four kinds of rows, interleaved so that every V-block mixes them; kind k is large in columns 2k and 2k+1 of
    # every 8-column group, and a block keeps only 4 columns of a group: it cannot serve all four kinds
    kind = torch.arange(64) % 4
    for k in range(4):
        imp.view(64, 6, 8)[kind == k, :, 2 * k:2 * k + 2] += 5
    before = kept_importance(imp, spec)
    p = search_output_permutation([imp], spec)
    assert _is_perm(p, 64)
    assert kept_importance(imp[p], spec) > before * 1.5
    assert kept_importance(imp[p], spec) == pytest.approx(kept_importance(imp[kind.argsort()], spec), rel=1e-3)


def test_joint_search_and_identity_when_nothing_helps():
    down, gate = _clustered(32, 48), torch.rand(48, 32)
    p = search_permutation([down], [gate], SPEC)
    assert _is_perm(p, 48)
    assert (kept_importance(down[:, p], SPEC) + kept_importance(gate[p], SPEC)
            > kept_importance(down, SPEC) + kept_importance(gate, SPEC))
    flat = torch.ones(32, 48)
    assert torch.equal(search_input_permutation([flat], SPEC), torch.arange(48))
    assert torch.equal(search_output_permutation([flat], SPEC), torch.arange(32))
    copy = down.clone()
    search_input_permutation([down], SPEC)
    assert torch.equal(down, copy)  # inputs are not modified


def _randomise(model: nn.Module, seed: int = 0) -> None:
    """Random weights, norms and biases, with large-norm input channels planted next to each other (in the hidden
    stream, the MLP's intermediate channels and inside heads) so that the identity layout prunes some of them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((1 if name.endswith("weight") else 0) + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear):
                m.weight[:, 5:9] *= 6  # an M-group's worth of large input channels (hidden channels 5-8, etc.)
                m.weight[:, 16:19] *= 4


def _magnitude(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().abs().clone() for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n != "lm_head"}


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max() / b.abs().max()) < 1e-5


@pytest.mark.parametrize("tied", [True, False])
def test_llama_function_and_importance_preserved(tied):
    # the untied model also has biases (attention_bias, mlp_bias), which must follow their rows
    extra = {} if tied else {"attention_bias": True, "mlp_bias": True}
    model = build_model({**LLAMA, "tie_word_embeddings": tied, **extra})
    _randomise(model)
    ids = torch.randint(0, 50, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids)
    importance = _magnitude(model)
    report = permute_model(model, importance, SPEC)
    with torch.no_grad():
        assert _close(model(ids), ref)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    # the returned importance is the permuted one: |W| of the permuted weights
    for name, module in model.named_modules():
        if name in importance:
            assert torch.equal(report.importance[name], module.weight.abs()), name
    # every group's own steps only gain; the planted structure is found
    assert report.groups and all(g.gain >= 0 for g in report.groups)
    assert {"residual", "model.layers.0.mlp", "model.layers.1.mlp"} <= set(report.permutations)
    assert report.kept_after > report.kept_before * 1.005
    for layer in ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"):
        before, after = report.layers[layer]
        assert after > before * 1.005
    assert all(_is_perm(p, {"residual": 64}.get(n, 96 if n.endswith("mlp") else 16))
               for n, p in report.permutations.items())
    # q/k rows cannot be permuted under RoPE: said so, per layer
    reasons = dict(report.skipped)
    assert "RoPE" in reasons["model.layers.0.self_attn.q_proj/k_proj"]
    assert report.to_dict()["skipped"] and "->" in report.summary()


def test_strict_mode_never_lowers_a_layer():
    model = build_model(LLAMA)
    _randomise(model, seed=4)
    report = permute_model(model, _magnitude(model), SPEC, strict=True)
    assert all(after >= before * (1 - 1e-9) for before, after in report.layers.values())
    assert report.kept_after > report.kept_before


def test_bert_function_preserved_and_residual_only_on_request():
    model = build_model(BERT)
    _randomise(model, seed=1)
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        ref = model(ids, mask)
    importance = _magnitude(model)
    report = permute_model(model, importance, SPEC)
    with torch.no_grad():
        assert _close(model(ids, mask), ref)
    assert report.output_permutation is None
    assert "returns the residual stream" in dict(report.skipped)["residual"]
    assert "encoder.layer.0.intermediate" in report.permutations
    assert report.kept_after > report.kept_before
    for name, module in model.named_modules():
        if name in importance:
            assert torch.equal(report.importance[name], module.weight.abs()), name

    # with the residual stream permuted too, the output comes out in the reported channel order
    model = build_model(BERT)
    _randomise(model, seed=1)
    report = permute_model(model, _magnitude(model), SPEC, allow_output_permutation=True)
    p = report.output_permutation
    assert p is not None and _is_perm(p, 64) and not torch.equal(p, torch.arange(64))
    with torch.no_grad():
        assert _close(model(ids, mask), ref[..., p])


class _Packed(nn.Module):
    """Stands in for a projection already swapped for a packed-weight module."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.inner = linear

    def forward(self, x):
        return self.inner(x)


def test_unfoldable_groups_are_skipped_with_reasons(caplog):
    model = build_model(LLAMA)
    _randomise(model, seed=2)
    model.model.layers[1].self_attn.o_proj = _Packed(model.model.layers[1].self_attn.o_proj)
    ids = torch.randint(0, 50, (1, 7))
    with torch.no_grad():
        ref = model(ids)
    importance = _magnitude(model)
    importance["model.layers.0.mlp.up_proj"] = importance["model.layers.0.mlp.up_proj"][:, :10]  # wrong shape
    importance["not.a.layer"] = torch.ones(3, 3)
    with caplog.at_level(logging.INFO, logger="lowc.compress"):
        report = permute_model(model, importance, SPEC, iterations=1)
    with torch.no_grad():
        assert _close(model(ids), ref)
    reasons = dict(report.skipped)
    assert "nn.Linear" in reasons["residual"] and "o_proj" in reasons["residual"]
    assert "nn.Linear" in reasons["model.layers.1.self_attn.kv_head0"]
    assert "shape" in reasons["model.layers.0.mlp.up_proj"]
    assert "not a dense nn.Linear" in reasons["not.a.layer"]
    assert "model.layers.0.mlp" in report.permutations  # the rest still ran
    assert any("RoPE" in r.message for r in caplog.records)

    report = permute_model(nn.Linear(4, 4), {}, SPEC)
    assert "no channel permutation rules" in dict(report.skipped)["model"]
