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

from .calibration import walk_layers


@torch.no_grad()
def reconstruct_layers(model: torch.nn.Module, ids: torch.Tensor,
                       solve: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor], modules: set[str],
                       batch_size: int = 8, progress: bool = True) -> dict[str, float]:
    """Replace, in place, the weight W of every Linear of `model` named in `modules` by `solve(name, W, H)` (float32
    [R, K], H = X^T X of its calibration inputs, float64 [K, K]). Returns each module's relative output error on
    those inputs, ||X (W - W')^T|| / ||X W^T||."""
    hessians: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}

    def observe(name: str, linear: torch.nn.Module):
        def record(module, args):
            if name in modules:
                x = args[0].detach().double().reshape(-1, args[0].shape[-1])
                hessians[name] = hessians.get(name, 0) + x.T @ x
        return record

    def solve_layer(prefix: str, layer: torch.nn.Module) -> None:
        for name in [n for n in hessians if n.startswith(prefix + ".")]:
            linear = model.get_submodule(name)
            h = hessians.pop(name)
            w = linear.weight.detach().float()
            new = solve(name, w, h)
            delta = (new - w).double()
            errors[name] = float(((delta @ h) * delta).sum().clamp_min(0).sqrt()
                                 / ((w.double() @ h) * w.double()).sum().clamp_min(1e-30).sqrt())
            linear.weight.copy_(new.to(linear.weight.dtype))

    walk_layers(model, ids, observe, "reconstructing", after=solve_layer, batch_size=batch_size, progress=progress)
    return errors


__all__ = ["reconstruct_layers"]
