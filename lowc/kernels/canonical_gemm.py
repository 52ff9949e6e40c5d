"""Triton GEMMs that read lowc's packed weights in their artifact layout (docs/FORMAT.md), one launch per product.

They are the kernels of the ahead-of-time TensorRT plugins (`lowc/export/tensorrt_aot.py`). An AOT plugin gets
exactly the tensors of its ONNX node and launches one kernel, so the weights arrive as the artifact stores them, not
in the layouts lowc's runtime kernels convert them to at load time (`lowbit_layout`, `vnm_layout`, `btc_layout`).
Each kernel's non-constexpr parameters follow TensorRT's AOT calling convention: the input pointers in the node's
order, then int32 scalars (all derived from the input shapes), then the output pointer.

- `bitfield_gemm_kernel` (Int6Gemm, BTCGemm): Y = X Wᵀ, W [N, K] of `BITS`-bit two's-complement codes stored as
  each row's little-endian bit stream (code k at bit k·BITS; the INT8/6/4/3/2 layouts of `packing.py` are all this
  stream), times one scale per row per `GROUP` columns.
- `vnm_gemm_kernel` / `vnm_qgemm_kernel` (VNMGemm, VNMQGemm): W in V:N:M form. A program owns `BLOCK_N` rows of
  one V-row block, which share each M-column block's 4 kept columns: it gathers those 4 columns of X per block and
  multiplies them by the rows' 2-of-4 values spread over 4 slots (zeros elsewhere), a dense product over 4/M of K.

Both dequantize a weight tile to X's dtype and accumulate in fp32 on the tensor cores (fp32 X: IEEE products).
They are plain tiled GEMMs, correct for every shape, not tuned: the runtime keeps its own kernels.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _bitfield_codes(q_ptr, rows, cols, row_bytes, row_ok, col_ok, BITS: tl.constexpr):
    """int32 codes at (rows [R, 1], cols [1, C]) of a row-major bit-stream matrix with `row_bytes` bytes a row."""
    bit = cols * BITS
    byte = bit // 8
    base = q_ptr + rows.to(tl.int64) * row_bytes + byte
    lo = tl.load(base, mask=row_ok & col_ok, other=0).to(tl.int32) & 0xFF
    hi = tl.load(base + 1, mask=row_ok & col_ok & (byte + 1 < row_bytes), other=0).to(tl.int32) & 0xFF
    code = ((lo | (hi << 8)) >> (bit % 8)) & ((1 << BITS) - 1)
    return code - ((code >> (BITS - 1)) << BITS)  # two's complement sign


@triton.jit
def _dot(acc, x, w, IEEE: tl.constexpr):
    """acc + x @ wᵀ (fp32 operands with IEEE products when `IEEE`, else 16-bit tensor-core products)."""
    if IEEE:
        return tl.dot(x, tl.trans(w), acc, input_precision="ieee")
    return tl.dot(x, tl.trans(w), acc)


@triton.jit
def bitfield_gemm_kernel(x_ptr, q_ptr, s_ptr, M, N, K, ROW_BYTES, GROUPS, y_ptr,
                         BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    """y [M, N] = x [M, K] @ (codes * scales)ᵀ; codes [N, ROW_BYTES] bit streams, scales [N, GROUPS] fp16.
    When BLOCK_K divides GROUP a K tile lies in one group and loads one scale per row."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm[:, None] < M, rn[:, None] < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)[None, :]
        k_ok = rk < K
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * K + rk, mask=m_ok & k_ok, other=0.0)
        codes = _bitfield_codes(q_ptr, rn[:, None], rk, ROW_BYTES, n_ok, k_ok, BITS)
        if GROUP % BLOCK_K == 0:
            scale = tl.load(s_ptr + rn[:, None].to(tl.int64) * GROUPS + k0 // GROUP, mask=n_ok, other=0.0)
        else:
            scale = tl.load(s_ptr + rn[:, None].to(tl.int64) * GROUPS + rk // GROUP, mask=n_ok & k_ok, other=0.0)
        w = (codes.to(tl.float32) * scale.to(tl.float32)).to(x.dtype)
        acc = _dot(acc, x, w, x.dtype == tl.float32)
    tl.store(y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok & (rn[None, :] < N))


@triton.jit
def _vnm_gemm(x_ptr, v_ptr, s_ptr, c_ptr, p_ptr, M, N, K, KB, VALUE_STRIDE, POS_BYTES, GROUPS, y_ptr,
              V: tl.constexpr, BLOCK_COLS: tl.constexpr, QUANT: tl.constexpr, BITS: tl.constexpr,
              GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    """The V:N:M product; values are floats [N, 2·KB] (VALUE_STRIDE per row) or, with QUANT, bit-stream codes
    [N, VALUE_STRIDE bytes] times scales [N, GROUPS] over groups of GROUP kept values."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row0 = tl.program_id(1) * BLOCK_N
    rn = row0 + tl.arange(0, BLOCK_N)
    vblock = row0 // V  # BLOCK_N divides V: every row of the tile shares the block's kept columns
    m_ok, n_ok = rm[:, None] < M, rn[:, None] < N
    slot = tl.arange(0, 4)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for b0 in range(0, KB, BLOCK_B):
        rb = b0 + tl.arange(0, BLOCK_B)
        b_ok = rb < KB
        cols = tl.load(c_ptr + (vblock.to(tl.int64) * KB + rb[:, None]) * 4 + slot[None, :], mask=b_ok[:, None],
                       other=0).to(tl.int32) & 0xFF
        k_idx = tl.reshape(rb[:, None] * BLOCK_COLS + cols, (BLOCK_B * 4,))
        k_ok = tl.reshape(b_ok[:, None] & (slot[None, :] < 4), (BLOCK_B * 4,)) & (k_idx < K)
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * K + k_idx[None, :], mask=m_ok & k_ok[None, :], other=0.0)
        e0 = 2 * rb[None, :]  # value index of each row's first kept value in the block; e0 + 1 the second
        pos = tl.load(p_ptr + rn[:, None].to(tl.int64) * POS_BYTES + e0 // 4, mask=n_ok & b_ok[None, :],
                      other=0).to(tl.int32) & 0xFF
        p0 = (pos >> (2 * (e0 % 4))) & 3
        p1 = (pos >> (2 * (e0 % 4) + 2)) & 3
        ok = n_ok & b_ok[None, :]
        if QUANT:
            c0 = _bitfield_codes(v_ptr, rn[:, None], e0, VALUE_STRIDE, n_ok, b_ok[None, :], BITS)
            c1 = _bitfield_codes(v_ptr, rn[:, None], e0 + 1, VALUE_STRIDE, n_ok, b_ok[None, :], BITS)
            s_row = s_ptr + rn[:, None].to(tl.int64) * GROUPS
            v0 = c0.to(tl.float32) * tl.load(s_row + e0 // GROUP, mask=ok, other=0.0).to(tl.float32)
            v1 = c1.to(tl.float32) * tl.load(s_row + (e0 + 1) // GROUP, mask=ok, other=0.0).to(tl.float32)
        else:
            v_row = v_ptr + rn[:, None].to(tl.int64) * VALUE_STRIDE
            v0 = tl.load(v_row + e0, mask=ok, other=0.0).to(tl.float32)
            v1 = tl.load(v_row + e0 + 1, mask=ok, other=0.0).to(tl.float32)
        s3 = slot[None, None, :]
        w = tl.where(s3 == p0[:, :, None], v0[:, :, None], tl.where(s3 == p1[:, :, None], v1[:, :, None], 0.0))
        w = tl.reshape(w, (BLOCK_N, BLOCK_B * 4)).to(x.dtype)
        acc = _dot(acc, x, w, x.dtype == tl.float32)
    tl.store(y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok & (rn[None, :] < N))


@triton.jit
def vnm_gemm_kernel(x_ptr, values_ptr, columns_ptr, positions_ptr, M, N, K, KB, VALUE_STRIDE, POS_BYTES, y_ptr,
                    V: tl.constexpr, BLOCK_COLS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_B: tl.constexpr):
    """y = x Wᵀ for a float V:N:M weight (values [N, 2·KB], columns [ceil(N/V), KB, 4], positions [N, POS_BYTES])."""
    _vnm_gemm(x_ptr, values_ptr, values_ptr, columns_ptr, positions_ptr, M, N, K, KB, VALUE_STRIDE, POS_BYTES, 1,
              y_ptr, V, BLOCK_COLS, False, 8, 1, BLOCK_M, BLOCK_N, BLOCK_B)


@triton.jit
def vnm_qgemm_kernel(x_ptr, q_ptr, s_ptr, columns_ptr, positions_ptr, M, N, K, KB, ROW_BYTES, POS_BYTES, GROUPS,
                     y_ptr, V: tl.constexpr, BLOCK_COLS: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    """y = x Wᵀ for a V:N:M weight whose kept values are BITS-bit codes [N, ROW_BYTES] times scales [N, GROUPS]."""
    _vnm_gemm(x_ptr, q_ptr, s_ptr, columns_ptr, positions_ptr, M, N, K, KB, ROW_BYTES, POS_BYTES, GROUPS, y_ptr,
              V, BLOCK_COLS, True, BITS, GROUP, BLOCK_M, BLOCK_N, BLOCK_B)


__all__ = ["bitfield_gemm_kernel", "vnm_gemm_kernel", "vnm_qgemm_kernel"]
