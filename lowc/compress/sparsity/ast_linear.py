"""The Linear that AST trains: a V:N:M keep mask, a straight-through estimator, optional LoRA and SLoRB.

`ASTLinear` keeps the original `weight` Parameter (the *latent* weight: with SR-STE its pruned entries live on and
may grow back, which is how masks adapt) and a bool `mask` buffer (True = kept, exactly V:N:M). Its output is

    y = x @ ((W + scale * B @ A) * mask).T + bias + SLoRB(x)

computed by `MaskedLinearFn`, which saves only references to W, the mask and the small LoRA factors and rebuilds the
masked weight in backward: autograd on `W * mask` would keep a full masked copy of every weight alive until
backward (13 GB for a 7B model). With `ste=True` the latent weight's gradient is the dense gradient `g.T @ x`
(straight-through: pruned weights learn too); with `ste=False` it is masked (plain masked fine-tuning).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .slorb import SLoRB
from .vnm import VNMSpec


class MaskedLinearFn(torch.autograd.Function):
    """y = x @ ((W + scale*B@A) * mask).T + bias, memory-lean backward (see module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, mask, bias, lora_a, lora_b, scale: float, ste: bool):
        ctx.scale, ctx.ste = scale, ste
        ctx.save_for_backward(x, weight, mask, lora_a, lora_b)
        ctx.has_bias = bias is not None
        return nn.functional.linear(x, _effective(weight, mask, lora_a, lora_b, scale), bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, mask, lora_a, lora_b = ctx.saved_tensors
        w = _effective(weight, mask, lora_a, lora_b, ctx.scale)
        grad_x = grad @ w if ctx.needs_input_grad[0] else None
        grad_w = grad_bias = grad_a = grad_b = None
        lora = lora_a is not None and (ctx.needs_input_grad[4] or ctx.needs_input_grad[5])
        if ctx.needs_input_grad[1] or lora:
            g2 = grad.reshape(-1, grad.shape[-1])
            full = g2.t() @ x.reshape(-1, x.shape[-1]).to(g2.dtype)  # dL/d(effective weight) before masking
            masked = full * mask if mask is not None else full
            if ctx.needs_input_grad[1]:
                grad_w = (full if ctx.ste else masked).to(weight.dtype)
            if lora:
                masked = masked.to(lora_a.dtype)
                grad_b = ctx.scale * masked @ lora_a.t()
                grad_a = ctx.scale * lora_b.t() @ masked
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_w, None, grad_bias, grad_a, grad_b, None, None


def _effective(weight: torch.Tensor, mask: torch.Tensor | None, lora_a: torch.Tensor | None,
               lora_b: torch.Tensor | None, scale: float) -> torch.Tensor:
    w = weight
    if lora_a is not None:
        w = w + scale * (lora_b @ lora_a).to(w.dtype)
    return w * mask if mask is not None else w


class ASTLinear(nn.Module):
    """A Linear under AST: same `weight`/`bias` Parameters as the Linear it replaces, plus `mask` and options.

    `sparse=False` runs the latent weight densely (stage 1 of the three-staged LoRA). `ste` chooses the
    straight-through gradient for the latent weight (AST) or the masked one (plain masked fine-tuning).
    """

    def __init__(self, linear: nn.Linear, spec: VNMSpec, keep: torch.Tensor, ste: bool = True):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.spec = spec
        self.register_buffer("mask", keep.to(device=linear.weight.device, dtype=torch.bool), persistent=False)
        self.ste = ste
        self.sparse = True
        self.lora_a: nn.Parameter | None = None
        self.lora_b: nn.Parameter | None = None
        self.lora_scale = 1.0
        self.slorb: SLoRB | None = None

    def add_lora(self, rank: int, alpha: float, generator: torch.Generator | None = None) -> None:
        """Attach LoRA factors: A [rank, K] Kaiming-uniform (as PEFT does), B [R, rank] zero, scale alpha / rank."""
        w = self.weight
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, dtype=w.dtype, device=w.device))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, dtype=w.dtype, device=w.device))
        self.lora_a.data.copy_(lora_init(rank, self.in_features, generator).to(w.dtype))
        self.lora_scale = alpha / rank

    def add_slorb(self, group: int) -> None:
        """Attach a SLoRB branch initialised from the current latent weight's pruned part."""
        self.slorb = SLoRB.from_pruned(self.weight.detach(), self.mask, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = MaskedLinearFn.apply(x, self.weight, self.mask if self.sparse else None, self.bias, self.lora_a,
                                 self.lora_b, self.lora_scale, self.ste)
        if self.slorb is not None:
            y = y + self.slorb(x)
        return y

    def extra_repr(self) -> str:
        lora = f", lora_rank={self.lora_a.shape[0]}" if self.lora_a is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, vnm={self.spec}, "
                f"ste={self.ste}{lora}")


def lora_init(rank: int, in_features: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """LoRA's A factor: uniform in ±1/sqrt(K) (nn.Linear's Kaiming-uniform with a=sqrt(5)), float32 [rank, K]."""
    bound = 1 / math.sqrt(in_features)
    return (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def attach(model: nn.Module, specs: dict[str, VNMSpec], masks: dict[str, torch.Tensor],
           ste: bool) -> dict[str, ASTLinear]:
    """Replace every Linear named in `specs` by an ASTLinear sharing its Parameters; returns them by name."""
    out = {}
    for name, spec in specs.items():
        linear = model.get_submodule(name)
        if isinstance(linear, ASTLinear):
            raise ValueError(f"{name} is already under AST")
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{name} is a {type(linear).__name__}, AST prunes nn.Linear modules only")
        out[name] = ASTLinear(linear, spec, masks[name], ste)
        set_submodule(model, name, out[name])
    return out


__all__ = ["ASTLinear", "MaskedLinearFn", "attach", "lora_init", "set_submodule"]
