"""--rotate (block Hadamard rotation of the quantized Linears' inputs): the rotation is exact and orthogonal, the
artifact stores W R and the runtime rotates x, so an unquantized-looking product stays the model's function; on a
model with outlier channels it beats plain A6; bad recipes and manifests are refused."""

from __future__ import annotations

import json

import pytest
import torch

import lowc
from lowc.artifact import open_artifact
from lowc.errors import ArtifactError, UsageError
from lowc.kernels import hadamard, reference
from lowc.runtime.fused_linear import fusable_schemes
from lowc.scheme import ModuleScheme


@pytest.mark.parametrize("block", [2, 4, 16, 64, 128])
def test_rotated_product_equals_the_plain_one(block):
    g = torch.Generator().manual_seed(block)
    x, w = torch.randn(6, 256, generator=g, dtype=torch.float64), torch.randn(9, 256, generator=g, dtype=torch.float64)
    y = hadamard.rotate_inputs(x, block) @ hadamard.rotate_weight(w, block).double().T
    torch.testing.assert_close(y, x @ w.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hadamard.unrotate_weight(hadamard.rotate_weight(w, block), block).double(), w,
                               rtol=1e-5, atol=1e-5)
    # orthogonal up to the power-of-two factor c1^2 * b (so |x R| stays about |x|)
    r = hadamard.rotate_inputs(torch.eye(block, dtype=torch.float64), block)
    scale = hadamard.input_factor(block) ** 2 * block
    torch.testing.assert_close(r @ r.T, scale * torch.eye(block, dtype=torch.float64))
    assert 0.5 <= scale <= 1


def test_input_side_matrix_is_exact_in_16_bit():
    for block in (16, 32, 64, 128):
        r = hadamard.rotate_inputs(torch.eye(block), block)
        for dtype in (torch.bfloat16, torch.float16):
            assert torch.equal(r.to(dtype).float(), r)
            assert torch.equal(hadamard.rotate_inputs(torch.eye(block, dtype=dtype), block).float(), r)


def test_rotation_spreads_an_outlier_channel():
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    x[:, 7] *= 50
    ratio = lambda t: float((t.abs().amax(-1) / t.pow(2).mean(-1).sqrt()).mean())  # noqa: E731
    assert ratio(hadamard.rotate_inputs(x, 128)) < 0.3 * ratio(x)


def test_rotation_block_choice():
    assert [hadamard.rotation_block(k) for k in (384, 4096, 11008, 96, 48, 24, 1000)] == [128, 128, 128, 32, 16,
                                                                                         None, None]
    assert hadamard.rotation_block(4096, limit=64) == 64
    for bad in (3, 0, 48, True):
        with pytest.raises(ValueError):
            hadamard.check_block(bad, 96)


@pytest.mark.parametrize("options,flag", [
    (dict(rotate=True), "--wbits"),
    (dict(wbits=4, rotate="yes"), "--rotate"),
    (dict(wbits=4, vnm="64:2:5", rotate=True), "--vnm"),
    (dict(wbits=6, abits=8, smooth=True, calib="x", rotate=True), "--smooth"),
    (dict(wbits=4, method="awq", calib="x", rotate=True), "--method awq"),
])
def test_bad_recipes_are_refused(options, flag):
    with pytest.raises(UsageError, match=flag):
        lowc.Recipe(**options)


def test_manifest_entry_is_checked_and_round_trips():
    entry = {"shape": [8, 96], "bits": 4, "group": 32, "rotate": 32}
    scheme = ModuleScheme.from_json("m", entry)
    assert scheme.rotate == 32 and scheme.to_json()["rotate"] == 32 and "Hadamard 32" in scheme.label()
    assert "rotate" not in ModuleScheme.from_json("m", {**entry, "rotate": None}).to_json()
    assert scheme.expected_tensors() == ModuleScheme.from_json("m", {**entry, "rotate": None}).expected_tensors()
    for bad in ({"rotate": 64}, {"rotate": 24}, {"rotate": True}, {"bits": None, "vnm": "16:2:8"},
                {"abits": 8, "smooth": True}):
        with pytest.raises(ArtifactError, match="rotate"):
            ModuleScheme.from_json("m", {**entry, **bad})


def test_fused_projections_need_the_same_rotation():
    a = ModuleScheme("a", (8, 96), None, 4, 32, rotate=32)
    b = ModuleScheme("b", (8, 96), None, 4, 32, rotate=None)
    assert fusable_schemes([a, a]) and not fusable_schemes([a, b])


def _logits(path, ids):
    with torch.no_grad():
        return lowc.load(path)(ids)


