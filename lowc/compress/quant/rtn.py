"""Symmetric round-to-nearest integer quantization, per output channel per group of G input columns."""

from __future__ import annotations

import torch

from ...kernels.packing import SUPPORTED_BITS

SCALE_DTYPE = torch.float16
_FP16_TINY = 2.0**-24


def qmax(bits: int) -> int:
    """Largest code magnitude; the range is symmetric, [-qmax, qmax]."""
    return 2 ** (bits - 1) - 1


def quantize_rtn(weight: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `weight` [R, C] to int8 codes [R, C] and fp16 scales [R, ceil(C/G)].

    Scales are absmax/qmax per group, rounded to fp16 before the codes are computed so that dequantization
    (codes * scale) reproduces exactly what was optimised. All-zero groups get scale 1.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported weight bits {bits} (supported: {', '.join(map(str, SUPPORTED_BITS))})")
    if group < 1:
        raise ValueError(f"group size must be positive, got {group}")
    rows, cols = weight.shape
    groups = -(-cols // group)
    w = torch.nn.functional.pad(weight.float(), (0, groups * group - cols)).reshape(rows, groups, group)
    absmax = w.abs().amax(-1)
    scales = (absmax / qmax(bits)).clamp(min=_FP16_TINY).to(SCALE_DTYPE)
    scales = torch.where(absmax == 0, torch.ones_like(scales), scales)
    codes = torch.round(w / scales.float().unsqueeze(-1)).clamp(-qmax(bits), qmax(bits))
    return codes.reshape(rows, groups * group)[:, :cols].to(torch.int8), scales
