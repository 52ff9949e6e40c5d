"""Per-channel scaling that makes a layer easier to quantize without changing what it computes.

A Linear computes X W^T = (X / s)(W s)^T for any positive per-input-channel factors s. Dividing the activations
by s is free when the op that produces them (an RMSNorm, or a Linear whose output rows feed them) absorbs 1/s, so
the factors fold into the weights and nothing changes at run time. Where no op can absorb them (BERT's post-norm
LayerNorms also feed the residual stream; a GELU sits between its MLP Linears), SmoothQuant factors are kept
*online*: the module stores them (`smooth`) and its A8/A6 input quantization divides by them first, a per-channel
multiply inside a pass that reads every activation anyway.

- **SmoothQuant** (arXiv 2211.10438, `smooth`): s_j = max|X_j|^a / max|W_:j|^(1-a) migrates activation outliers into
  the weights, so per-token A8/A6 quantization loses less; `a` is the migration strength.
- **AWQ** (arXiv 2306.00978, `awq`): s_j = mean|X_j|^a protects the weights of salient input channels from rounding.

For each group of Linears that read the same channels, the strength `a` is either fixed or searched on a grid,
keeping the value whose quantized group (weights rounded to nearest, inputs quantized per token when the scheme
says so) best reproduces the dense outputs on a sample of calibration tokens; "no scaling" is always a candidate,
so the search never makes the calibration error worse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ...kernels.reference import quantize_activations
from ..calibration import walk_layers
from .clip import clip_scales, input_grams
from .rtn import quantize_rtn

KINDS = ("smooth", "awq")
SMOOTH_GRID = tuple(round(0.1 * i, 2) for i in range(1, 10))
AWQ_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))
_S_RANGE = (1e-4, 1e4)


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read the output channels of one op (`prev`), which absorbs 1/s.

    `repeat` > 1 when each channel of `prev` feeds `repeat` consecutive blocks of `block` input columns of the
    Linears (a GQA v_proj feeding o_proj: every KV head serves `repeat` query heads). `online`: `prev` cannot absorb
    1/s, the Linears divide their inputs themselves (only worth it, and only done, before A8/A6 quantization).
    """

    prev: str
    linears: tuple[str, ...]
    repeat: int = 1
    block: int = 0
    online: bool = False

    def expand(self, s: torch.Tensor) -> torch.Tensor:
        """Factors of `prev`'s channels -> factors of the Linears' input columns."""
        if self.repeat == 1:
            return s
        return s.view(-1, 1, self.block).expand(-1, self.repeat, self.block).reshape(-1)

    def reduce(self, per_column: torch.Tensor) -> torch.Tensor:
        """A per-input-column statistic of the Linears -> one value per channel of `prev` (the max of its copies)."""
        if self.repeat == 1:
            return per_column
        return per_column.view(-1, self.repeat, self.block).amax(1).reshape(-1)


