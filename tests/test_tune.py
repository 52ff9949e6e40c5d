"""--tune-steps (end-to-end tuning of scales, biases and norms with the integer codes fixed): the codes stay those
GPTQ chose, the artifact reproduces what was tuned, the loss on held-out calibration text falls for decoders and
encoders (also with A6 inputs through the straight-through estimator), and nothing changes when nothing can
improve."""

from __future__ import annotations

import pytest
import torch

import lowc
from lowc.artifact import open_artifact
from lowc.compress.calibration import calibration_ids
from lowc.compress.quant.rtn import quantize_rtn
from lowc.compress.quant.tune import TuneConfig, fake_quantize_activations, frozen_copy, tune_quantized
from lowc.errors import UsageError
from lowc.kernels import reference
from lowc.kernels.packing import pack_int
from lowc.scheme import ModuleScheme


def test_fake_quantization_rounds_like_the_kernels_and_passes_gradients():
    x = torch.randn(5, 48, generator=torch.Generator().manual_seed(0)) * 3
    x[:, 7] *= 20
    for bits in (6, 8):
        codes, scale = reference.quantize_activations(x, bits)
        xr = x.clone().requires_grad_(True)
        q = fake_quantize_activations(xr, bits)
        assert torch.equal(q.detach(), codes.float() * scale[:, None])
        q.sum().backward()
        assert torch.equal(xr.grad, torch.ones_like(x))


@pytest.mark.parametrize("options,flag", [
    (dict(tune_steps=10), "--wbits"),
    (dict(wbits=4, tune_steps=10), "--calib"),
    (dict(wbits=4, vnm="16:2:8", calib="x", tune_steps=10), "--vnm"),
    (dict(wbits=4, calib="x", tune_steps=-1), "--tune-steps"),
    (dict(wbits=4, calib="x", tune_steps=True), "--tune-steps"),
    (dict(wbits=4, calib="x", tune_steps=10, tune_lr=0), "--tune-lr"),
    (dict(wbits=4, calib="x", tune_steps=10, tune_lr=1.0), "--tune-lr"),
])
def test_bad_recipes_are_refused(options, flag):
    with pytest.raises(UsageError, match=flag):
        lowc.Recipe(**options)


def _window_kl(path, reference_model, ids) -> float:
    with torch.no_grad():
        out = lowc.load(path)(ids)
    return float(torch.nn.functional.kl_div(torch.log_softmax(out, -1).flatten(0, 1),
                                            torch.log_softmax(reference_model(ids), -1).flatten(0, 1),
                                            log_target=True, reduction="batchmean"))


def _held_out_ids(model, text, train_samples, samples, seqlen):
    """Windows of `text` after the first `train_samples` (which calibration used)."""
    return calibration_ids(model.tokenizer, text, samples + train_samples, seqlen)[train_samples:]


def test_tuning_keeps_the_codes_and_lowers_the_output_error(tiny_llama, tmp_path):
    from conftest import WORDS

    g = torch.Generator().manual_seed(7)
    text = tmp_path / "text.txt"  # enough text for 24 calibration windows and 8 more to check on
    text.write_text("\n".join(" ".join(WORDS[int(j)] for j in torch.randint(0, 30, (12,), generator=g))
                              for _ in range(400)) + "\n")
    common = dict(wbits=3, group=32, method="gptq", calib=text, calib_samples=24, calib_seqlen=32, progress=False)
    plain = lowc.compress(tiny_llama, tmp_path / "plain", **common)
    tuned = lowc.compress(tiny_llama, tmp_path / "tuned", tune_steps=150, tune_lr=1e-2, **common)
    a, b = open_artifact(plain), open_artifact(tuned)
    record = b.manifest["metrics"]["tuning"]
    assert record["kept"] and record["steps"] == 150 and record["modules"] == len(b.schemes)
    assert record["held_out_loss_after"] < 0.85 * record["held_out_loss_before"]  # measured 0.72x
    assert b.manifest["recipe"]["tune_steps"] == 150
    for module in b.schemes:  # integer codes exactly as GPTQ chose them; only the scales moved
        assert torch.equal(a.get(f"{module}.qweight"), b.get(f"{module}.qweight"))
    assert any(not torch.equal(a.get(f"{m}.scales"), b.get(f"{m}.scales")) for m in b.schemes)
    norm = "model.layers.0.input_layernorm.weight"
    assert b.get(norm).dtype == torch.float32 and not torch.equal(a.get(norm).float(), b.get(norm))
    # the artifact computes what was tuned: its error on text it did not train on falls as well
    reference_model = lowc.load(tiny_llama)
    ids = _held_out_ids(reference_model, text, 24, 8, 32)
    assert _window_kl(tuned, reference_model, ids) < 0.85 * _window_kl(plain, reference_model, ids)  # 0.77x


