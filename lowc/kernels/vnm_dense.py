"""A V:N:M weight in the sparse-tensor-core layout expanded back to a dense matrix, on the GPU, for prefill.

lowc's V:N:M SpMM (`vnm_spmm.py`) wins where products are memory-bound (decode) but its prefill tiles reach a
fraction of what a dense cuBLAS GEMM does (benchmarks/NOTES.md, V:N:M SpMM). For many tokens the runtime instead
writes the weight out densely into a transient buffer (zeros where it is pruned) and calls cuBLAS: the expansion
reads the 2/M kept values once and writes one dense matrix, small next to a GEMM of hundreds of tokens, and the
product is the one the sparse kernel computes (the same 16-bit values, fp32 accumulation), to rounding order.

`vnm_dense_kernel` reads the kernel layout directly (values in mma.sp fragment order, the metadata words, the
gathered column indices of each V-row block; `vnm_layout.decode_gathered` spells out the same fragment rules in
torch), one program per 16 rows x 32 gathered columns, and scatters each kept value to its dense column.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .vnm_layout import VNMKernelWeight

DENSE_PREFILL_TOKENS = 512  # from this many tokens on, PackedLinear expands the weight and calls cuBLAS


@triton.jit
def vnm_dense_kernel(values_ptr, meta_ptr, columns_ptr, out_ptr, rows, cols, kp_count, col_stride, V: tl.constexpr):
    rt = tl.program_id(0)
    kp = tl.program_id(1)
    e = tl.arange(0, 256)  # the 32 lanes x 8 values of one fragment tile
    lane = e // 8
    g = lane // 4
    t = lane % 4
    ktl = (e // 4) % 2
    h = (e // 2) % 2
    j = e % 2
    tile = rt.to(tl.int64) * kp_count + kp
    value = tl.load(values_ptr + tile * 256 + e)
    word = tl.load(meta_ptr + tile * 16 + g * 2 + ktl)
    idx = (word >> (16 * h + 4 * t + 2 * j)) & 3
    row = 16 * rt + 8 * h + g
    gathered = 32 * kp + 16 * ktl + 4 * t + idx
    col = tl.load(columns_ptr + (row // V).to(tl.int64) * col_stride + gathered)
    keep = (row < rows) & (col < cols)
    tl.store(out_ptr + row.to(tl.int64) * cols + col, value, mask=keep)


def vnm_dense_weight(w: VNMKernelWeight) -> torch.Tensor:
    """The dense weight [rows, cols] in the values' dtype (zeros where pruned) of a kernel-layout V:N:M weight."""
    out = torch.zeros(w.rows, w.cols, dtype=w.values.dtype, device=w.values.device)
    nrt, kp = w.values.shape[:2]
    vnm_dense_kernel[(nrt, kp)](w.values, w.meta, w.columns, out, w.rows, w.cols, kp, w.columns.stride(0), V=w.v)
    return out


def vnm_dense_linear(x: torch.Tensor, w: VNMKernelWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x Wᵀ (+ bias) through the expanded weight and cuBLAS: the prefill path of 16-bit V:N:M weights."""
    return torch.nn.functional.linear(x, vnm_dense_weight(w), bias)


__all__ = ["DENSE_PREFILL_TOKENS", "vnm_dense_kernel", "vnm_dense_weight", "vnm_dense_linear"]
