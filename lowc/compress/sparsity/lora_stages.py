"""Three-staged LoRA (V:N:M paper) for models too large to fine-tune in full.

The base weights stay frozen; only LoRA factors A [r, K], B [R, r] (and SLoRB branches, if any) train:

1. dense LoRA: the model runs densely with W + scale*B@A (the adapters learn while nothing is pruned);
2. sparse LoRA with periodic re-pruning: the model runs (W + scale*B@A) * mask; every `mask_interval` steps the
   adapters are merged into W (W += scale*B@A; A re-drawn, B zeroed, their optimizer state reset) and the mask is
   recomputed from the merged weight;
3. sparse LoRA on a fixed mask until the end, when the adapters are merged and W is pruned: W = (W + scale*B@A) * mask.

Stages 1 and 2 take `dense_fraction` and `reprune_fraction` of the steps (the paper: at most 10% together).
Everything here is a pure function of the step number, so a resumed run takes exactly the same decisions.
"""

from __future__ import annotations

import torch

from .ast_dist import assign_full, full, local
from .ast_linear import ASTLinear, lora_init

DENSE, REPRUNE, FIXED = 1, 2, 3


def stage_at(step: int, steps: int, dense_fraction: float, reprune_fraction: float) -> int:
    """The stage (1, 2 or 3) that training step `step` (0-based) of `steps` belongs to."""
    dense_end = int(round(steps * dense_fraction))
    reprune_end = dense_end + int(round(steps * reprune_fraction))
    return DENSE if step < dense_end else REPRUNE if step < reprune_end else FIXED


def lora_generator(seed: int, step: int, index: int) -> torch.Generator:
    """A generator that depends only on (seed, step, module index): re-drawn adapters are reproducible on resume and
    identical on every rank."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 10_007 + index)


@torch.no_grad()
def merge_lora(module: ASTLinear, reinit: torch.Generator | None = None) -> None:
    """W += scale * B @ A (on this rank's rows when sharded); with `reinit`, re-draw A and zero B afterwards."""
    a = full(module.lora_a)  # collective when sharded
    w = local(module.weight)
    w.add_((module.lora_scale * (local(module.lora_b).float() @ a.float())).to(w.dtype))
    if reinit is not None:
        assign_full(module.lora_a, lora_init(a.shape[0], a.shape[1], reinit).to(a.dtype))
        local(module.lora_b).zero_()


def reset_adapter_state(optimizer: torch.optim.Optimizer, module: ASTLinear) -> None:
    """Forget AdamW's moments for re-drawn adapters (ReLoRA-style: stale moments would push the fresh factors)."""
    for p in (module.lora_a, module.lora_b):
        optimizer.state.pop(p, None)


__all__ = ["stage_at", "merge_lora", "reset_adapter_state", "lora_generator", "DENSE", "REPRUNE", "FIXED"]
