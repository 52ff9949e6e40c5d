"""Fuse projections that read the same input (q/k/v, gate/up) into one module: one GEMM launch instead of two or
three, and one weight stream wide enough to keep every SM busy during decode.

The fused module owns the concatenated weight; the original modules stay in the model, their weights re-pointed
at their rows of it, so nothing is stored twice and `model.forward` still computes with them.
"""

from __future__ import annotations

import dataclasses
import weakref

import torch
from torch import nn

from ..kernels.lowbit_layout import concat_rows
from .packed_linear import PackedLinear


class FusedLinear(nn.Module):
    """A plain Linear over the concatenated rows of several bf16/fp16 Linears (whose weights become views)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)


def _cat_bias(mods: list[nn.Module]) -> torch.Tensor | None:
    """The parts' biases concatenated, each part's bias re-pointed at its slice (None when none has a bias)."""
    biases = [getattr(m, "bias", None) for m in mods]
    if all(b is None for b in biases):
        return None
    fused = torch.cat([b.detach() for b in biases])
    r0 = 0
    for m, b in zip(mods, biases):
        view = fused[r0:r0 + b.shape[0]]
        if isinstance(b, nn.Parameter):
            m.bias = nn.Parameter(view, requires_grad=b.requires_grad)
        else:
            m.bias = view
        r0 += b.shape[0]
    return fused


def fusable_schemes(schemes: list) -> bool:
    """Whether packed modules of these schemes can share one GEMM as far as their schemes tell: the same bits,
    group, activation quantization, input rotation and input features, all or none with a bias (smoothing factors
    must also be equal, which only the loaded tensors show)."""
    s0 = schemes[0]
    same = all((s.bits, s.group, s.abits, s.smooth, s.rotate, s.shape[1])
               == (s0.bits, s0.group, s0.abits, s0.smooth, s0.rotate, s0.shape[1]) for s in schemes)
    return same and len({bool(s.bias) for s in schemes}) == 1


def _fusable_packed(mods: list[nn.Module]) -> bool:
    first = mods[0]
    if not all(isinstance(m, PackedLinear) and m.lowbit is not None and m.kernel == first.kernel for m in mods):
        return False
    if not fusable_schemes([m.scheme for m in mods]):
        return False
    return not first.scheme.smooth or all(torch.equal(m.smooth, first.smooth) for m in mods[1:])


# first part -> (ids of all parts, their fused module): engines built one after another on the same model share
# one fused copy instead of concatenating (and briefly doubling) the weights again
_FUSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fuse_linears(mods: list[nn.Module]) -> nn.Module | None:
    """One module computing `torch.cat([m(x) for m in mods], -1)` in one launch, or None when the parts cannot
    share a kernel (different schemes, reference-path modules, mixed types): callers then run them one by one."""
    if len(mods) < 2:
        return None
    known = _FUSED.get(mods[0])
    if known is not None and known[0] == tuple(map(id, mods)) and _storage(mods[0]) == _storage(known[1]):
        return known[1]  # the parts still are views of it (not moved or reloaded since)
    fused = _fuse(mods)
    if fused is not None:
        _FUSED[mods[0]] = (tuple(map(id, mods)), fused)
    return fused


def _storage(m: nn.Module) -> int:
    """Address of the first weight row of a plain or packed Linear."""
    return (m.lowbit_codes if isinstance(m, PackedLinear) and m.lowbit is not None else m.weight).data_ptr()


def _fuse(mods: list[nn.Module]) -> nn.Module | None:
    if all(type(m) is nn.Linear for m in mods):
        w0 = mods[0].weight
        if any(m.weight.dtype != w0.dtype or m.in_features != mods[0].in_features for m in mods) or \
                any((m.bias is None) != (mods[0].bias is None) for m in mods):
            return None
        weight = torch.cat([m.weight.detach() for m in mods])
        r0 = 0
        for m in mods:
            m.weight = nn.Parameter(weight[r0:r0 + m.out_features], requires_grad=m.weight.requires_grad)
            r0 += m.out_features
        return FusedLinear(weight, _cat_bias(mods))
    if not _fusable_packed(mods):
        return None
    first = mods[0]
    fused_w, views = concat_rows([m.lowbit for m in mods])
    for m, v in zip(mods, views):
        m.lowbit_codes, m.lowbit_scales = v.codes, v.scales
        if v.high is not None:
            m.lowbit_high = v.high
    scheme = dataclasses.replace(first.scheme, name="+".join(m.scheme.name for m in mods),
                                 shape=(fused_w.n, first.in_features))
    fused = PackedLinear(scheme, {})
    fused.register_buffer("lowbit_codes", fused_w.codes)
    fused.register_buffer("lowbit_high", fused_w.high)
    fused.register_buffer("lowbit_scales", fused_w.scales)
    fused._k_pad, fused._lowbit_bits, fused.kernel = fused_w.k_pad, fused_w.bits, first.kernel
    bias = _cat_bias(mods)
    if bias is not None:
        fused.register_buffer("bias", bias)
    if scheme.smooth:
        fused.register_buffer("smooth", first.smooth)
    return fused
