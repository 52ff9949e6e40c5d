"""Per-channel scaling (SmoothQuant, AWQ + clipping) and GPTQ act-order: folding keeps the model's function, the
searches never make the calibration error worse, dead channels stay finite, and the pipeline records the choices."""

from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace

import pytest
import torch

import lowc
from lowc.artifact import open_artifact
from lowc.compress.quant.clip import clip_scales, hessian_grams, input_grams
from lowc.compress.quant.gptq import codes_for_scales, gptq_quantize
from lowc.compress.quant.rtn import quantize_rtn
from lowc.compress.quant.scaling import candidate_scales, fold_scales, scale_groups, scale_model
from lowc.errors import UsageError
from lowc.kernels import reference
from lowc.kernels.reference import dequantize_int
from lowc.models import build_model

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
         "vocab_size": 50, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
         "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "tie_word_embeddings": True}


def _model(seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = build_model(LLAMA)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        # activation outliers in two hidden channels, as real LLMs have
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 40]] *= 20
            layer.post_attention_layernorm.weight[7] *= 20
    return model.eval()


def _schemes(model, bits: int = 4, abits: int | None = None, group: int = 16) -> dict:
    return {n: SimpleNamespace(bits=bits, group=group, abits=abits, vnm=None) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n != "lm_head"}


def _ids(seed: int = 1, samples: int = 4, seqlen: int = 32) -> torch.Tensor:
    return torch.randint(0, LLAMA["vocab_size"], (samples, seqlen), generator=torch.Generator().manual_seed(seed))


def test_groups_cover_every_projection_once():
    groups = scale_groups(_model())["model.layers.0"]
    covered = [n for g in groups for n in g.linears]
    assert sorted(n.rsplit(".", 1)[1] for n in covered) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    vo = next(g for g in groups if g.prev.endswith("v_proj"))
    assert vo.repeat == 2 and vo.block == 16  # 4 query heads share 2 KV heads
    s = torch.arange(1.0, 33.0)
    assert torch.equal(vo.reduce(vo.expand(s)), s) and vo.expand(s).shape == (64,)


def test_folding_random_factors_keeps_the_function():
    model, ids = _model(), _ids()
    with torch.no_grad():
        before = model(ids)
        g = torch.Generator().manual_seed(3)
        for groups in scale_groups(model).values():
            for group in groups:
                channels = model.get_submodule(group.prev).weight.shape[0]
                fold_scales(model, group, torch.exp(torch.randn(channels, generator=g)))
        after = model(ids)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind,abits", [("smooth", 6), ("awq", None)])
def test_search_never_worse_and_keeps_the_function(kind, abits):
    model, ids = _model(), _ids()
    with torch.no_grad():
        before = model(ids)
    result = scale_model(model, ids, kind, _schemes(model, abits=abits), clip=kind == "awq", progress=False)
    summaries, clipped = result.groups, result.clipped
    assert result.online == {}  # Llama folds every group
    assert len(summaries) == 8  # 4 groups x 2 layers
    assert all(s["error_after"] <= s["error_before"] for s in summaries.values())
    # the outliers make scaling worth it somewhere, measurably
    assert sum(s["error_after"] for s in summaries.values()) < 0.9 * sum(s["error_before"] for s in summaries.values())
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, rtol=1e-4, atol=1e-4)
    if kind == "awq":
        assert set(clipped) == set(_schemes(model))
        assert all(s.dtype == torch.float16 and torch.isfinite(s).all() for s in clipped.values())
    else:
        assert clipped == {}


def test_dead_channels_keep_unit_factors_and_nothing_is_nan():
    model, ids = _model(), _ids()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[5] = 0  # channel 5 of q/k/v's input is always exactly zero
            layer.self_attn.q_proj.weight[:, 9] = 0
            layer.self_attn.k_proj.weight[:, 9] = 0
            layer.self_attn.v_proj.weight[:, 9] = 0
    for kind in ("smooth", "awq"):
        scale_model(model, ids, kind, _schemes(model, abits=6), alpha=0.5, progress=False)
        assert all(torch.isfinite(p).all() for p in model.parameters()), kind
    s = candidate_scales("smooth", 0.5, torch.tensor([0.0, 4.0, 1.0]), torch.tensor([0.0, 1.0, 0.5]),
                         torch.tensor([1.0, 1.0, 0.0]))
    assert s.tolist() == [1.0, 2.0, 1.0]
    s = candidate_scales("awq", 0.5, torch.zeros(3), torch.tensor([0.0, 4.0, 1.0]), torch.ones(3))
    assert s[0] == 1.0 and math.isclose(float(s[1] * s[2]), 1.0, rel_tol=1e-6) and s[1] > s[2]


