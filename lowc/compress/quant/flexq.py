"""FlexQ-style layer sensitivity: which Linears keep 8-bit activations when the rest run at 6 bits.

Each quantized Linear's output error under per-token A6 and A8 is measured on the calibration inputs (the walk of
the calibration runner, on the model as compressed so far); the layers that A6 hurts most keep A8, most sensitive
first, as long as their FLOPs fit in the budget.
"""

from __future__ import annotations

import torch

from ...console import progress_bar
from ...kernels.reference import quantize_activations
from ..calibration import embed_inputs, layer_runners


@torch.no_grad()
def activation_sensitivity(model: torch.nn.Module, ids: torch.Tensor, modules: set[str], bits: tuple[int, ...] = (6, 8),
                           batch_size: int = 8, progress: bool = True) -> dict[str, dict[int, float]]:
    """Relative output error ||Q_b(X) W^T - X W^T|| / ||X W^T|| of every Linear in `modules`, for each bit width b."""
    sums: dict[str, dict] = {}

    def record(name: str):
        def hook(module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            w = module.weight.detach().float()
            y = x @ w.T
            entry = sums.setdefault(name, {"ref": 0.0, **{b: 0.0 for b in bits}})
            entry["ref"] += float(y.double().pow(2).sum())
            for b in bits:
                codes, scale = quantize_activations(x, b)
                entry[b] += float(((codes.float() * scale[:, None]) @ w.T - y).double().pow(2).sum())
        return hook

    hidden = torch.cat([embed_inputs(model, ids[i:i + batch_size]) for i in range(0, len(ids), batch_size)])
    runners = list(layer_runners(model, ids, batch_size))
    with progress_bar(progress) as bar:
        task = bar.add_task("activation sensitivity", total=len(runners))
        for prefix, layer, run in runners:
            handles = [m.register_forward_pre_hook(record(f"{prefix}.{n}")) for n, m in layer.named_modules()
                       if isinstance(m, torch.nn.Linear) and f"{prefix}.{n}" in modules]
            try:
                hidden = torch.cat([run(hidden[i:i + batch_size]) for i in range(0, len(hidden), batch_size)])
            finally:
                for h in handles:
                    h.remove()
            bar.advance(task)
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
