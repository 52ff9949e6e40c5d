"""Weight clipping search (AWQ's second half): shrink each group's quantization range where that lowers the output
error on calibration inputs, trading a little error on the largest weights for finer steps on all the others."""

from __future__ import annotations

import torch

from .rtn import SCALE_DTYPE, _FP16_TINY, qmax

CLIP_GRID = tuple(round(1 - 0.025 * i, 3) for i in range(21))  # 1.0 down to 0.5


@torch.no_grad()
def clip_scales(weight: torch.Tensor, x: torch.Tensor, bits: int, group: int,
                grid: tuple[float, ...] = CLIP_GRID, chunk_rows: int = 1024) -> tuple[torch.Tensor, dict]:
    """fp16 scales [R, ceil(K/G)] for `weight` [R, K]: per row and group, the clip ratio r of the grid whose scale
    r * absmax / qmax minimises ||x_g (w_g - Q(w_g))^T||^2 over the sample `x` [T, K] (1.0, plain round to nearest,
    is always a candidate). Returns (scales, {"mean_ratio", "error_rtn", "error_clipped"}).
    """
    rows, cols = weight.shape
    groups = -(-cols // group)
    pad = groups * group - cols
    w = torch.nn.functional.pad(weight.float(), (0, pad)).view(rows, groups, group)
    xg = torch.nn.functional.pad(x.float(), (0, pad)).view(-1, groups, group).transpose(0, 1)  # [groups, T, G]
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
            delta = wc - torch.round(wc / sc).clamp(-top, top) * sc  # [r, groups, G]
            out = torch.bmm(xg, delta.permute(1, 2, 0))  # [groups, T, r]
            err[r0:r0 + chunk_rows] = out.double().pow(2).sum(1).T
        if rtn_err is None:
            rtn_err = err.clone()
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_ratio = torch.where(better, torch.full_like(best_ratio, r), best_ratio)
    info = {"mean_ratio": float(best_ratio.mean()), "error_rtn": float(rtn_err.sum()),
            "error_clipped": float(best_err.sum())}
    return best_scale, info


__all__ = ["clip_scales", "CLIP_GRID"]