def test_round_to_nearest_artifact_stores_rotated_weights(tiny_llama, tmp_path):
    out = lowc.compress(tiny_llama, tmp_path / "rot", wbits=8, group=32, rotate=True, progress=False)
    art = open_artifact(out)
    assert all(s.rotate == hadamard.rotation_block(s.shape[1]) for s in art.schemes.values())
    assert json.loads((out / "config.json").read_text())["quantization_config"]["rotation"] == "hadamard"
    record = art.manifest["metrics"]["rotation"]
    assert record["not_rotated"] == [] and set(record["blocks"]) == set(art.schemes)
    name = "model.layers.0.mlp.down_proj"
    original = lowc.load(tiny_llama).get_submodule(name).weight.detach().float()
    module = lowc.load(out).get_submodule(name)
    stored = module.dense_weight()
    assert float((hadamard.unrotate_weight(stored, module.scheme.rotate) - original).norm() / original.norm()) < 0.01
    # the module rotates its inputs: the product is the original layer's, up to INT8 rounding
    x = torch.randn(4, original.shape[1], generator=torch.Generator().manual_seed(2))
    want = x @ original.T
    assert float((module(x) - want).norm() / want.norm()) < 0.01
    assert float((x @ stored.T - want).norm() / want.norm()) > 0.5  # without the input rotation it is wrong
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(3))
    ref = _logits(tiny_llama, ids)
    assert float((_logits(out, ids) - ref).norm() / ref.norm()) < 0.02


def test_rotation_beats_plain_a6_on_outlier_channels(tiny_llama, tiny_text, tmp_path):
    """GPTQ + A6 on a checkpoint whose norms make a few hidden channels 30x larger, as trained LLMs have:
    rotating spreads them before per-token quantization."""
    from lowc.checkpoint import Checkpoint, write_checkpoint

    ckpt = Checkpoint(tiny_llama)
    state = {n: ckpt.get(n) for n in ckpt.keys()}
    for n in state:
        if n.endswith("input_layernorm.weight") or n.endswith("post_attention_layernorm.weight"):
            state[n] = state[n].clone()
            state[n][[3, 17]] *= 30
    source = tmp_path / "outliers"
    write_checkpoint(source, ckpt.config, state)
    for f in ckpt.tokenizer_files():
        (source / f.name).write_bytes(f.read_bytes())
    common = dict(wbits=6, group=32, abits=6, method="gptq", act_order=True, calib=tiny_text, calib_samples=8,
                  calib_seqlen=32, progress=False)
    plain = lowc.compress(source, tmp_path / "plain", **common)
    rotated = lowc.compress(source, tmp_path / "rotated", rotate=True, **common)
    ids = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(5))
    ref = _logits(source, ids)
    errors = [float((_logits(a, ids) - ref).norm() / ref.norm()) for a in (plain, rotated)]
    assert errors[1] < 0.7 * errors[0], errors


def test_reference_kernel_rotates_before_quantizing():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 64, generator=g)
    scheme = ModuleScheme("m", (8, 64), None, 8, 64, abits=8, rotate=64)
    from lowc.compress.pipeline import compress_module

    tensors = compress_module(hadamard.rotate_weight(w, 64), scheme)
    x = torch.randn(3, 64, generator=g)
    x[:, 5] *= 40
    got = reference.packed_linear(x, tensors, scheme)
    want = x @ w.T
    assert float((got - want).norm() / want.norm()) < 0.02


def test_cli_flag_reaches_the_recipe(tiny_llama, tmp_path, capsys):
    from conftest import run_cli

    code, _, err = run_cli(["compress", tiny_llama, "-o", tmp_path / "cli", "--wbits", "4", "--group", "32",
                            "--rotate", "-q"], capsys)
    assert code == 0, err
    assert open_artifact(tmp_path / "cli").manifest["recipe"]["rotate"] is True
    code, _, err = run_cli(["compress", tiny_llama, "-o", tmp_path / "bad", "--vnm", "16:2:8", "--wbits", "4",
                            "--rotate"], capsys)
    assert code != 0 and "--rotate" in err and "Traceback" not in err


def test_rotation_matrix_first_built_under_inference_mode_still_trains():
    """The cached matrix is shared: evaluation (inference_mode) may build it before tuning trains through it."""
    hadamard._matrix.cache_clear()
    with torch.inference_mode():
        hadamard.rotate_inputs(torch.randn(2, 64), 64)
    x = torch.randn(2, 64, requires_grad=True)
    hadamard.rotate_inputs(x, 64).pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
