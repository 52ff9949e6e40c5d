"""End-to-end tuning of the quantized model's float parameters (E2E-QP of EfficientQAT, arXiv 2407.11062; PEQA,
arXiv 2305.14152).

GPTQ and clipping choose each Linear's codes and scales so that *that* Linear's outputs change least; the small
errors of every layer still add up at the model's output, which is what a user sees (MiniLM W4: each module type
alone keeps the embedding cosine above 0.995, all of them together fall to 0.988). Here the integer codes stay as
they are and what the artifact stores in floating point is trained, with Adam, so that the quantized model's
outputs follow the float model's on the calibration windows:

- every group scale, as a factor exp(θ) on its starting value (θ = 0: the scales GPTQ / RTN chose);
- the biases of the Linears and the weights (and biases) of the norms inside the decoder/encoder layers.

The loss is the KL divergence of the next-token distributions for a decoder, and for an encoder the squared error
of the last hidden states (relative to their mean square) plus ten times (1 − cosine) of the mean-pooled
embeddings. Linears with `abits` see their inputs quantized per token as the kernels do, with a straight-through
gradient. A slice of the calibration windows is held out: when its loss does not fall, the starting parameters
are kept, so tuning never makes the artifact worse on text it did not train on.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass

import torch

from ...console import progress_bar
from ...kernels.reference import quantize_activations
from ...scheme import ModuleScheme
from .gptq import codes_for_scales, per_column
from .rtn import SCALE_DTYPE, _FP16_TINY, quantize_rtn

log = logging.getLogger("lowc.compress")

COSINE_WEIGHT = 10.0  # encoder loss: hidden-state error + COSINE_WEIGHT * (1 - embedding cosine)


@dataclass
class TuneConfig:
    """steps: Adam steps (each on `batch_size` calibration windows); lr: the step size of the log-scales θ (the
    biases and norms take lr / 10, see `OTHER_LR_RATIO`); held_out: fraction of the windows kept for the check."""

    steps: int
    lr: float = 1e-3
    batch_size: int = 8
    held_out: float = 0.125
    seed: int = 0


OTHER_LR_RATIO = 0.1


def fake_quantize_activations(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x rounded per token exactly as `reference.quantize_activations` does, with a straight-through gradient."""
    codes, scale = quantize_activations(x.detach(), bits)
    q = (codes.float() * scale.unsqueeze(-1)).to(x.dtype)
    return x + (q - x).detach()


class _QuantizedWeight:
    """One Linear's fixed codes and trainable log-scales; installs itself as the Linear's weight."""

    def __init__(self, linear: torch.nn.Linear, scheme: ModuleScheme, scales: torch.Tensor | None):
        w = linear.weight.detach().float()
        if scales is None:
            codes, scales = quantize_rtn(w, scheme.bits, scheme.group)
        else:
            codes = codes_for_scales(w, scales, scheme.bits, scheme.group)
        self.linear, self.scheme = linear, scheme
        self.codes = codes.to(w.device)
        self.start = scales.to(device=w.device, dtype=torch.float32)
        self.theta = torch.zeros_like(self.start, requires_grad=True)
        self.original = linear.weight
        del linear.weight  # a plain attribute from now on, recomputed before every forward
        self.handles = [linear.register_forward_pre_hook(self._install)]
        if scheme.abits is not None:
            self.handles.append(linear.register_forward_pre_hook(
                lambda _, args, bits=scheme.abits: (fake_quantize_activations(args[0], bits), *args[1:])))

    def scales(self) -> torch.Tensor:
        """The fp16 scales the artifact will store (positive and finite)."""
        s = self.start * torch.exp(self.theta.detach())
        return s.clamp(_FP16_TINY, torch.finfo(SCALE_DTYPE).max).to(SCALE_DTYPE)

    def _weight(self, scales: torch.Tensor) -> torch.Tensor:
        return self.codes.float() * per_column(scales, self.scheme.group, self.codes.shape[1])

    def _install(self, linear: torch.nn.Linear, args: tuple) -> None:
        linear.weight = self._weight(self.start * torch.exp(self.theta))

    def finish(self, keep: bool) -> torch.Tensor:
        """Remove the hooks and give the Linear back a Parameter holding codes x the final fp16 scales (or its
        starting weight when `keep` is False); returns the scales."""
        for h in self.handles:
            h.remove()
        if hasattr(self.linear, "weight"):
            del self.linear.weight
        if keep:
            scales = self.scales()
            self.original.data = self._weight(scales).to(self.original.dtype)
        else:
            scales = self.start.to(SCALE_DTYPE)
        self.linear.weight = self.original
        return scales


