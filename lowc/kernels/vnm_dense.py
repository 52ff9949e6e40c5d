"""A V:N:M weight in the sparse-tensor-core layout expanded back to a dense matrix, on the GPU, for prefill.

lowc's V:N:M SpMM (`vnm_spmm.py`) wins where products are memory-bound (decode) but its prefill tiles reach a
fraction of what a dense cuBLAS GEMM does (benchmarks/NOTES.md, V:N:M SpMM). For many tokens the runtime instead
writes the weight out densely into a transient buffer (zeros where it is pruned) and calls cuBLAS: the expansion
reads the 2/M kept values once and writes one dense matrix, small next to a GEMM of hundreds of tokens, and the
product is the one the sparse kernel computes (the same 16-bit values, fp32 accumulation), to rounding order.

`vnm_dense_kernel` reads the kernel layout directly (values in mma.sp fragment order, the metadata words, the
gathered column indices of each V-row block; `vnm_layout.decode_gathered` spells out the same fragment rules in
torch), one program per 16 rows x 32 gathered columns, and scatters each kept value to its dense column.

INT8 values (A8/A6 inputs) expand the same way (`vnm_int8_dense_kernel`, the m16n8k32 fragments of
`decode_gathered_int8`, either metadata reading) into the INT8 layout of the Triton W8A8 GEMM (`wa8_gemm`), which
quantizes the activations per token exactly as the sparse INT8 kernel does. Its scales carry over unchanged: a row
scale stays a row scale, and a group of g kept values is g/2 column blocks, i.e. g·M/2 consecutive dense columns,
which is the dense weight's scale group (used where the GEMM's K tiles fit it: g·M/2 a multiple of 32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .lowbit_layout import K_ALIGN, LowbitWeight
from .vnm_layout import VNMInt8Weight, VNMKernelWeight

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


@triton.jit
def vnm_int8_dense_kernel(values_ptr, meta_ptr, columns_ptr, out_ptr, rows, cols, kp_count, col_stride, out_stride,
                          V: tl.constexpr, ROWS_META: tl.constexpr):
    rt = tl.program_id(0)
    kp = tl.program_id(1)
    e = tl.arange(0, 512)  # the 32 lanes x 16 codes of one k32-step pair
    lane = e // 16
    g = lane // 4
    t = lane % 4
    stl = (e // 8) % 2
    h = (e // 4) % 2
    c = 2 * t + (e // 2) % 2  # chunk within the k32 step
    j = e % 2
    tile = rt.to(tl.int64) * kp_count + kp
    value = tl.load(values_ptr + tile * 512 + e)
    if ROWS_META:  # lane 4g+h: all 8 chunks of row g + 8h
        word = tl.load(meta_ptr + tile * 32 + g * 4 + h * 2 + stl)
        nibble = (word >> (4 * c)) & 0xF
    else:  # lane 4g+h: chunks 4h..4h+3 of rows g (bits 15:0) and g + 8 (bits 31:16)
        word = tl.load(meta_ptr + tile * 32 + g * 4 + (c // 4) * 2 + stl)
        nibble = (word >> (16 * h + 4 * (c % 4))) & 0xF
    idx = (nibble >> (2 * j)) & 3
    row = 16 * rt + 8 * h + g
    gathered = 64 * kp + 32 * stl + 4 * c + idx
    col = tl.load(columns_ptr + (row // V).to(tl.int64) * col_stride + gathered)
    keep = (row < rows) & (col < cols)
    tl.store(out_ptr + row.to(tl.int64) * out_stride + col, value, mask=keep)


def dense_group(kept_group: int | None, m: int) -> int | None:
    """The dense scale group of V:N:M INT8 scales over groups of `kept_group` kept values (None: row scales, which
    give 0) once expanded for `wa8_gemm`: g·M/2 columns, or None when the GEMM's K tiles cannot fit it (not a
    multiple of 32)."""
    if kept_group is None:
        return 0
    group = kept_group * m // 2  # g kept values = g/2 column blocks of M columns
    return group if group % 32 == 0 else None


def dense_int8_group(w: VNMInt8Weight) -> int | None:
    """`dense_group` of an INT8 V:N:M weight in the kernel layout."""
    return dense_group(32 * w.group_pairs if w.group_pairs else None, w.m)


def vnm_int8_lowbit(w: VNMInt8Weight) -> LowbitWeight | None:
    """The INT8 V:N:M weight as a dense INT8 `LowbitWeight` (codes [rows, k_pad], zeros where pruned, fp16 scales),
    or None when its scale groups do not fit `wa8_gemm` (see `dense_int8_group`)."""
    group = dense_int8_group(w)
    if group is None:
        return None
    k_pad = -(-w.cols // K_ALIGN) * K_ALIGN
    codes = torch.zeros(w.rows, k_pad, dtype=torch.int8, device=w.values.device)
    nrt, kp2 = w.values.shape[:2]
    vnm_int8_dense_kernel[(nrt, kp2)](w.values, w.meta, w.columns, codes, w.rows, w.cols, kp2, w.columns.stride(0),
                                      k_pad, V=w.v, ROWS_META=w.meta_mode == "rows")
    if not group:
        return LowbitWeight(8, k_pad, w.rows, w.cols, k_pad, codes, None, w.scales[None, :w.rows].half())
    groups = -(-k_pad // group)
    scales = torch.ones(groups, w.rows, dtype=torch.float16, device=w.values.device)
    used = min(groups, w.scales.shape[0])
    scales[:used] = w.scales[:used, :w.rows].half()  # fp16 artifact scales, held as fp32: exact both ways
    return LowbitWeight(8, group, w.rows, w.cols, k_pad, codes, None, scales)


def vnm_dense_linear(x: torch.Tensor, w: VNMKernelWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x Wᵀ (+ bias) through the expanded weight and cuBLAS: the prefill path of 16-bit V:N:M weights."""
    return torch.nn.functional.linear(x, vnm_dense_weight(w), bias)


__all__ = ["DENSE_PREFILL_TOKENS", "vnm_dense_kernel", "vnm_dense_weight", "vnm_dense_linear",
           "vnm_int8_dense_kernel", "dense_group", "dense_int8_group", "vnm_int8_lowbit"]
