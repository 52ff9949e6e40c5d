"""Weight importance scores that decide what V:N:M pruning keeps.

- magnitude: |W|.
- wanda (Sun et al. 2023): |W_ij| * ||x_j||_2, the weight times the L2 norm of its input channel over calibration tokens.
- ria (Zhang et al. 2024, relative importance and activations): (|W_ij| / sum_k |W_ik| + |W_ij| / sum_k |W_kj|)
  * ||x_j||_2 ** 0.5 — each weight relative to its row and its column, scaled by the input channel's activity.
"""

from __future__ import annotations

import torch

METHODS = ("magnitude", "wanda", "ria")
NEEDS_CALIBRATION = ("wanda", "ria")


def importance_scores(weight: torch.Tensor, method: str, input_norm: torch.Tensor | None = None,
                      ria_alpha: float = 0.5) -> torch.Tensor:
    """Importance [R, K] of each weight of a Linear [R, K]; `input_norm` [K] is ||x_j||_2 from calibration."""
    w = weight.detach().float().abs()
    if method == "magnitude":
        return w
    if method not in METHODS:
        raise ValueError(f"unknown importance method {method!r} (known: {', '.join(METHODS)})")
    if input_norm is None or input_norm.shape != (w.shape[1],):
        raise ValueError(f"{method} importance needs input channel norms of shape [{w.shape[1]}]")
    norm = input_norm.float().to(w.device)
    if method == "wanda":
        return w * norm
    relative = w / w.sum(1, keepdim=True).clamp_min(1e-30) + w / w.sum(0, keepdim=True).clamp_min(1e-30)
    return relative * norm.pow(ria_alpha)