def test_clip_search_never_worse_than_round_to_nearest():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 80, generator=g)
    w[:, 3] *= 8  # a few large weights that stretch their groups' ranges
    x = torch.randn(300, 80, generator=g)
    scales, info = clip_scales(w, input_grams(x, 32), 4, 32)
    assert scales.shape == (24, 3) and scales.dtype == torch.float16
    assert info["error_clipped"] < info["error_rtn"] and info["mean_ratio"] < 1.0
    _, rtn_scales = quantize_rtn(w, 4, 32)
    assert (scales <= rtn_scales).all()  # clipping only ever shrinks a range
    codes = codes_for_scales(w, scales, 4, 32)
    deq = dequantize_int(codes, scales, 8, 32, 80)
    rtn = dequantize_int(*quantize_rtn(w, 4, 32), 8, 32, 80)
    assert (x @ (w - deq).T).norm() < (x @ (w - rtn).T).norm()


def test_act_order_keeps_storage_scales_and_helps_with_skewed_energy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 12, generator=g) @ torch.randn(12, 96, generator=g) + 0.2 * torch.randn(400, 96, generator=g)
    x[:, -8:] *= 12  # the highest-energy channels come last in storage order
    w = torch.randn(32, 96, generator=g)
    h = x.T.double() @ x.double()
    plain, plain_scales = gptq_quantize(w, h, 4, 32)
    ordered, ordered_scales = gptq_quantize(w, h, 4, 32, act_order=True)
    assert torch.equal(plain_scales, ordered_scales)
    codes = codes_for_scales(ordered, ordered_scales, 4, 32)
    torch.testing.assert_close(dequantize_int(codes, ordered_scales, 8, 32, 96), ordered, rtol=0, atol=0)

    def err(new):
        return float((x @ (w - new).T).norm())
    assert err(ordered) < 0.95 * err(plain)


