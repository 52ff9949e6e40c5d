"""Weight clipping search: shrink each group's quantization range where that lowers the output error on calibration
inputs, trading a little error on the largest weights for finer steps on all the others. AWQ searches it on the
scaled inputs after its per-channel factors; GPTQ (`clip: true`) searches it on the Hessian it already has, to fix
its static group scales before the column walk.

The output error of rounding group g of a row is d^T (X_g^T X_g) d for the rounding error d of that group's weights,
so the search needs only each group's Gram block of the inputs (`input_grams`) or of the Hessian (`hessian_grams`).
"""

from __future__ import annotations

import torch

from .rtn import SCALE_DTYPE, _FP16_TINY, qmax

CLIP_GRID = tuple(round(1 - 0.025 * i, 3) for i in range(21))  # 1.0 down to 0.5


def input_grams(x: torch.Tensor, group: int) -> torch.Tensor:
    """Per-group Gram blocks [ceil(K/G), G, G] (float64) of calibration inputs `x` [T, K] (zero-padded columns)."""
    groups = -(-x.shape[1] // group)
    xg = torch.nn.functional.pad(x.double(), (0, groups * group - x.shape[1])).view(-1, groups, group)
    return torch.einsum("tgi,tgj->gij", xg, xg)


def hessian_grams(hessian: torch.Tensor, group: int) -> torch.Tensor:
    """The diagonal G x G blocks [ceil(K/G), G, G] (float64) of a [K, K] Hessian (zero-padded)."""
    groups = -(-hessian.shape[0] // group)
    pad = groups * group - hessian.shape[0]
    h = torch.nn.functional.pad(hessian.double(), (0, pad, 0, pad)).view(groups, group, groups, group)
    return torch.diagonal(h, dim1=0, dim2=2).permute(2, 0, 1).contiguous()


@torch.no_grad()
def clip_scales(weight: torch.Tensor, grams: torch.Tensor, bits: int, group: int,
                grid: tuple[float, ...] = CLIP_GRID, chunk_rows: int = 1024) -> tuple[torch.Tensor, dict]:
    """fp16 scales [R, ceil(K/G)] for `weight` [R, K]: per row and group, the clip ratio r of the grid whose scale
    r * absmax / qmax gives the least output error d^T gram d under the group's Gram block (`grams`
    [ceil(K/G), G, G] from `input_grams` or `hessian_grams`); 1.0, plain round to nearest, is always a candidate.
    Returns (scales, {"mean_ratio", "error_rtn", "error_clipped"}).
    """
    rows, cols = weight.shape
    groups = -(-cols // group)
    w = torch.nn.functional.pad(weight.float(), (0, groups * group - cols)).view(rows, groups, group)
    grams = grams.to(w.device, torch.float32)
    absmax = w.abs().amax(-1)
    top = qmax(bits)
    best_err = torch.full((rows, groups), float("inf"), dtype=torch.float64, device=w.device)
    best_scale = torch.ones(rows, groups, dtype=SCALE_DTYPE, device=w.device)
    best_ratio = torch.ones(rows, groups, device=w.device)
    rtn_err = None
    for r in grid:
        scale = (absmax * r / top).clamp(min=_FP16_TINY).to(SCALE_DTYPE)
        scale = torch.where(absmax == 0, torch.ones_like(scale), scale)
        err = torch.empty(rows, groups, dtype=torch.float64, device=w.device)
        for r0 in range(0, rows, chunk_rows):
            wc, sc = w[r0:r0 + chunk_rows], scale[r0:r0 + chunk_rows].float().unsqueeze(-1)
            delta = (wc - torch.round(wc / sc).clamp(-top, top) * sc).transpose(0, 1)  # [groups, r, G]
            err[r0:r0 + chunk_rows] = (torch.bmm(delta, grams) * delta).sum(-1).T.double()
        if rtn_err is None:
            rtn_err = err.clone()
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_ratio = torch.where(better, torch.full_like(best_ratio, r), best_ratio)
    info = {"mean_ratio": float(best_ratio.mean()), "error_rtn": float(rtn_err.sum()),
            "error_clipped": float(best_err.sum())}
    return best_scale, info


__all__ = ["clip_scales", "input_grams", "hessian_grams", "CLIP_GRID"]
