"""GPTQ (arXiv 2210.17323): round weights column by column and let the columns not yet rounded absorb each rounding
error through the inverse Hessian of the layer's calibration inputs, so the layer's outputs change least.

Scales are fixed before the walk ("static groups"): absmax/qmax of each group as round-to-nearest would choose, or
with `clip` the clipped range that least changes the group's output under the Hessian (`clip.py`), rounded to fp16
so that the stored codes times the stored scales are exactly the weights GPTQ optimised. On a
V:N:M-pruned weight, groups run over the *kept* values in storage order (as the artifact stores them) and the
pruned entries are held at zero while their errors, too, flow into the kept ones (pruning and rounding compensated
together, as SparseGPT does).
"""

from __future__ import annotations

import torch

from ..obs import obs_solve
from .clip import clip_scales, hessian_grams
from .rtn import qmax, quantize_rtn


def per_column(scales: torch.Tensor, group: int, columns: int) -> torch.Tensor:
    """float32 [R, columns]: each column's group scale from fp16 scales [R, ceil(columns/G)]."""
    return scales.float().repeat_interleave(group, dim=1)[:, :columns]


def group_scales(weight: torch.Tensor, bits: int, group: int,
                 kept_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest scales for `weight` [R, K]: (fp16 scales [R, ceil(n/G)], float32 per-entry map [R, K]).

    With `kept_index` [R, n] (padded column of every stored V:N:M value), groups run over those n values; entries
    that are not stored get scale 1 in the map (they are pruned to zero anyway).
    """
    rows, cols = weight.shape
    w = weight.float()
    if kept_index is None:
        _, scales = quantize_rtn(w, bits, group)
        return scales, per_column(scales, group, cols)
    padded_cols = max(cols, int(kept_index.max()) + 1 if kept_index.numel() else cols)
    padded = torch.nn.functional.pad(w, (0, padded_cols - cols))
    values = torch.gather(padded, 1, kept_index)
    _, scales = quantize_rtn(values, bits, group)
    per_value = per_column(scales, group, values.shape[1])
    full = torch.ones(rows, padded_cols, dtype=torch.float32, device=w.device)
    full.scatter_(1, kept_index, per_value)
    return scales, full[:, :cols]


def codes_for_scales(values: torch.Tensor, scales: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """int8 codes of `values` [R, n] under given fp16 group scales [R, ceil(n/G)] (clamped to the symmetric range)."""
    codes = torch.round(values.float() / per_column(scales, group, values.shape[1]))
    return codes.clamp(-qmax(bits), qmax(bits)).to(torch.int8)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group: int,
                  keep: torch.Tensor | None = None, kept_index: torch.Tensor | None = None,
                  damp: float = 0.01, block: int = 128, act_order: bool = False,
                  clip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `weight` [R, K] with GPTQ error compensation; `keep`/`kept_index` describe a V:N:M mask to hold.

    `act_order` rounds the input channels with the largest calibration energy (Hessian diagonal) first, so their
    errors can still be absorbed by the others; the scales stay those of the storage-order groups, so the artifact
    needs no permutation. `clip` searches each group's scale on the Hessian instead of taking absmax (dense weights
    only: a V:N:M weight's groups run over different columns per row and keep absmax).

    Returns (the dequantized float32 weight, whose entries are exactly code * scale and zero where pruned;
    fp16 scales [R, groups]).
    """
    if clip and kept_index is None:
        scales, _ = clip_scales(weight, hessian_grams(hessian, group), bits, group)
        scale_map = per_column(scales, group, weight.shape[1])
    else:
        scales, scale_map = group_scales(weight, bits, group, kept_index)
    top = qmax(bits)
    mask = None if keep is None else keep.to(weight.device)
    order = None
    if act_order:
        order = torch.argsort(hessian.diagonal(), descending=True, stable=True).to(weight.device)
        weight, hessian, scale_map = weight[:, order], hessian[order][:, order], scale_map[:, order]
        mask = None if mask is None else mask[:, order]

    def target(col: torch.Tensor, i: int) -> torch.Tensor:
        s = scale_map[:, i].double()
        q = torch.round(col / s).clamp(-top, top) * s
        return q if mask is None else torch.where(mask[:, i], q, torch.zeros_like(q))

    out = obs_solve(weight, hessian, target, damp, block)
    if order is not None:
        out = out[:, torch.argsort(order)]
    return out, scales


__all__ = ["gptq_quantize", "group_scales", "codes_for_scales"]
