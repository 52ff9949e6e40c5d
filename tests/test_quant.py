"""Round-to-nearest symmetric quantization: error bounds, scale semantics, and the reference dequantizer."""

import pytest
import torch

from lowc.compress.quant.rtn import qmax, quantize_rtn
from lowc.kernels.packing import pack_int
from lowc.kernels.reference import dequantize_int


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("cols,group", [(256, 128), (200, 128), (96, 32)])
def test_rtn_error_within_half_step(bits, cols, group):
    w = torch.randn(33, cols)
    codes, scales = quantize_rtn(w, bits, group)
    assert scales.dtype == torch.float16 and scales.shape == (33, -(-cols // group))
    assert int(codes.abs().max()) <= qmax(bits)
    deq = dequantize_int(pack_int(codes, bits), scales, bits, group, cols)
    step = scales.float().repeat_interleave(group, 1)[:, :cols]
    assert bool(((deq - w).abs() <= step / 2 + 1e-6).all())
    # the group's largest magnitude is representable at full scale
    assert int(codes.abs().amax()) == qmax(bits)


def test_zero_group_gets_unit_scale_and_zero_codes():
    w = torch.zeros(2, 128)
    codes, scales = quantize_rtn(w, 6, 128)
    assert torch.equal(scales, torch.ones_like(scales)) and not codes.any()


def test_more_bits_less_error():
    w = torch.randn(64, 512)
    errs = []
    for bits in (4, 6, 8):
        codes, scales = quantize_rtn(w, bits, 128)
        errs.append(float((dequantize_int(pack_int(codes, bits), scales, bits, 128, 512) - w).norm() / w.norm()))
    assert errs[0] > errs[1] > errs[2]
    assert errs[1] < 0.035  # INT6 g128 on gaussian weights: step absmax/31 with absmax ~3 sigma, ~2.7% error
