"""Per-token A8/A6 activation quantization in the reference kernel, the scheme, and FlexQ's A8 choice."""

from __future__ import annotations

import pytest
import torch

import lowc
from lowc.artifact import open_artifact
from lowc.compress.pipeline import compress_module
from lowc.compress.quant.flexq import choose_a8
from lowc.errors import ArtifactError, UsageError
from lowc.kernels.reference import dense_weight, packed_linear, quantize_activations
from lowc.scheme import ModuleScheme


@pytest.mark.parametrize("bits", [6, 8])
def test_quantize_activations_per_token(bits):
    x = torch.randn(5, 7, 33) * torch.rand(5, 7, 1) * 10
    x[0, 0] = 0
    codes, scale = quantize_activations(x, bits)
    qmax = 2 ** (bits - 1) - 1
    assert codes.dtype == torch.int8 and int(codes.abs().max()) == qmax and scale.shape == (5, 7)
    assert scale[0, 0] == 1 and torch.all(codes[0, 0] == 0)
    err = (codes.float() * scale[..., None] - x).abs()
    assert torch.all(err <= scale[..., None] / 2 * (1 + 1e-6))
    half = torch.tensor([[0.5, -0.5, 1.5, -2.5, float(qmax)]])  # ties round away from zero, as the kernels do
    assert quantize_activations(half, bits)[0].tolist() == [[1, -1, 2, -3, qmax]]


def test_packed_linear_with_activation_bits_matches_integer_emulation():
    w, x = torch.randn(24, 40), torch.randn(3, 9, 40)
    errors = {}
    for abits in (None, 8, 6):
        scheme = ModuleScheme("m", (24, 40), bits=6, group=16, abits=abits)
        tensors = compress_module(w, scheme)
        y = packed_linear(x, tensors, scheme)
        wq = dense_weight(tensors, scheme).double()
        if abits is None:
            expected = x.double() @ wq.T
        else:
            codes, scale = quantize_activations(x, abits)
            expected = (codes.double() @ wq.T) * scale.double()[..., None]
        torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
        errors[abits] = float((y - x @ w.T).norm() / (x @ w.T).norm())
    assert errors[None] < errors[8] < errors[6] < 0.1


def test_scheme_records_activation_bits():
    s = ModuleScheme("m", (8, 16), bits=4, group=16, abits=6)
    assert s.label() == "W4A6 g16" and ModuleScheme.from_json("m", s.to_json()) == s
    with pytest.raises(ArtifactError, match="abits"):
        ModuleScheme.from_json("m", {"shape": [8, 16], "bits": 4, "abits": 4})
    with pytest.raises(ArtifactError, match="abits"):
        ModuleScheme.from_json("m", {"shape": [8, 16], "vnm": "16:2:5", "abits": 8})


def test_choose_a8_most_sensitive_first_within_budget():
    sens = {"a": {6: 0.10, 8: 0.01}, "b": {6: 0.30, 8: 0.02}, "c": {6: 0.20, 8: 0.02}, "d": {6: 0.05, 8: 0.01}}
    flops = {"a": 10, "b": 50, "c": 30, "d": 10}
    assert choose_a8(sens, flops, 0.5) == ["b"]  # b alone fills the 50 FLOPs allowed
    assert choose_a8(sens, flops, 0.7) == ["b", "a", "d"]
    assert choose_a8(sens, flops, 0.0) == []


def test_compress_a6_with_a8_budget(tiny_llama, tiny_text, tmp_path):
    out = lowc.compress(tiny_llama, tmp_path / "a6", wbits=6, group=32, abits=6, a8_budget=0.3, calib=tiny_text,
                        calib_samples=8, calib_seqlen=32, progress=False)
    art = open_artifact(out)
    choice = art.manifest["metrics"]["activation_bits"]
    a8 = {m for m, s in art.schemes.items() if s.abits == 8}
    assert a8 == set(choice["a8"]) and a8 and 0 < choice["a8_flops_fraction"] <= 0.3
    assert {s.abits for s in art.schemes.values()} == {6, 8} and len(choice["sensitivity"]) == 14
    assert all(v["a6"] > v["a8"] for v in choice["sensitivity"].values())
    model = lowc.load(out)
    ids = torch.randint(0, 60, (2, 16))
    reference = lowc.load(lowc.compress(tiny_llama, tmp_path / "a16", wbits=6, group=32, progress=False))
    with torch.no_grad():
        assert not torch.equal(model(ids), reference(ids))


@pytest.mark.parametrize("options,flag", [(dict(abits=8), "--wbits"), (dict(wbits=6, abits=4), "--abits"),
                                          (dict(wbits=6, abits=8, a8_budget=0.3, calib="x"), "--a8-budget"),
                                          (dict(wbits=6, abits=6, a8_budget=0.3), "--calib"),
                                          (dict(wbits=6, abits=6, a8_budget=1.5, calib="x"), "--a8-budget")])
def test_activation_options_checked(options, flag):
    with pytest.raises(UsageError, match=flag):
        lowc.Recipe(**options)
