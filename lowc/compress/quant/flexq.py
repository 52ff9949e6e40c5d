"""FlexQ-style layer sensitivity: which Linears keep 8-bit activations when the rest run at 6 bits.

Each quantized Linear's output error under per-token A6 and A8 is measured on the calibration inputs (the walk of
the calibration runner, on the model as compressed so far); the layers that A6 hurts most keep A8, most sensitive
first, as long as their FLOPs fit in the budget.
"""

from __future__ import annotations

import torch

from ...kernels.reference import quantize_activations
from ..calibration import walk_layers


@torch.no_grad()
def activation_sensitivity(model: torch.nn.Module, ids: torch.Tensor, modules: set[str], bits: tuple[int, ...] = (6, 8),
                           batch_size: int = 8, progress: bool = True) -> dict[str, dict[int, float]]:
    """Relative output error ||Q_b(X) W^T - X W^T|| / ||X W^T|| of every Linear in `modules`, for each bit width b."""
    sums: dict[str, dict] = {}

    def observe(name: str, linear: torch.nn.Module):
        def record(module, args):
            if name not in modules:
                return
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            w = module.weight.detach().float()
            y = x @ w.T
            entry = sums.setdefault(name, {"ref": 0.0, **{b: 0.0 for b in bits}})
            entry["ref"] += float(y.double().pow(2).sum())
            for b in bits:
                codes, scale = quantize_activations(x, b)
                entry[b] += float(((codes.float() * scale[:, None]) @ w.T - y).double().pow(2).sum())
        return record

    walk_layers(model, ids, observe, "activation sensitivity", batch_size=batch_size, progress=progress)
    return {n: {b: (e[b] / max(e["ref"], 1e-30)) ** 0.5 for b in bits} for n, e in sums.items()}


def choose_a8(sensitivity: dict[str, dict[int, float]], flops: dict[str, int], budget: float) -> list[str]:
    """The modules kept at A8: by A6 error, largest first, while their FLOPs stay within `budget` x total FLOPs."""
    allowed = budget * sum(flops.values())
    chosen, used = [], 0
    for name in sorted(sensitivity, key=lambda n: sensitivity[n][6], reverse=True):
        if used + flops[name] <= allowed:
            chosen.append(name)
            used += flops[name]
    return chosen


__all__ = ["activation_sensitivity", "choose_a8"]
