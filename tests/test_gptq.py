"""GPTQ rounding (dense and on V:N:M kept values) against round-to-nearest, and through the pipeline."""

from __future__ import annotations

import json

import pytest
import torch

import lowc
from lowc.compress.quant.gptq import codes_for_scales, gptq_quantize, group_scales
from lowc.compress.quant.rtn import quantize_rtn
from lowc.compress.sparsity.vnm import VNMSpec, keep_mask, kept_column_index, vnm_mask
from lowc.errors import UsageError
from lowc.kernels.reference import dequantize_int
from lowc.runtime import evaluate


def _problem(seed: int, rows: int = 40, cols: int = 96, tokens: int = 500):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 16, generator=g) @ torch.randn(16, cols, generator=g) + 0.3 * torch.randn(tokens, cols, generator=g)
    x[:, 5] *= 10  # an outlier channel
    return x, torch.randn(rows, cols, generator=g)


def _err(x, w, new):
    return float((x @ (w - new).T).norm() / (x @ w.T).norm())


@pytest.mark.parametrize("bits,group", [(4, 32), (6, 128), (4, 96)])
def test_gptq_beats_rtn_and_is_exactly_representable(bits, group):
    x, w = _problem(bits + group)
    new, scales = gptq_quantize(w, x.T @ x, bits, group)
    codes = codes_for_scales(new, scales, bits, group)
    torch.testing.assert_close(dequantize_int(codes, scales, 8, group, w.shape[1]), new, rtol=0, atol=0)
    rtn_codes, rtn_scales = quantize_rtn(w, bits, group)
    assert torch.equal(scales, rtn_scales)  # static groups: the scales round-to-nearest would pick
    rtn = dequantize_int(rtn_codes, rtn_scales, 8, group, w.shape[1])
    assert _err(x, w, new) < 0.8 * _err(x, w, rtn)


def test_gptq_on_vnm_kept_values_groups_in_storage_order():
    x, w = _problem(7)
    spec = VNMSpec(8, 2, 5)
    columns, positions = vnm_mask(w.abs(), spec)
    kept = kept_column_index(columns, positions, spec)
    keep = keep_mask(kept, tuple(w.shape))
    new, scales = gptq_quantize(w, x.T @ x, 6, 16, keep, kept)
    assert torch.all(new[~keep] == 0)
    values = torch.gather(torch.nn.functional.pad(new, (0, kept.max() + 1 - w.shape[1])), 1, kept)
    assert scales.shape == (w.shape[0], -(-values.shape[1] // 16))
    torch.testing.assert_close(codes_for_scales(values, scales, 6, 16).float() *
                               scales.float().repeat_interleave(16, 1)[:, :values.shape[1]], values, rtol=0, atol=0)
    # pruning + rounding compensated together beats rounding the magnitude-pruned weight
    masked = w * keep
    rtn_scales, smap = group_scales(masked, 6, 16, kept)
    rtn = torch.round(masked / smap).clamp(-31, 31) * smap
    assert _err(x, w, new) < 0.9 * _err(x, w, rtn)


def test_compress_gptq_gets_closer_to_the_dense_model(tiny_llama, tiny_text, tmp_path):
    common = dict(wbits=4, group=32, progress=False)
    rtn = lowc.compress(tiny_llama, tmp_path / "rtn", **common)
    gptq = lowc.compress(tiny_llama, tmp_path / "gptq", method="gptq", calib=tiny_text, calib_samples=8,
                         calib_seqlen=32, **common)
    config = json.loads((gptq / "config.json").read_text())["quantization_config"]
    assert config["method"] == "gptq" and config["act_order"] is False and config["bits"] == 4
    dense = lowc.load(tiny_llama)
    ids = torch.tensor(evaluate.perplexity_ids(dense.tokenizer, evaluate.read_lines(tiny_text), 256)[:256]).view(4, 64)
    with torch.no_grad():
        reference = dense(ids)
        errors = [float((lowc.load(a)(ids) - reference).norm() / reference.norm()) for a in (rtn, gptq)]
    assert errors[1] < 0.8 * errors[0], errors


def test_gptq_needs_bits_and_calibration(tiny_llama, tmp_path):
    with pytest.raises(UsageError, match="--wbits"):
        lowc.compress(tiny_llama, tmp_path / "a", vnm="16:2:5", method="gptq", calib="x.txt", progress=False)
    with pytest.raises(UsageError, match="--calib"):
        lowc.compress(tiny_llama, tmp_path / "b", wbits=4, method="gptq", progress=False)
    with pytest.raises(UsageError, match="--method"):
        lowc.compress(tiny_llama, tmp_path / "c", wbits=4, method="hqq", calib="x.txt", progress=False)
