"""Reference implementations of every packed weight format: plain torch, any device, the ground truth.

Fast kernels are tested against these functions and the runtime falls back to them where no kernel fits.
"""

from __future__ import annotations

import torch

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


def packed_linear(x: torch.Tensor, tensors: dict[str, torch.Tensor], scheme) -> torch.Tensor:
    """y = x W^T (+ b) with W decoded from its packed form; computes in float32, returns x's dtype."""
    weight = dense_weight(tensors, scheme)
    bias = tensors.get("bias")
    y = torch.nn.functional.linear(x.float(), weight, None if bias is None else bias.float())
    return y.to(x.dtype)