def scale_groups(model: torch.nn.Module) -> dict[str, list[ScaleGroup]]:
    """The groups of every layer, by layer prefix. Llama (all folded): norm -> q/k/v, v -> o, norm -> gate/up,
    up -> down. BERT: v -> o folded; norm -> q/k/v, norm -> intermediate and intermediate -> output online."""
    if getattr(model, "kind", None) == "encoder":
        out = {}
        for i in range(len(model.encoder.layer)):
            p = f"encoder.layer.{i}"
            out[p] = [
                ScaleGroup("embeddings.LayerNorm" if i == 0 else f"encoder.layer.{i - 1}.output.LayerNorm",
                           tuple(f"{p}.attention.self.{n}" for n in ("query", "key", "value")), online=True),
                ScaleGroup(f"{p}.attention.self.value", (f"{p}.attention.output.dense",)),
                ScaleGroup(f"{p}.attention.output.LayerNorm", (f"{p}.intermediate.dense",), online=True),
                ScaleGroup(f"{p}.intermediate.dense", (f"{p}.output.dense",), online=True),
            ]
        return out
    out = {}
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}"
        attn = layer.self_attn
        out[p] = [
            ScaleGroup(f"{p}.input_layernorm", tuple(f"{p}.self_attn.{n}_proj" for n in "qkv")),
            ScaleGroup(f"{p}.self_attn.v_proj", (f"{p}.self_attn.o_proj",), attn.n_heads // attn.n_kv_heads,
                       attn.head_dim),
            ScaleGroup(f"{p}.post_attention_layernorm", (f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj")),
            ScaleGroup(f"{p}.mlp.up_proj", (f"{p}.mlp.down_proj",)),
        ]
    return out


def candidate_scales(kind: str, alpha: float, act_absmax: torch.Tensor, act_absmean: torch.Tensor,
                     weight_absmax: torch.Tensor) -> torch.Tensor:
    """Factors s [C] for migration strength `alpha`; channels without signal (zero statistics) keep s = 1."""
    if kind == "smooth":
        s = act_absmax.pow(alpha) / weight_absmax.pow(1 - alpha)
        dead = (act_absmax <= 0) | (weight_absmax <= 0)
    else:
        s = act_absmean.pow(alpha)
        dead = act_absmean <= 0
        live = s[~dead]
        if live.numel():
            s = s / (live.max() * live.min()).sqrt()
    s = torch.where(dead | ~torch.isfinite(s), torch.ones_like(s), s)
    return s.clamp(*_S_RANGE)


@dataclass
class GroupInputs:
    """Statistics of a group's input channels over all calibration tokens, plus a strided sample of tokens."""

    absmax: torch.Tensor
    abssum: torch.Tensor
    count: int
    sample: list[torch.Tensor]


def _group_error(x: torch.Tensor, weights: list[torch.Tensor], refs: list[torch.Tensor], s: torch.Tensor,
                 quantize_weight: list[Callable[[torch.Tensor], torch.Tensor]], abits: list[int | None]) -> float:
    """Sum over the group's Linears of ||Q(x/s) Q(W s)^T - x W^T||^2 / ||x W^T||^2."""
    total = 0.0
    xs = x / s
    for w, ref, qw, ab in zip(weights, refs, quantize_weight, abits):
        xq = xs
        if ab is not None:
            codes, scale = quantize_activations(xs, ab)
            xq = codes.float() * scale[:, None]
        y = xq @ qw(w * s).T
        total += float((y - ref).double().pow(2).sum() / ref.double().pow(2).sum().clamp_min(1e-30))
    return total


def search_group(kind: str, inputs: GroupInputs, weights: list[torch.Tensor], group: ScaleGroup,
                 quantize_weight: list[Callable[[torch.Tensor], torch.Tensor]], abits: list[int | None],
                 alpha: float | None = None) -> tuple[torch.Tensor, dict]:
    """Choose the factors of one group: `alpha` fixed, or the best of the grid (and of no scaling).

    Returns (s over `prev`'s channels, a summary for the manifest).
    """
    x = torch.cat(inputs.sample).float()
    refs = [x @ w.T for w in weights]
    act_absmax = group.reduce(inputs.absmax.float())
    act_absmean = group.reduce((inputs.abssum / max(1, inputs.count)).float())
    weight_absmax = group.reduce(torch.stack([w.abs().amax(0) for w in weights]).amax(0))
    ones = torch.ones_like(act_absmax)
    base = _group_error(x, weights, refs, group.expand(ones), quantize_weight, abits)
    grid = (alpha,) if alpha is not None else (SMOOTH_GRID if kind == "smooth" else AWQ_GRID)
    best_alpha, best_s, best = None, ones, base
    for a in grid:
        s = candidate_scales(kind, a, act_absmax, act_absmean, weight_absmax)
        err = _group_error(x, weights, refs, group.expand(s), quantize_weight, abits)
        if err < best or alpha is not None:
            best_alpha, best_s, best = a, s, err
    summary = {"linears": list(group.linears), "alpha": best_alpha, "error_before": base, "error_after": best,
               "s_min": float(best_s.min()), "s_max": float(best_s.max())}
    return best_s, summary


@torch.no_grad()
def fold_scales(model: torch.nn.Module, group: ScaleGroup, s: torch.Tensor) -> None:
    """Divide `prev`'s output channels by s and multiply the Linears' input columns by s, in place (exact in
    real arithmetic: the model computes the same function)."""
    prev = model.get_submodule(group.prev)
    s = s.to(prev.weight.device)
    if isinstance(prev, torch.nn.Linear):
        prev.weight.div_(s[:, None].to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    else:
        prev.weight.div_(s.to(prev.weight.dtype))
    cols = group.expand(s)
    for name in group.linears:
        linear = model.get_submodule(name)
        linear.weight.mul_(cols[None, :].to(linear.weight.dtype))


@torch.no_grad()
def apply_online(model: torch.nn.Module, group: ScaleGroup, s: torch.Tensor) -> list[torch.utils.hooks.RemovableHandle]:
    """Multiply the Linears' input columns by s and make each divide its inputs by s (a forward pre-hook), so the
    in-memory model keeps its function for the rest of compression, as the runtime will with the stored factors."""
    cols = group.expand(s).float()
    handles = []
    for name in group.linears:
        linear = model.get_submodule(name)
        linear.weight.mul_(cols[None, :].to(linear.weight.device, linear.weight.dtype))

        def divide(module, args, cols=cols):
            return (args[0] / cols.to(args[0].device, args[0].dtype), *args[1:])
        handles.append(linear.register_forward_pre_hook(divide))
    return handles


@dataclass
class ScalingResult:
    """What `scale_model` chose: summaries by group (keyed by `prev`), clipped fp16 scales by module (AWQ), and the
    online factors by module (float32 [K], to store as the module's `smooth`)."""

    groups: dict[str, dict]
    clipped: dict[str, torch.Tensor]
    online: dict[str, torch.Tensor]


@torch.no_grad()
def scale_model(model: torch.nn.Module, ids: torch.Tensor, kind: str, schemes: dict, alpha: float | None = None,
                clip: bool = False, sample_tokens: int = 4096, batch_size: int = 8,
                progress: bool = True) -> ScalingResult:
    """Search and fold per-channel factors for every group whose Linears include a quantized one (`schemes`: module
    name -> ModuleScheme), walking the calibration samples layer by layer. Online groups are scaled only when all
    their Linears quantize their inputs (`abits`) and `kind` is smooth; the model keeps them as forward pre-hooks.

    With `clip`, each dense (not V:N:M) quantized Linear of a group also gets clipped round-to-nearest scales
    searched on the scaled inputs.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown scaling {kind!r} (expected one of {', '.join(KINDS)})")

    def wanted(g: ScaleGroup) -> bool:
        quantized = [schemes.get(n) is not None and schemes[n].bits is not None for n in g.linears]
        if g.online:
            return kind == "smooth" and all(quantized) and all(schemes[n].abits is not None for n in g.linears)
        return any(quantized)
    groups = {p: [g for g in gs if wanted(g)] for p, gs in scale_groups(model).items()}
    first = {g.linears[0]: g for gs in groups.values() for g in gs}
    stride = max(1, -(-ids.numel() // sample_tokens))
    seen: dict[str, GroupInputs] = {}
    summaries: dict[str, dict] = {}
    clipped: dict[str, torch.Tensor] = {}
    online: dict[str, torch.Tensor] = {}

    def observe(name: str, linear: torch.nn.Module):
        def record(module, args):
            if name not in first:
                return
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            entry = seen.get(name)
            if entry is None:
                entry = seen[name] = GroupInputs(torch.zeros(x.shape[1], device=x.device),
                                                 torch.zeros(x.shape[1], dtype=torch.float64, device=x.device), 0, [])
            entry.absmax = torch.maximum(entry.absmax, x.abs().amax(0))
            entry.abssum += x.abs().double().sum(0)
            entry.count += x.shape[0]
            entry.sample.append(x[::stride].clone())
        return record

    def weight_quantizer(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        scheme = schemes.get(name)
        if scheme is None or scheme.bits is None:
            return lambda w: w

        def rtn(w: torch.Tensor) -> torch.Tensor:
            codes, scales = quantize_rtn(w, scheme.bits, scheme.group)
            return codes.float() * scales.float().repeat_interleave(scheme.group, dim=1)[:, :w.shape[1]]
        return rtn

    def after(prefix: str, layer: torch.nn.Module) -> None:
        folded = []
        for group in groups.get(prefix, []):
            inputs = seen.pop(group.linears[0], None)
            if inputs is None:
                continue
            weights = [model.get_submodule(n).weight.detach().float() for n in group.linears]
            abits = [getattr(schemes.get(n), "abits", None) for n in group.linears]
            s, summaries[group.prev] = search_group(kind, inputs, weights, group,
                                                    [weight_quantizer(n) for n in group.linears], abits, alpha)
            if group.online:
                apply_online(model, group, s)
                online.update({n: group.expand(s).float().cpu().clone() for n in group.linears})
                summaries[group.prev]["online"] = True
            else:
                fold_scales(model, group, s)
            folded.append((group, inputs, s))
        if clip:  # after every fold of the layer: a later group rescales the rows of an earlier group's Linears
            for group, inputs, s in folded:
                x = torch.cat(inputs.sample).float() / group.expand(s).to(inputs.sample[0].device)
                summary = summaries[group.prev]["clip"] = {}
                grams: dict[int, torch.Tensor] = {}  # by group size
                for name in group.linears:
                    scheme = schemes.get(name)
                    if scheme is None or scheme.bits is None or scheme.vnm is not None:
                        continue
                    if scheme.group not in grams:
                        grams[scheme.group] = input_grams(x, scheme.group)
                    scales, summary[name] = clip_scales(
                        model.get_submodule(name).weight.detach().float(), grams[scheme.group],
                        scheme.bits, scheme.group)
                    clipped[name] = scales.cpu()

    walk_layers(model, ids, observe, "smoothing" if kind == "smooth" else "AWQ scales", after=after,
                batch_size=batch_size, progress=progress)
    return ScalingResult(summaries, clipped, online)


__all__ = ["ScaleGroup", "ScalingResult", "scale_groups", "candidate_scales", "search_group", "fold_scales",
           "apply_online", "scale_model", "KINDS"]
