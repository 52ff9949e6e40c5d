"""Reference implementations of every packed weight format: plain torch, any device, the ground truth.

Fast kernels are tested against these functions and the runtime falls back to them where no kernel fits.
"""

from __future__ import annotations

import torch

from .hadamard import rotate_inputs
from .packing import unpack_2bit, unpack_int


def dequantize_int(qweight: torch.Tensor, scales: torch.Tensor, bits: int, group: int, columns: int) -> torch.Tensor:
    """Packed symmetric integer codes [R, packed] and scales [R, ceil(C/G)] -> float32 [R, C]."""
    codes = unpack_int(qweight, bits, columns).float()
    expanded = scales.float().repeat_interleave(group, dim=1)[:, :columns]
    return codes * expanded


def vnm_to_dense(values: torch.Tensor, columns: torch.Tensor, positions: torch.Tensor,
                 v: int, m: int, shape: tuple[int, int]) -> torch.Tensor:
    """Canonical V:N:M storage -> the dense [R, K] matrix it encodes (zeros where pruned).

    `positions` may be the packed 2-bit form [R, ceil(2*Kb/4)] or unpacked [R, Kb, 2].
    """
    rows, cols = shape
    kb = columns.shape[1]
    if positions.dim() == 2:
        positions = unpack_2bit(positions, 2 * kb).reshape(rows, kb, 2)
    block_cols = columns.long().repeat_interleave(v, dim=0)[:rows]
    within = torch.gather(block_cols, 2, positions.long())
    index = (within + torch.arange(kb, device=values.device).view(1, kb, 1) * m).reshape(rows, 2 * kb)
    dense = torch.zeros(rows, kb * m, dtype=values.dtype, device=values.device)
    dense.scatter_(1, index, values)
    return dense[:, :cols]


def dense_weight(tensors: dict[str, torch.Tensor], scheme) -> torch.Tensor:
    """The float32 weight [R, K] that a module's packed tensors encode, for any lowc scheme."""
    rows, cols = scheme.shape
    if scheme.vnm is not None:
        kb = tensors["columns"].shape[1]
        if scheme.bits is not None:
            values = dequantize_int(tensors["qweight"], tensors["scales"], scheme.bits, scheme.group, 2 * kb)
        else:
            values = tensors["values"].float()
        return vnm_to_dense(values, tensors["columns"], tensors["positions"], scheme.vnm.v, scheme.vnm.m, (rows, cols))
    if scheme.bits is not None:
        return dequantize_int(tensors["qweight"], tensors["scales"], scheme.bits, scheme.group, cols)
    return tensors["weight"].float()


def group_count(in_features: int, group: int) -> int:
    """Number of groups of `group` consecutive input channels (the last one may be short)."""
    return -(-in_features // group)


def group_sums(x: torch.Tensor, group: int) -> torch.Tensor:
    """Sums of `group` consecutive channels of the last dim: [..., K] -> [..., ceil(K / group)] (zero padded).

    The input of a SLoRB branch (`scheme.slorb_group`): the branch adds `group_sums(x, group) @ S.T`.
    """
    k = x.shape[-1]
    pad = group_count(k, group) * group - k
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.unflatten(-1, (-1, group)).sum(-1)


def quantize_activations(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (last dimension) symmetric quantization as the A8/A6 GEMM kernels do it: (int8 codes, fp32 scales).

    scale = absmax / qmax (1 for an all-zero row), codes = round half away from zero of x / scale, clamped to
    [-qmax, qmax] with qmax = 2^(bits-1) - 1.
    """
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    amax = xf.abs().amax(-1)
    # tensor / tensor: torch on CUDA turns a division by a Python scalar into a product with its reciprocal
    scale = torch.where(amax > 0, amax / torch.full_like(amax, qmax), torch.ones_like(amax))
    v = xf / scale.unsqueeze(-1)
    q = torch.where(v < 0, -torch.floor(-v + 0.5), torch.floor(v + 0.5)).clamp(-qmax, qmax)
    return q.to(torch.int8), scale


def packed_linear(x: torch.Tensor, tensors: dict[str, torch.Tensor], scheme) -> torch.Tensor:
    """y = x W^T (+ b) (+ SLoRB) with W decoded from its packed form; returns x's dtype.

    With `scheme.abits` the inputs are quantized per token first (after dividing them per channel by `smooth` when
    the scheme has it) and the product is taken on the integer codes in float64 (exact, like the kernels' int32
    accumulation) before the weight and activation scales are applied. With `scheme.rotate` the inputs are first
    rotated by the block Hadamard transform the stored weight was rotated by (`hadamard.py`, in float32). With
    `scheme.slorb_group` the module's SLoRB branch `group_sums(x, slorb_group) @ S.T` (S = the `slorb` tensor
    [R, ceil(K / slorb_group)]) is added, computed on the module's unquantized input x.
    """
    if getattr(scheme, "rotate", None):
        x = rotate_inputs(x.float(), scheme.rotate).to(x.dtype)
    weight = dense_weight(tensors, scheme)
    bias = tensors.get("bias")
    slorb = getattr(scheme, "slorb_group", None)
    if getattr(scheme, "abits", None) is None:
        y = torch.nn.functional.linear(x.float(), weight, None if bias is None else bias.float())
        if slorb:
            y = y + torch.nn.functional.linear(group_sums(x.float(), slorb), tensors["slorb"].float())
        return y.to(x.dtype)
    xs = x.float() / tensors["smooth"] if getattr(scheme, "smooth", False) else x
    codes, scale = quantize_activations(xs, scheme.abits)
    y = torch.nn.functional.linear(codes.double(), weight.double()) * scale.double().unsqueeze(-1)
    if bias is not None:
        y = y + bias.double()
    if slorb:
        y = y + torch.nn.functional.linear(group_sums(x.double(), slorb), tensors["slorb"].double())
    return y.to(x.dtype)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                        sm_scale: float | None = None, return_lse: bool = False,
                        kv_lens: torch.Tensor | None = None):
    """softmax(q k^T * sm_scale) v in float32: the ground truth for the attention kernels.

    q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] with Hq a multiple of Hkv (query head h uses KV head h // (Hq/Hkv)).
    The causal mask is bottom-right aligned: query i sees keys up to i + Sk - Sq, as in decode with a cache; a
    row that sees no key gives zeros (and LSE -inf). sm_scale defaults to 1/sqrt(D). With return_lse also the
    natural-log sum of exp of the scaled scores [B, Hq, Sq]. With `kv_lens` [B] sequence b has only its first
    kv_lens[b] keys (the causal alignment then counts from them): a batch of caches of different lengths. Returns
    float32.
    """
    q, k, v = q.float(), k.float(), v.float()
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    sq, sk = q.shape[-2], k.shape[-2]
    if kv_lens is not None:
        lens = kv_lens.to(q.device, torch.long)[:, None, None]  # [B, 1, 1]
        cols = torch.arange(sk, device=q.device)[None, None, :]
        visible = cols < lens
        if causal:
            visible = visible & (cols <= lens - sq + torch.arange(sq, device=q.device)[None, :, None])
        scores = scores.masked_fill(~visible[:, None], float("-inf"))
        v = v.masked_fill(~(cols < lens)[..., None], 0.0)  # whatever lies past a cache's end
    elif causal:
        visible = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.clamp_min(torch.finfo(torch.float32).min)[..., None])
    out = torch.matmul(probs, v)
    return (out, lse) if return_lse else out