def test_tuning_an_encoder_with_a6_inputs(tmp_path, tiny_text):
    from conftest import make_tiny_bert

    bert = make_tiny_bert(tmp_path / "bert")
    common = dict(wbits=4, group=32, abits=6, rotate=True, method="gptq", calib=tiny_text, calib_samples=16,
                  calib_seqlen=16, progress=False)
    plain = lowc.compress(bert, tmp_path / "plain", **common)
    tuned = lowc.compress(bert, tmp_path / "tuned", tune_steps=60, tune_lr=3e-3, **common)
    record = open_artifact(tuned).manifest["metrics"]["tuning"]
    assert record["kept"] and record["held_out_loss_after"] < 0.8 * record["held_out_loss_before"]
    assert "encoder.layer.0.attention.self.query.bias" in record["other_parameters"]
    assert "encoder.layer.1.output.LayerNorm.weight" in record["other_parameters"]
    # the artifact (A6 through the reference kernel, rotated inputs) is closer to the float encoder on the
    # calibration windows, as the tuning loss said
    reference_model = lowc.load(bert)
    ids = calibration_ids(reference_model.tokenizer, tiny_text, 16, 16)
    with torch.no_grad():
        want = reference_model(ids)
        errors = [float((lowc.load(p)(ids) - want).norm() / want.norm()) for p in (plain, tuned)]
    assert errors[1] < errors[0], errors


def test_nothing_to_gain_keeps_the_starting_parameters(tiny_llama):
    """A student that already equals its teacher has zero loss: the held-out check keeps what it started from."""
    model = lowc.load(tiny_llama)
    name = "model.layers.0.mlp.down_proj"
    linear = model.get_submodule(name)
    scheme = ModuleScheme(name, tuple(linear.weight.shape), None, 4, 32)
    codes, scales = quantize_rtn(linear.weight.detach(), 4, 32)
    linear.weight.data = reference.dequantize_int(pack_int(codes, 4), scales, 4, 32, linear.weight.shape[1])
    teacher = frozen_copy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(3, 40, (6, 16), generator=torch.Generator().manual_seed(0))
    out, record = tune_quantized(model, teacher, ids, {name: scheme}, {name: scales}, TuneConfig(steps=5),
                                 progress=False)
    assert not record["kept"] and record["held_out_loss_before"] == 0
    assert torch.equal(out[name], scales)
    after = dict(model.named_parameters())
    assert set(after) == set(before)
    assert all(torch.equal(before[n], after[n].detach()) for n in before)
    assert all(not p.requires_grad or n in before for n, p in after.items())


def test_cli_flags_reach_the_recipe(tiny_llama, tiny_text, tmp_path, capsys):
    from conftest import run_cli

    code, _, err = run_cli(["compress", tiny_llama, "-o", tmp_path / "cli", "--wbits", "4", "--group", "32",
                            "--calib", tiny_text, "--calib-samples", "4", "--calib-seqlen", "16",
                            "--tune-steps", "3", "--tune-lr", "0.002", "-q"], capsys)
    assert code == 0, err
    recipe = open_artifact(tmp_path / "cli").manifest["recipe"]
    assert recipe["tune_steps"] == 3 and recipe["tune_lr"] == 0.002
    code, _, err = run_cli(["compress", tiny_llama, "-o", tmp_path / "bad", "--wbits", "4", "--tune-steps", "3"],
                           capsys)
    assert code != 0 and "--calib" in err and "Traceback" not in err
