"""SageAttention in a single Triton kernel: the quantization happens inside the attention kernel.

lowc's runtime kernel (`sage_attention.py`) smooths and quantizes K (and V for FP8) in two passes before the
attention kernel, which is the fast way when Python launches the kernels. A TensorRT AOT plugin launches exactly one
kernel with the node's tensors (Q, K, V, bias) as they are, so this kernel does it all in one program per block of
BLOCK_M query rows of one head:
1. the smoothing mean of K over the keys of its KV head, from every `k_stride`-th key (all keys up to 2047, then 1024
   to 2047 of them; any subtracted vector leaves the result exact, since every score of a row moves by the same
   q·mean);
2. Q to INT8 per token, with the softmax scale and log2(e) folded into its scale;
3. per block of BLOCK_N keys: K − mean to INT8 with one absmax/127 scale per block (the runtime kernel's
   granularity), the int8 × int8 → int32 product, the additive bias per key, the causal mask (bottom-right
   aligned), online softmax in exp2, and P·V in V's own type (fp16/bf16, tf32 for fp32) with fp32 accumulation.

Every program recomputes the mean and the K blocks' quantization that the runtime computes once: the price of one
launch. The bias is the ONNX node's additive bias, broadcast to [B, Hq, Sq, Sk] from a shape [B or 1, 1, 1, Sk or 1]
(lowc exports key-padding masks of shape [B, 1, 1, S] and a [1, 1, 1, 1] zero). GQA/MQA map query head h to KV head
h // (Hq / Hkv). Tensors are contiguous [B, H, S, D] with D ≤ 256 (padded to a power of two by masking).

The non-constexpr parameters follow TensorRT's AOT convention (input pointers, int32 scalars, output pointer); see
`lowc/export/tensorrt_aot.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sage_attention import LOG2E
from .sage_attention import _block_d as block_d  # the head dim padded to a power of two >= 32

MEAN_SAMPLES = 1024  # the smoothing mean samples every (Sk // MEAN_SAMPLES)-th key: 1024 to 2047 of them
_LOG2E = tl.constexpr(LOG2E)
_MEAN_SAMPLES = tl.constexpr(MEAN_SAMPLES)


@triton.jit
def sage_single_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, seqlen_q, seqlen_k, heads_q, heads_kv, bias_stride_b,
                       bias_stride_k, y_ptr, SCALE: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads_q
    h = bh % heads_q
    hk = h // (heads_q // heads_kv)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_base = q_ptr + bh.to(tl.int64) * seqlen_q * HEAD_DIM
    kv_offset = (b.to(tl.int64) * heads_kv + hk) * seqlen_k * HEAD_DIM
    k_base = k_ptr + kv_offset
    v_base = v_ptr + kv_offset

    # 1. the smoothing mean of K over every k_stride-th key
    k_stride = tl.maximum(seqlen_k // _MEAN_SAMPLES, 1)
    samples = tl.cdiv(seqlen_k, k_stride)
    ksum = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, samples, BLOCK_N):
        rows = (s0 + offs_n) * k_stride
        k = tl.load(k_base + rows[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :],
                    mask=(rows < seqlen_k)[:, None] & d_ok[None, :], other=0.0)
        ksum += tl.sum(k.to(tl.float32), 0)
    mean = ksum / samples.to(tl.float32)

    # 2. Q to INT8 per token; the row scale q_rs turns an int32 score into a log2-domain logit
    q_ok = (offs_m < seqlen_q)[:, None] & d_ok[None, :]
    q = tl.load(q_base + offs_m[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :], mask=q_ok, other=0.0)
    q = q.to(tl.float32)
    q_amax = tl.max(tl.abs(q), 1)
    q_scale = tl.where(q_amax > 0, q_amax / 127.0, 1.0)
    qi = q * (1.0 / q_scale)[:, None]
    qi = (qi + tl.where(qi >= 0, 0.5, -0.5)).to(tl.int8)  # round half away from zero
    q_rs = q_scale * (SCALE * _LOG2E)

    # 3. online softmax over the key blocks this row block sees
    causal_off = seqlen_k - seqlen_q  # query i sees keys <= i + causal_off
    if CAUSAL:
        hi = tl.maximum(tl.minimum(start_m + BLOCK_M + causal_off, seqlen_k), 0)
    else:
        hi = seqlen_k
    bias_base = bias_ptr + b.to(tl.int64) * bias_stride_b
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: rows that see no key keep p = 0, no NaN
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < seqlen_k
        kv_ok = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :], mask=kv_ok, other=0.0)
        k = tl.where(kv_ok, k.to(tl.float32) - mean[None, :], 0.0)
        k_amax = tl.max(tl.max(tl.abs(k), 1), 0)
        k_scale = tl.where(k_amax > 0, k_amax / 127.0, 1.0)
        ki = k * (1.0 / k_scale)
        ki = (ki + tl.where(ki >= 0, 0.5, -0.5)).to(tl.int8)
        s = tl.dot(qi, tl.trans(ki)).to(tl.float32) * (q_rs * k_scale)[:, None]
        bias = tl.load(bias_base + cols.to(tl.int64) * bias_stride_k, mask=col_ok, other=0.0).to(tl.float32)
        s += tl.maximum(bias, -1.0e30)[None, :] * _LOG2E  # a finfo.min padding bias stays finite
        keep = col_ok[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None] + causal_off)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :], mask=kv_ok, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new

    out = acc * (1.0 / tl.where(l_i > 0, l_i, 1.0))[:, None]
    tl.store(y_ptr + bh.to(tl.int64) * seqlen_q * HEAD_DIM + offs_m[:, None].to(tl.int64) * HEAD_DIM
             + offs_d[None, :], out.to(y_ptr.dtype.element_ty), mask=q_ok)


def bias_strides(bias_shape, is_one=lambda d: int(d) == 1) -> tuple:
    """(batch, key) element strides of a contiguous additive bias of shape [B or 1, 1, 1, Sk or 1] broadcast over
    [B, Hq, Sq, Sk]: 0 along a broadcast (size-1) dimension. The dimensions may be symbolic (TensorRT shape
    expressions) given an `is_one` that recognises a constant 1."""
    if len(bias_shape) != 4 or not (is_one(bias_shape[1]) and is_one(bias_shape[2])):
        raise ValueError("the single-kernel SageAttention takes a bias of shape [B or 1, 1, 1, Sk or 1] (a per-key "
                         f"bias such as a padding mask), got {list(bias_shape)}")
    stride_k = 0 if is_one(bias_shape[3]) else 1
    return (0 if is_one(bias_shape[0]) else (bias_shape[3] if stride_k else 1)), stride_k


def sage_single(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None, *,
                causal: bool = False, sm_scale: float | None = None, block_m: int = 64, block_n: int = 64,
                num_warps: int = 4) -> torch.Tensor:
    """softmax(q kᵀ·sm_scale + bias (+ causal mask)) v by `sage_single_kernel`, for q [B, Hq, Sq, D] and k, v
    [B, Hkv, Sk, D] (contiguous; fp16, bf16 or fp32) and `bias` [B or 1, 1, 1, Sk or 1]: the computation of the
    TensorRT AOT SageAttention plugin, launched from Python (tests and benchmarks)."""
    batch, heads_q, seqlen_q, head_dim = q.shape
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    if bias is None:
        bias = torch.zeros(1, 1, 1, 1, device=q.device)
    stride_b, stride_k = bias_strides(bias.shape)
    q, k, v, bias = q.contiguous(), k.contiguous(), v.contiguous(), bias.contiguous()
    out = torch.empty_like(q)
    grid = (triton.cdiv(seqlen_q, block_m), batch * heads_q, 1)
    sage_single_kernel[grid](q, k, v, bias, seqlen_q, seqlen_k, heads_q, heads_kv, stride_b, stride_k, out,
                             SCALE=float(head_dim ** -0.5 if sm_scale is None else sm_scale), CAUSAL=bool(causal),
                             HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), BLOCK_M=block_m,
                             BLOCK_N=block_n, num_warps=num_warps)
    return out


__all__ = ["sage_single", "sage_single_kernel", "bias_strides", "block_d"]
