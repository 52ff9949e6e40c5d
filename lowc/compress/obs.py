"""Optimal Brain Surgeon weight update for a fixed pruning mask (the solver of SparseGPT, arXiv 2301.00774).

Pruning a Linear's weights changes its outputs on real inputs; the kept weights can absorb much of that change.
With H = X^T X over calibration inputs X [tokens, K], the columns are eliminated left to right: pruning (or later,
rounding) column i leaves an error e = (w_i - q_i) / [H^-1]_ii that is spread over the columns not yet processed
as W[:, j] -= e * [H^-1]_ij, which minimises ||X W^T - X W'^T||^2 given the earlier choices. The upper Cholesky
factor of H^-1 gives every step's row of the shrinking inverse at once, and blocks of columns apply the update to
the rest of the matrix in one product, as in the paper.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, in float64 for stability."""
    eye = torch.eye(hessian.shape[0], dtype=torch.float64, device=hessian.device)
    base = damp * hessian.diagonal().mean().clamp_min(1e-12)
    for factor in (1.0, 10.0, 100.0):  # more damping if H is numerically singular
        try:
            lower = torch.linalg.cholesky(hessian + factor * base * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise torch.linalg.LinAlgError("the calibration Hessian is singular even with 100x damping")


@torch.no_grad()
def obs_solve(weight: torch.Tensor, hessian: torch.Tensor, target: Callable[[torch.Tensor, int], torch.Tensor],
              damp: float = 0.01, block: int = 128) -> torch.Tensor:
    """Walk the columns of `weight` [R, K] left to right, replacing column i by `target(column, i)` (its pruned
    and/or rounded value) and spreading the error over the columns to its right through the inverse Hessian.

    Returns the float32 weight whose every column is what `target` chose for it. Input channels that never fired
    (zero Hessian diagonal) get a unit diagonal so that H stays invertible; their errors then stay local.
    """
    w = weight.detach().double().clone()
    h = hessian.double().clone()
    cols = w.shape[1]
    dead = torch.nonzero(h.diagonal() == 0).flatten()
    h[dead, dead] = 1.0
    u = _inverse_cholesky(h, damp)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = w1[:, i]
            q = target(col, i1 + i)
            err = (col - q) / u1[i, i]
            w1[:, i:] -= err[:, None] * u1[i, i:][None, :]
            w1[:, i] = q
            err1[:, i] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return w.float()


def obs_prune(weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, damp: float = 0.01,
              block: int = 128) -> torch.Tensor:
    """Zero the weights of `weight` [R, K] where `keep` [R, K] is False and update the kept ones so the layer's
    outputs on the calibration inputs (Hessian `hessian` = X^T X, [K, K]) change as little as possible.

    Returns the new float32 weight (pruned entries exactly zero).
    """
    mask = keep.to(weight.device)
    return obs_solve(weight, hessian, lambda col, i: torch.where(mask[:, i], col, torch.zeros_like(col)), damp, block)


@torch.no_grad()
def lstsq_prune(weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, damp: float = 0.01,
                max_batch_elements: int = 1 << 26) -> torch.Tensor:
    """Like `obs_prune`, but each row's kept weights are the exact least-squares fit of the row's dense outputs:
    w_S = (H_SS + damp I)^-1 (H w)_S. Costs a K_kept x K_kept solve per row (batched), so it suits layers up to a few
    thousand input channels; `obs_prune` is the scalable approximation of the same objective.
    """
    w = weight.detach().double()
    h = hessian.double().clone()
    rows, cols = w.shape
    idx = torch.arange(cols, device=h.device)
    h[idx, idx] += damp * h.diagonal().mean().clamp_min(1e-12)
    target = w @ h  # (H w_r) for every row r, [R, K]
    mask = keep.to(w.device)
    out = torch.zeros_like(w)
    kept = mask.sum(1)
    for count in kept.unique().tolist():  # rows with the same number of kept weights solve in one batch
        if count == 0:
            continue
        same = torch.nonzero(kept == count).flatten()
        step = max(1, max_batch_elements // (count * count))
        for r0 in range(0, len(same), step):
            sel = same[r0:r0 + step]
            cols_kept = torch.nonzero(mask[sel])[:, 1].view(len(sel), count)
            a = h[cols_kept[:, :, None], cols_kept[:, None, :]]
            b = torch.gather(target[sel], 1, cols_kept)
            lower = torch.linalg.cholesky(a)
            out[sel[:, None], cols_kept] = torch.cholesky_solve(b.unsqueeze(-1), lower).squeeze(-1)
    return out.float()


SOLVERS = {"lstsq": lstsq_prune, "obs": obs_prune}

__all__ = ["obs_solve", "obs_prune", "lstsq_prune", "SOLVERS"]