def _other_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Biases of the Linears and parameters of the norms inside the decoder/encoder layers (what else the artifact
    stores as floats next to the quantized weights), by name."""
    layers = "model.layers." if model.kind == "decoder" else "encoder.layer."
    out = {}
    for name, module in model.named_modules():
        if not name.startswith(layers):
            continue
        params = dict(module.named_parameters(recurse=False))
        if isinstance(module, torch.nn.Linear) and params.get("bias") is not None:
            out[f"{name}.bias"] = params["bias"]
        elif "norm" in type(module).__name__.lower():
            out.update({f"{name}.{n}": p for n, p in params.items()})
    return out


def _loss(student: torch.nn.Module, teacher: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        target = teacher(ids)
    out = student(ids)
    if student.kind == "decoder":
        return torch.nn.functional.kl_div(torch.log_softmax(out, -1).flatten(0, 1),
                                          torch.log_softmax(target, -1).flatten(0, 1),
                                          log_target=True, reduction="batchmean")
    hidden = (out - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-30)
    cosine = torch.nn.functional.cosine_similarity(out.mean(1), target.mean(1), dim=-1).mean()
    return hidden + COSINE_WEIGHT * (1 - cosine)


@torch.no_grad()
def _mean_loss(student: torch.nn.Module, teacher: torch.nn.Module, ids: torch.Tensor, batch_size: int) -> float:
    return sum(float(_loss(student, teacher, part)) * len(part) for part in ids.split(batch_size)) / len(ids)


def tune_quantized(model: torch.nn.Module, teacher: torch.nn.Module, ids: torch.Tensor,
                   schemes: dict[str, ModuleScheme], scales: dict[str, torch.Tensor], config: TuneConfig,
                   progress: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Tune, in place, the quantized `model` (float weights equal to codes x scales, or to be rounded to nearest
    where `scales` has no entry) against the float `teacher` on the calibration windows `ids` [samples, seqlen].

    Every dense integer-weight module of `schemes` takes part. Both models run on `ids.device` (and go back to
    where they were). Returns (the fp16 scales of every tuned module, the record for the manifest); on return the
    model's Linears hold codes x those scales, and its biases and norms the tuned values.
    """
    targets = {m: s for m, s in schemes.items() if s.bits is not None and s.vnm is None}
    device = ids.device
    home = next(model.parameters()).device
    model.to(device)
    teacher.to(device).eval().requires_grad_(False)
    frozen = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    weights = {m: _QuantizedWeight(model.get_submodule(m), s, scales.get(m)) for m, s in targets.items()}
    others = _other_parameters(model)
    starting = {n: p.detach().clone() for n, p in others.items()}
    for p in others.values():
        p.requires_grad_(True)

    held = min(len(ids) - 1, max(1, round(len(ids) * config.held_out))) if len(ids) > 1 else 0
    train, check = ids[: len(ids) - held], ids[len(ids) - held:]
    batch = min(config.batch_size, len(train))
    optimizer = torch.optim.Adam([{"params": [w.theta for w in weights.values()], "lr": config.lr},
                                  {"params": list(others.values()), "lr": config.lr * OTHER_LR_RATIO}])
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / config.steps)))
    generator = torch.Generator().manual_seed(config.seed)
    check_before = _mean_loss(model, teacher, check, batch) if held else None
    start, first, last = time.perf_counter(), None, None
    with progress_bar(progress) as bar:
        task = bar.add_task("tuning scales", total=config.steps)
        for step in range(config.steps):
            pick = torch.randperm(len(train), generator=generator)[:batch].to(device)
            loss = _loss(model, teacher, train[pick])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            last = float(loss.detach())
            first = last if first is None else first
            bar.update(task, advance=1, description=f"tuning scales (loss {last:.4g})")
    check_after = _mean_loss(model, teacher, check, batch) if held else None
    keep = check_after is None or check_after < check_before
    if not keep:
        log.warning("tuning: the held-out loss rose (%.4g -> %.4g); keeping the scales, biases and norms it "
                    "started from", check_before, check_after)
        for n, p in others.items():
            p.data.copy_(starting[n])
    out = {m: w.finish(keep) for m, w in weights.items()}
    for p, flag in frozen.items():
        p.requires_grad_(flag)
    model.to(home)
    teacher.to(home)
    seconds = time.perf_counter() - start
    record = {"steps": config.steps, "lr": config.lr, "batch_size": batch, "train_windows": len(train),
              "held_out_windows": held, "loss_first": first, "loss_last": last,
              "held_out_loss_before": check_before, "held_out_loss_after": check_after, "kept": keep,
              "modules": len(weights), "scales": sum(w.theta.numel() for w in weights.values()),
              "other_parameters": sorted(others), "seconds": seconds}
    log.info("tuning: %d steps in %.0f s, training loss %.4g -> %.4g, held-out %s", config.steps, seconds,
             first, last, "-" if check_before is None else f"{check_before:.4g} -> {check_after:.4g}")
    return out, record


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The float teacher: a copy of `model` as it is now (its forward hooks, e.g. rotations, included)."""
    return copy.deepcopy(model).eval().requires_grad_(False)


__all__ = ["TuneConfig", "tune_quantized", "fake_quantize_activations", "frozen_copy", "OTHER_LR_RATIO"]
