"""Layer-by-layer reconstruction: replace each Linear's weight by a pruned and/or quantized one chosen so that the
layer reproduces its dense outputs on calibration data (the objective of SparseGPT and GPTQ).

The walk is the calibration runner's: one decoder (encoder) layer at a time, all calibration samples. A layer's
Linear inputs are recorded as Hessians H = X^T X (the inputs come from the already-compressed earlier layers, so
each layer also corrects what those left behind), every planned Linear of the layer is solved, and the compressed
layer's outputs feed the next one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..console import progress_bar
from .calibration import embed_inputs, layer_runners


@torch.no_grad()
def reconstruct_layers(model: torch.nn.Module, ids: torch.Tensor,
                       solve: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor], modules: set[str],
                       batch_size: int = 8, progress: bool = True) -> dict[str, float]:
    """Replace, in place, the weight W of every Linear of `model` named in `modules` by `solve(name, W, H)` (float32
    [R, K], H = X^T X of its calibration inputs, float64 [K, K]). Returns each module's relative output error on
    those inputs, ||X (W - W')^T|| / ||X W^T||."""
    hessians: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module, args):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            hessians[name] = hessians.get(name, 0) + x.T @ x
        return hook

    errors: dict[str, float] = {}
    hidden = torch.cat([embed_inputs(model, ids[i:i + batch_size]) for i in range(0, len(ids), batch_size)])
    runners = list(layer_runners(model, ids, batch_size))
    with progress_bar(progress) as bar:
        task = bar.add_task("reconstructing", total=len(runners))
        for prefix, layer, run in runners:
            linears = {f"{prefix}.{n}": m for n, m in layer.named_modules()
                       if isinstance(m, torch.nn.Linear) and f"{prefix}.{n}" in modules}
            handles = [m.register_forward_pre_hook(record(n)) for n, m in linears.items()]
            try:
                for i in range(0, len(hidden), batch_size):
                    run(hidden[i:i + batch_size])
            finally:
                for h in handles:
                    h.remove()
            for name, linear in linears.items():
                h = hessians.pop(name)
                w = linear.weight.detach().float()
                new = solve(name, w, h)
                delta = (new - w).double()
                errors[name] = float(((delta @ h) * delta).sum().clamp_min(0).sqrt()
                                     / ((w.double() @ h) * w.double()).sum().clamp_min(1e-30).sqrt())
                linear.weight.copy_(new.to(linear.weight.dtype))
            hidden = torch.cat([run(hidden[i:i + batch_size]) for i in range(0, len(hidden), batch_size)])
            bar.advance(task)
    return errors


__all__ = ["reconstruct_layers"]