def _logit_errors(checkpoint, artifacts) -> list[float]:
    """Relative logit error of each artifact against the checkpoint on fixed random ids."""
    ids = torch.randint(3, LLAMA["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = lowc.load(checkpoint)(ids)
        return [float((lowc.load(a)(ids) - ref).norm() / ref.norm()) for a in artifacts]


def test_compress_smooth_records_factors_and_beats_plain_a6(tiny_llama, tiny_text, tmp_path):
    common = dict(wbits=8, group=32, abits=8, calib=tiny_text, calib_samples=8, calib_seqlen=32, progress=False)
    smooth = lowc.compress(tiny_llama, tmp_path / "smooth", smooth=True, **common)
    art = open_artifact(smooth)
    assert json.loads((smooth / "config.json").read_text())["quantization_config"]["scaling"] == "smooth"
    groups = art.manifest["metrics"]["scaling"]["groups"]
    assert len(groups) == 8 and all(g["error_after"] <= g["error_before"] for g in groups.values())
    assert art.get("model.layers.0.input_layernorm.weight").dtype == torch.float32  # factors not rounded away
    errors = _logit_errors(tiny_llama, [lowc.compress(tiny_llama, tmp_path / "plain", **common), smooth])
    assert errors[1] < errors[0], errors


def test_compress_awq_w4_beats_round_to_nearest(tiny_llama, tiny_text, tmp_path):
    common = dict(wbits=4, group=32, progress=False)
    awq = lowc.compress(tiny_llama, tmp_path / "awq", method="awq", calib=tiny_text, calib_samples=8, calib_seqlen=32,
                        **common)
    config = json.loads((awq / "config.json").read_text())["quantization_config"]
    assert config["method"] == "awq" and config["scaling"] == "awq"
    assert "clip" in next(iter(open_artifact(awq).manifest["metrics"]["scaling"]["groups"].values()))
    errors = _logit_errors(tiny_llama, [lowc.compress(tiny_llama, tmp_path / "rtn", **common), awq])
    assert errors[1] < errors[0], errors


@pytest.mark.parametrize("bits", [2, 3])
def test_two_and_three_bit_weights_round_trip_through_an_artifact(tiny_llama, tmp_path, bits):
    out = lowc.compress(tiny_llama, tmp_path / f"w{bits}", wbits=bits, group=32, progress=False)
    art = open_artifact(out)
    name = "model.layers.0.mlp.down_proj"
    tensors = art.module_tensors(name)
    w = lowc.load(tiny_llama).get_submodule(name).weight.detach()
    codes, scales = quantize_rtn(w, bits, 32)
    torch.testing.assert_close(tensors["scales"], scales)
    model = lowc.load(out)
    torch.testing.assert_close(model.get_submodule(name).dense_weight(),
                               dequantize_int(codes, scales, 8, 32, w.shape[1]).to(torch.float32))


@pytest.mark.parametrize("options,flag", [
    (dict(wbits=4, act_order=True), "--act-order"),
    (dict(wbits=4, method="rtn", act_order=True, calib="x"), "--act-order"),
    (dict(wbits=4, method="awq", clip=True, calib="x"), "--clip"),
    (dict(wbits=4, method="gptq", clip="yes", calib="x"), "--clip"),
    (dict(method="awq", calib="x"), "--wbits"),
    (dict(wbits=4, method="awq"), "--calib"),
    (dict(wbits=6, smooth=True, calib="x"), "--smooth"),
    (dict(wbits=6, abits=8, smooth=True), "--calib"),
    (dict(wbits=6, abits=8, smooth=True, method="awq", calib="x"), "--smooth"),
    (dict(wbits=6, scale_alpha=0.5), "--scale-alpha"),
    (dict(wbits=6, abits=8, smooth=True, calib="x", scale_alpha=1.5), "--scale-alpha"),
    (dict(wbits=6, abits=8, smooth="yes", calib="x"), "--smooth"),
])
def test_scaling_options_checked(options, flag):
    with pytest.raises(UsageError, match=flag):
        lowc.Recipe(**options)


def test_smooth_on_an_encoder_keeps_factors_online(tmp_path, tiny_text):
    from conftest import make_tiny_bert

    bert = make_tiny_bert(tmp_path / "bert")
    common = dict(wbits=8, group=32, abits=8, calib=tiny_text, calib_samples=4, calib_seqlen=16, progress=False)
    out = lowc.compress(bert, tmp_path / "smooth", smooth=True, **common)
    art = open_artifact(out)
    online = {m for m, s in art.schemes.items() if s.smooth}
    assert online == {f"encoder.layer.{i}.{n}" for i in range(2) for n in
                      ("attention.self.query", "attention.self.key", "attention.self.value", "intermediate.dense",
                       "output.dense")}
    assert not art.schemes["encoder.layer.0.attention.output.dense"].smooth  # v -> o folds into value's rows
    factors = art.get("encoder.layer.0.intermediate.dense.smooth")
    assert factors.dtype == torch.float32 and factors.shape == (64,) and (factors > 0).all()
    assert factors[[5, 17]].min() > factors.median()  # the outlier channels are divided down
    # the search only keeps factors that lower the calibration error of each group (the end-to-end gain on a real
    # encoder, all-MiniLM-L6-v2, is measured in benchmarks/quality_quant.py; a random tiny BERT is too noisy for it)
    groups = art.manifest["metrics"]["scaling"]["groups"]
    assert all(g["error_after"] <= g["error_before"] for g in groups.values())
    assert any(g["error_after"] < 0.9 * g["error_before"] for g in groups.values())
    # stored weights carry the factors: dividing them out gives back the original weights up to INT8 rounding
    original = lowc.load(bert).get_submodule("encoder.layer.0.intermediate.dense").weight
    stored = lowc.load(out).get_submodule("encoder.layer.0.intermediate.dense").dense_weight()
    assert float((stored / factors[None, :] - original).norm() / original.norm()) < 0.02
    # the reference kernel divides by the factors before quantizing: without them the product is wrong
    m = lowc.load(out).get_submodule("encoder.layer.0.intermediate.dense")
    x = torch.randn(3, 64)
    expected = reference.packed_linear(x, m.packed(), m.scheme)
    no_smooth = reference.packed_linear(x, m.packed(), dataclasses.replace(m.scheme, smooth=False))
    assert not torch.allclose(expected, no_smooth, rtol=1e-3, atol=1e-3)


def test_smooth_needs_activation_bits_in_the_manifest():
    from lowc.errors import ArtifactError
    from lowc.scheme import ModuleScheme

    entry = {"shape": [4, 32], "bits": 8, "group": 32, "abits": 8, "smooth": True}
    assert ModuleScheme.from_json("m", entry).expected_tensors()["smooth"] == ((32,), "float32")
    with pytest.raises(ArtifactError, match="smooth"):
        ModuleScheme.from_json("m", {**entry, "abits": None})
    assert "smooth" not in ModuleScheme.from_json("m", {**entry, "smooth": False}).to_json()


def test_scaling_fields_round_trip_through_a_recipe_file(tmp_path):
    r = lowc.Recipe(wbits=4, method="gptq", act_order=True, clip=True, calib="x")
    path = tmp_path / "r.json"
    r.save(path)
    assert lowc.Recipe.from_file(path) == r and r.scaling is None
    assert lowc.Recipe(wbits=4, method="awq", calib="x", scale_alpha=0.5).scaling == "awq"


def test_cli_flags_reach_the_recipe(tiny_llama, tiny_text, tmp_path, capsys):
    from conftest import run_cli

    out = tmp_path / "cli"
    code, _, err = run_cli(["compress", tiny_llama, "-o", out, "--wbits", "6", "--group", "32", "--abits", "8",
                            "--smooth", "--scale-alpha", "0.5", "--calib", tiny_text, "--calib-samples", "4",
                            "--calib-seqlen", "16", "-q"], capsys)
    assert code == 0, err
    manifest = open_artifact(out).manifest
    assert manifest["recipe"]["smooth"] is True and manifest["recipe"]["scale_alpha"] == 0.5
    assert {g["alpha"] for g in manifest["metrics"]["scaling"]["groups"].values()} == {0.5}
    code, _, err = run_cli(["compress", tiny_llama, "-o", tmp_path / "bad", "--wbits", "4", "--act-order"], capsys)
    assert code != 0 and "--act-order" in err and "Traceback" not in err
    code, _, err = run_cli(["compress", tiny_llama, "-o", tmp_path / "clip", "--wbits", "4", "--group", "32",
                            "--method", "gptq", "--clip", "--calib", tiny_text, "--calib-samples", "4",
                            "--calib-seqlen", "16", "-q"], capsys)
    assert code == 0, err
    assert open_artifact(tmp_path / "clip").manifest["recipe"]["clip"] is True


def test_hessian_grams_are_the_inputs_grams():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 70, generator=g)
    torch.testing.assert_close(hessian_grams(x.T.double() @ x.double(), 32), input_grams(x, 32))


def test_gptq_clip_lowers_output_error_when_outliers_stretch_groups():
    """A few large weights stretch their groups' absmax scales; searching the scales on the Hessian gives GPTQ finer
    steps for the rest (on the reference model W4 g128 GPTQ: perplexity 1.0092x dense -> 0.9989x)."""
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(512, 128, generator=g) * (1 + 4 * (torch.rand(128, generator=g) < 0.05))
        w = torch.randn(64, 128, generator=g)
        w.scatter_(1, torch.randint(0, 128, (64, 4), generator=g), 6 * torch.sign(torch.randn(64, 4, generator=g)))
        h = x.T.double() @ x.double()

        def error(clip: bool) -> float:
            deq, scales = gptq_quantize(w, h, 4, 32, clip=clip, act_order=True)
            codes = codes_for_scales(deq, scales, 4, 32)
            assert torch.equal(dequantize_int(codes, scales, 8, 32, 128), deq.float())  # codes x scales, exactly
            return float((x @ (w - deq.float()).T).norm())

        _, rtn_scales = quantize_rtn(w, 4, 32)
        assert (gptq_quantize(w, h, 4, 32, clip=True)[1] <= rtn_scales).all()  # clipping only shrinks a range
        assert error(True) < 0.99 * error(False)
