"""SageAttention in Triton: INT8 Q·K^T with K smoothing, FP8 (or 16-bit) P·V with FP32 accumulation.

The method of SageAttention 1 and 2 (arXiv 2410.02367, 2411.10958), written for Hopper:
- K is smoothed by subtracting its per-channel mean over the tokens of its sequence. Every score of a query row
  moves by the same q·mean, which softmax ignores, while the outlier channels that would spoil INT8 disappear.
  Since any subtracted vector keeps the result exact, the mean of long sequences is taken over every k-th token
  (at least ~1024 of them), which spares most of one read of K.
- Q and K become INT8: K per block of BLOCK_N tokens (scale absmax/127, `_quant_kv_kernel`), Q per token inside
  the attention kernel itself (fusing it saves a pass over Q and costs the same as a per-block scale there), with
  the softmax scale times log2(e) folded into Q's scale so the softmax runs on exp2. Q·K^T is one int8 x int8 ->
  int32 `tl.dot`; the int32 result becomes float by the exact 1.5*2^23 bit trick (an integer add, not a
  conversion) and the dequantization, the max subtraction and the scale meet in one FMA before exp2.
- P·V runs in FP8 e4m3 with V scaled per channel (absmax/448 over the sequence; V is written transposed so both
  operands are K-major for the FP8 tensor cores) and P scaled by 448 for free (log2(448) is folded into the
  subtracted row max), accumulating in FP32; or, with pv_dtype="fp16", in V's own 16-bit type (fp16 or bf16)
  straight from the caller's V, which needs no V pass at all.
- Causal masks are bottom-right aligned (query i of Sq sees keys <= i + Sk - Sq), as decode needs; rows that see
  no key give zeros (LSE -inf). GQA/MQA map query head h to KV head h // (Hq / Hkv): K/V are never repeated.
- Head dims up to 128 are padded to a power of two >= 32 inside the kernels by masking (96 -> 128); 256 runs the
  same kernels with smaller tiles (slower, still INT8/FP8); larger dims fall back to SDPA.
- Variable-length batches use packed [total, H, D] tensors and cu_seqlens, like flash-attn's varlen API.

Decode (`sage_decode`): a few query tokens (1..16) against a long KV cache, split over the keys (flash-decoding)
with the query heads of one KV head sharing a program, then a combine kernel. The cache is bf16/fp16 (read as is:
decode is memory-bound, so quantizing on the fly would not pay) or INT8 from `quantize_kv_cache` (smoothed K and
V with per-token scales, half the bytes to read).

Anything the kernels cannot run (a CPU tensor without TRITON_INTERPRET=1, a dtype other than fp16/bf16, a head dim
over 256) goes to torch SDPA, with one logging warning per distinct reason.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .reference import attention_reference

log = logging.getLogger(__name__)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
FP8_MAX = 448.0
P_SHIFT_FP8 = math.log2(FP8_MAX)  # P is produced pre-multiplied by 448 = 2^P_SHIFT_FP8, filling e4m3's range
DECODE_MAX_QUERIES = 16
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)

# constants the kernels read (Triton kernels may only use globals marked constexpr)
_LN2 = tl.constexpr(LN2)
_FP8_MAX = tl.constexpr(FP8_MAX)
_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: the float with bits _MAGIC_BITS + i is exactly _MAGIC + i, |i| < 2^22
_MAGIC_BITS = tl.constexpr(0x4B400000)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class AttnConfig:
    """Tile sizes and launch shape of the prefill kernel. K's quantization block is block_n tokens."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3
    magic_cvt: bool = True  # int32 scores to float by the 1.5*2^23 add instead of a conversion instruction
    exp2_fma: int = 0  # P's exp2 on the MUFU (0), on the FMA units for half the columns (1) or for all (2)


def default_config(head_dim: int, causal: bool, pv_fp8: bool) -> AttnConfig:
    """Hopper defaults from the sweep in benchmarks/kernels_attention.py; small tiles under the interpreter."""
    if interpreting():
        return AttnConfig(32, 32, 4, 1)
    block_d = _block_d(head_dim)
    if block_d > 128:
        return AttnConfig(64, 32, 4, 2)
    if block_d <= 64:
        return AttnConfig(128, 64, 4, 3)
    return AttnConfig(128, 128, 8, 3)


def _block_d(head_dim: int) -> int:
    return max(32, triton.next_power_of_2(head_dim))


# ----------------------------------------------------------------------------------------------------------------
# Quantization: per-channel K sums and V absmax (one pass), then INT8 K blocks and FP8 V (a second pass)
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _to_fp8(x, PREROUND: tl.constexpr):
    """fp32 -> e4m3 (round to nearest). PREROUND first rounds to 3 mantissa bits with integer ops: only for
    Triton's CPU interpreter, whose e4m3 conversion drops the carry into the exponent (0.031 became 0.0156)."""
    if PREROUND:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576
        x = bits.to(tl.float32, bitcast=True)
    return x.to(tl.float8e4nv)


@triton.jit
def _exp2_fma(x):
    """2^x with FMA/integer instructions only (the MUFU unit that tl.exp2 uses is the softmax's bottleneck): x =
    n + f with n = round(x) by the 1.5*2^23 add and f in [-0.5, 0.5], 2^f by its degree-5 Taylor polynomial
    (relative error < 3e-6), n added to the exponent bits. 0 below 2^-126, as exp2 of a masked -inf is."""
    xc = tl.maximum(x, -126.0)
    t = xc + _MAGIC
    n = t.to(tl.int32, bitcast=True) - _MAGIC_BITS
    f = xc - (t - _MAGIC)
    p = 1.3333558146428443e-3 * f + 9.618129107628477e-3
    p = p * f + 5.550410866482158e-2
    p = p * f + 0.2402265069591007
    p = p * f + 0.6931471805599453
    p = p * f + 1.0
    r = (p.to(tl.int32, bitcast=True) + (n << 23)).to(tl.float32, bitcast=True)
    return tl.where(x < -126.0, 0.0, r)


@triton.jit
def _exp2_split(x, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EXP2_FMA: tl.constexpr):
    """exp2 of a [BLOCK_M, BLOCK_N] tile: all on the MUFU (EXP2_FMA 0), every other column on the FMA units (1),
    or all on the FMA units (2)."""
    if EXP2_FMA == 0:
        return tl.exp2(x)
    if EXP2_FMA == 2:
        return _exp2_fma(x)
    a, b = tl.split(tl.reshape(x, [BLOCK_M, BLOCK_N // 2, 2]))
    return tl.reshape(tl.join(tl.exp2(a), _exp2_fma(b)), [BLOCK_M, BLOCK_N])


@triton.jit
def _kv_stats_kernel(K, V, KSUM, VMAX, CU_K,
                     stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                     HKV, seqlen_k, k_stride,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK: tl.constexpr,
                     VARLEN: tl.constexpr, NEED_V: tl.constexpr):
    """KSUM[b, h, :] += K summed over every k_stride-th token of this program's CHUNK tokens (the smoothing mean
    only has to remove the channel offsets: softmax ignores whatever vector is subtracted, so a sample does and
    the masked-off rows cost no memory traffic); VMAX[b, h, :] = max(VMAX, |V|) over all of them."""
    chunk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    if VARLEN:
        start = tl.load(CU_K + b).to(tl.int64)
        length = tl.load(CU_K + b + 1) - tl.load(CU_K + b)
    else:
        start = 0
        length = seqlen_k
    lo = chunk * CHUNK
    if lo < length:
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        k_base = K + b.to(tl.int64) * stride_kb + h * stride_kh + start * stride_kn
        v_base = V + b.to(tl.int64) * stride_vb + h * stride_vh + start * stride_vn
        ksum = tl.zeros([BLOCK_D], dtype=tl.float32)
        vmax = tl.zeros([BLOCK_D], dtype=tl.float32)
        for s0 in range(lo, lo + CHUNK, BLOCK_S):
            rows = s0 + offs_s
            mask = (rows < length)[:, None] & d_ok[None, :]
            k_mask = mask & (rows % k_stride == 0)[:, None]
            k = tl.load(k_base + rows[:, None].to(tl.int64) * stride_kn + offs_d[None, :], mask=k_mask, other=0.0)
            ksum += tl.sum(k.to(tl.float32), 0)
            if NEED_V:
                v = tl.load(v_base + rows[:, None].to(tl.int64) * stride_vn + offs_d[None, :], mask=mask, other=0.0)
                vmax = tl.maximum(vmax, tl.max(tl.abs(v.to(tl.float32)), 0))
        tl.atomic_add(KSUM + bh * BLOCK_D + offs_d, ksum)
        if NEED_V:
            tl.atomic_max(VMAX + bh * BLOCK_D + offs_d, vmax)


@triton.jit
def _quant_kv_kernel(K, V, KSUM, VMAX, KQ, KS, VQ, CU_K,
                     stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                     HKV, seqlen_k, padded_len, k_stride,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                     VARLEN: tl.constexpr, PV_FP8: tl.constexpr, PREROUND: tl.constexpr):
    """One block of BLOCK_N tokens: KQ = round((K - mean) / s) as int8 with s = absmax/127 (KS), and for FP8 PV
    VQ^T = V / (vmax/448) as e4m3. Outputs are padded ([B, Hkv, padded_len, BLOCK_D] and [B, Hkv, BLOCK_D,
    padded_len]) with zeros past the sequence and the head dim, so the attention kernel loads them unmasked."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    if VARLEN:
        start = tl.load(CU_K + b).to(tl.int64)
        length = tl.load(CU_K + b + 1) - tl.load(CU_K + b)
    else:
        start = 0
        length = seqlen_k
    if pid_n * BLOCK_N < length:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        mask = (offs_n < length)[:, None] & d_ok[None, :]
        k_base = K + b.to(tl.int64) * stride_kb + h * stride_kh + start * stride_kn
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :], mask=mask, other=0.0)
        mean = tl.load(KSUM + bh * BLOCK_D + offs_d) / ((length + k_stride - 1) // k_stride * 1.0)
        k = tl.where(mask, k.to(tl.float32) - mean[None, :], 0.0)
        amax = tl.max(tl.max(tl.abs(k), 1), 0)
        scale = tl.where(amax > 0, amax / 127.0, 1.0)
        kq = k * (1.0 / scale)
        kq = (kq + tl.where(kq >= 0, 0.5, -0.5)).to(tl.int8)  # round half away from zero
        out = bh.to(tl.int64) * padded_len * BLOCK_D
        tl.store(KQ + out + offs_n[:, None] * BLOCK_D + offs_d[None, :], kq)
        tl.store(KS + bh * tl.cdiv(padded_len, BLOCK_N) + pid_n, scale)
        if PV_FP8:
            v_base = V + b.to(tl.int64) * stride_vb + h * stride_vh + start * stride_vn
            v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :], mask=mask, other=0.0)
            vmax = tl.load(VMAX + bh * BLOCK_D + offs_d)
            inv = tl.where(vmax > 0, 1.0 / (vmax / _FP8_MAX), 1.0)
            vq = _to_fp8(v.to(tl.float32) * inv[None, :], PREROUND)
            tl.store(VQ + out + offs_d[None, :] * padded_len + offs_n[:, None], vq)



# ----------------------------------------------------------------------------------------------------------------
# Prefill attention
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _prefill_inner(acc, l_i, m_i, q, q_rs, k_base, ks_base, v_base, stride_vn, stride_vd,
                   lo, hi, offs_m, offs_n, offs_d, len_k, causal_off,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
                   CAUSAL: tl.constexpr, PV_FP8: tl.constexpr, P_SHIFT: tl.constexpr, MAGIC_CVT: tl.constexpr,
                   PREROUND: tl.constexpr, BLOCK_M: tl.constexpr, EXP2_FMA: tl.constexpr):
    """Online softmax over the key blocks [lo, hi): scores in the log2 domain, P pre-scaled by 2^P_SHIFT."""
    OFFSET: tl.constexpr = _MAGIC if MAGIC_CVT else 0.0
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        k = tl.load(k_base + cols[None, :] * BLOCK_D + offs_d[:, None])  # [BLOCK_D, BLOCK_N] int8, padded
        rs = q_rs * tl.load(ks_base + start_n // BLOCK_N)  # per row: log2-domain score of one int product
        if MAGIC_CVT:
            f = (tl.dot(q, k) + _MAGIC_BITS).to(tl.float32, bitcast=True)  # = _MAGIC + int32 score, exactly
        else:
            f = tl.dot(q, k).to(tl.float32)
        if MASK:
            keep = cols[None, :] < len_k
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + causal_off)
            f = tl.where(keep, f, float("-inf"))
        m_new = tl.maximum(m_i, (tl.max(f, 1) - OFFSET) * rs)
        p = _exp2_split(f * rs[:, None] - (rs * OFFSET + m_new - P_SHIFT)[:, None], BLOCK_M, BLOCK_N, EXP2_FMA)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if PV_FP8:
            vt = tl.load(v_base + offs_d[:, None] * stride_vd + cols[None, :])  # V^T tile [BLOCK_D, BLOCK_N]
            acc = tl.dot(_to_fp8(p, PREROUND), tl.trans(vt), acc)
        else:
            v_ptrs = v_base + cols[:, None].to(tl.int64) * stride_vn + offs_d[None, :]
            if MASK or BLOCK_D != HEAD_DIM:
                v = tl.load(v_ptrs, mask=(cols < len_k)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
            else:
                v = tl.load(v_ptrs)
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _prefill_kernel(Q, KQ, KS, V, VMAX, KSUM, O, LSE, CU_Q, CU_K,
                    stride_qb, stride_qh, stride_qm, stride_ob, stride_oh, stride_om,
                    stride_vb, stride_vh, stride_vn, stride_vd, stride_lb, stride_lh, stride_lm,
                    H, GROUP, seqlen_q, seqlen_k, padded_k, k_stride, qk_scale, sm_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, PV_FP8: tl.constexpr, RETURN_LSE: tl.constexpr,
                    P_SHIFT: tl.constexpr, MAGIC_CVT: tl.constexpr, PREROUND: tl.constexpr,
                    EXP2_FMA: tl.constexpr):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest causal rows start first
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    bhk = b * (H // GROUP) + hk
    if VARLEN:
        q_start = tl.load(CU_Q + b).to(tl.int64)
        len_q = tl.load(CU_Q + b + 1) - tl.load(CU_Q + b)
        k_start = tl.load(CU_K + b).to(tl.int64)
        len_k = tl.load(CU_K + b + 1) - tl.load(CU_K + b)
    else:
        q_start = 0
        len_q = seqlen_q
        k_start = 0
        len_k = seqlen_k
    start_m = pid_m * BLOCK_M
    if start_m >= len_q:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m < len_q)[:, None] & (offs_d < HEAD_DIM)[None, :]

    # Q to INT8 per token, the softmax scale and log2(e) folded into the per-row scale q_rs
    q_base = Q + b.to(tl.int64) * stride_qb + h * stride_qh + q_start * stride_qm
    q_ptrs = q_base + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=q_mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(q), 1)
    q_scale = tl.where(amax > 0, amax / 127.0, 1.0)
    qi = q * (1.0 / q_scale)[:, None]
    qi = (qi + tl.where(qi >= 0, 0.5, -0.5)).to(tl.int8)
    q_rs = q_scale * qk_scale

    k_base = KQ + bhk.to(tl.int64) * padded_k * BLOCK_D
    ks_base = KS + bhk * (padded_k // BLOCK_N)
    if PV_FP8:
        v_base = V + bhk.to(tl.int64) * padded_k * BLOCK_D
    else:
        v_base = V + b.to(tl.int64) * stride_vb + hk * stride_vh + k_start * stride_vn

    causal_off = len_k - len_q
    if CAUSAL:
        # keys < start_m + causal_off + 1 are visible to every row of the block: no mask needed there
        full_hi = tl.minimum(tl.maximum(start_m + causal_off + 1, 0), len_k) // BLOCK_N * BLOCK_N
        hi = tl.maximum(tl.minimum(start_m + BLOCK_M + causal_off, len_k), 0)
    else:
        full_hi = len_k // BLOCK_N * BLOCK_N
        hi = len_k

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: rows that see no key keep p = 0, no NaN
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _prefill_inner(acc, l_i, m_i, qi, q_rs, k_base, ks_base, v_base, stride_vn, stride_vd,
                                   0, full_hi, offs_m, offs_n, offs_d, len_k, causal_off,
                                   HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL, PV_FP8, P_SHIFT, MAGIC_CVT, PREROUND,
                                   BLOCK_M, EXP2_FMA)
    acc, l_i, m_i = _prefill_inner(acc, l_i, m_i, qi, q_rs, k_base, ks_base, v_base, stride_vn, stride_vd,
                                   full_hi, hi, offs_m, offs_n, offs_d, len_k, causal_off,
                                   HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, PV_FP8, P_SHIFT, MAGIC_CVT, PREROUND,
                                   BLOCK_M, EXP2_FMA)

    out = acc * (1.0 / tl.where(l_i > 0, l_i, 1.0))[:, None]
    if PV_FP8:
        vmax = tl.load(VMAX + bhk * BLOCK_D + offs_d)
        out = out * tl.where(vmax > 0, vmax / _FP8_MAX, 1.0)[None, :]
    o_base = O + b.to(tl.int64) * stride_ob + h * stride_oh + q_start * stride_om
    tl.store(o_base + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=q_mask)
    if RETURN_LSE:
        # natural-log LSE of the unsmoothed scores: add back sm_scale * q . mean(K) that smoothing removed
        mean = tl.load(KSUM + bhk * BLOCK_D + offs_d) / ((len_k + k_stride - 1) // k_stride * 1.0)
        shift = tl.sum(q * mean[None, :], 1) * sm_scale
        lse = (m_i - P_SHIFT + tl.log2(l_i)) * _LN2 + shift
        l_base = LSE + b.to(tl.int64) * stride_lb + h * stride_lh + q_start * stride_lm
        tl.store(l_base + offs_m * stride_lm, lse, mask=offs_m < len_q)


# ----------------------------------------------------------------------------------------------------------------
# Decode: split-KV attention of a few queries against a long cache, then a combine step
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _decode_kernel(Q, K, V, KSC, VSC, KLEN, OP, LP,
                   stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_sb, stride_sh,
                   HKV, GROUP, seqlen_q, seqlen_k, keys_per_split, n_splits, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, KV_INT8: tl.constexpr, VAR_K: tl.constexpr):
    """Rows are the GROUP query heads x seqlen_q tokens that share KV head hk; keys [split*kps, +kps), cut at the
    sequence's own key count KLEN[b] when VAR_K (splits past it write an empty partial: LSE -inf)."""
    pid_r = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
    b = bh // HKV
    hk = bh % HKV
    rows = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP * seqlen_q
    h = hk * GROUP + rows // seqlen_q
    t = rows % seqlen_q
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    q_ptrs = Q + b.to(tl.int64) * stride_qb + h[:, None] * stride_qh + t[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if KV_INT8:
        qf = q.to(tl.float32)
        amax = tl.max(tl.abs(qf), 1)
        q_scale = tl.where(amax > 0, amax / 127.0, 1.0)
        qi = qf * (1.0 / q_scale)[:, None]
        q = (qi + tl.where(qi >= 0, 0.5, -0.5)).to(tl.int8)
        q_rs = q_scale * qk_scale
    k_base = K + b.to(tl.int64) * stride_kb + hk * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk * stride_vh
    sc_off = b.to(tl.int64) * stride_sb + hk * stride_sh
    if VAR_K:
        kv_len = tl.load(KLEN + b).to(tl.int32)
    else:
        kv_len = seqlen_k
    last_key = kv_len - seqlen_q + t  # bottom-right causal: the last key each row sees
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, kv_len)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < hi
        k = tl.load(k_base + cols[None, :].to(tl.int64) * stride_kn + offs_d[:, None],
                    mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        if KV_INT8:
            ks = tl.load(KSC + sc_off + cols, mask=n_ok, other=0.0)
            s = tl.dot(q, k).to(tl.float32) * q_rs[:, None] * ks[None, :]
        else:
            s = tl.dot(q, k) * qk_scale
        keep = n_ok[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= last_key[:, None])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = tl.load(v_base + cols[:, None].to(tl.int64) * stride_vn + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if KV_INT8:
            vs = tl.load(VSC + sc_off + cols, mask=n_ok, other=0.0)
            acc = tl.dot((p * vs[None, :]).to(tl.float16), v.to(tl.float16), acc)
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    out = acc * (1.0 / tl.where(l_i > 0, l_i, 1.0))[:, None]
    lse = tl.where(l_i > 0, m_i + tl.log2(l_i), float("-inf"))
    part = (b * HKV * GROUP + h) * seqlen_q + t  # row of the [B * Hq * Sq] partial results
    tl.store(OP + (part[:, None] * n_splits + split) * BLOCK_D + offs_d[None, :], out, mask=row_ok[:, None])
    tl.store(LP + part * n_splits + split, lse, mask=row_ok)


@triton.jit
def _combine_kernel(OP, LP, O, LSE, n_splits, H, seqlen_q, stride_ob, stride_oh, stride_om,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                    RETURN_LSE: tl.constexpr):
    """Merge the splits of one query row: weights 2^(lse_s - max) on the normalised partial outputs."""
    row = tl.program_id(0)
    t = row % seqlen_q
    b = row // seqlen_q // H
    h = row // seqlen_q % H
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < n_splits
    lse = tl.load(LP + row * n_splits + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    total = tl.sum(w, 0)
    o = tl.load(OP + (row * n_splits + offs_s[:, None]) * BLOCK_D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    o_ptr = O + b.to(tl.int64) * stride_ob + h * stride_oh + t * stride_om + offs_d
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)
    if RETURN_LSE:
        tl.store(LSE + row, (m + tl.log2(total)) * _LN2)


# ----------------------------------------------------------------------------------------------------------------
# Python entry points
# ----------------------------------------------------------------------------------------------------------------

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("sage_attention: %s", message)


def _warn_fallback(reason: str) -> None:
    _warn_once(f"{reason}; falling back to torch SDPA")


def _kernel_problem(*tensors: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot run on these tensors, or None when they can."""
    q = tensors[0]
    if q.device.type == "cuda":
        if torch.cuda.get_device_capability(q.device) < (8, 0):
            return "INT8 tensor cores need compute capability 8.0 or newer"
    elif not (q.device.type == "cpu" and interpreting()):
        return f"tensors on {q.device.type} (the kernels need CUDA, or TRITON_INTERPRET=1 on CPU)"
    for t in tensors:
        if t.dtype not in SUPPORTED_DTYPES:
            return f"dtype {t.dtype} (supported: float16, bfloat16)"
        if t.device != q.device:
            return "q, k and v on different devices"
    if q.shape[-1] > 256:
        return f"head dim {q.shape[-1]} > 256"
    return None


def _fp8_ok(device: torch.device) -> bool:
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, sm_scale: float) -> torch.Tensor:
    """torch SDPA on [B, H, S, D] with GQA and a bottom-right causal mask; rows seeing no key give 0."""
    sq, sk = q.shape[-2], k.shape[-2]
    mask, is_causal = None, causal and sq == sk
    if causal and sq != sk:
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
    gqa = q.shape[1] != k.shape[1]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=sm_scale,
                                         enable_gqa=gqa)
    return out.nan_to_num(0.0) if mask is not None else out


def _fallback(q, k, v, causal, sm_scale, return_lse, cu_q, cu_k):
    if cu_q is None:
        out = _sdpa(q, k, v, causal, sm_scale)
        if not return_lse:
            return out
        return out, attention_reference(q, k, v, causal, sm_scale, return_lse=True)[1]
    outs, lses = [], []
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    for i in range(len(bounds_q) - 1):
        sl_q, sl_k = slice(bounds_q[i], bounds_q[i + 1]), slice(bounds_k[i], bounds_k[i + 1])
        qi, ki, vi = (t[s].transpose(0, 1)[None] for t, s in ((q, sl_q), (k, sl_k), (v, sl_k)))
        outs.append(_sdpa(qi, ki, vi, causal, sm_scale)[0].transpose(0, 1))
        if return_lse:
            lses.append(attention_reference(qi, ki, vi, causal, sm_scale, return_lse=True)[1][0].transpose(0, 1))
    out = torch.cat(outs)
    return (out, torch.cat(lses)) if return_lse else out


def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                   sm_scale: float | None = None, pv_dtype: str = "fp8", return_lse: bool = False,
                   cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
                   max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
                   config: AttnConfig | None = None):
    """Quantized attention softmax(q k^T * sm_scale) v: INT8 Q·K^T (smoothed K), FP8 or 16-bit P·V.

    q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] (any strides with a contiguous last dim), fp16 or bf16, Hq a multiple
    of Hkv. With cu_seqlens_q/cu_seqlens_k (int32 [B+1] cumulative lengths) q is packed [total_q, Hq, D] and k/v
    [total_k, Hkv, D], as in flash-attn's varlen API. `causal` masks bottom-right aligned (query i sees keys up to
    i + Sk - Sq). pv_dtype "fp8" (e4m3, V scaled per channel) or "fp16" (V's own 16-bit dtype). sm_scale defaults
    to 1/sqrt(D). Returns the output in q's dtype and layout, and with return_lse the natural-log LSE of the
    scaled scores (fp32, [B, Hq, Sq], or [total_q, Hq] for varlen).

    Dense inputs with at most 16 queries per sequence go to the split-KV decode kernel (`sage_decode`).
    Unsupported inputs run torch SDPA instead (one warning per reason); `config` overrides the tile sizes.
    """
    if pv_dtype not in ("fp8", "fp16"):
        raise ValueError(f"pv_dtype must be 'fp8' or 'fp16', got {pv_dtype!r}")
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if varlen and (cu_seqlens_q is None or cu_seqlens_k is None):
        raise ValueError("variable-length attention needs both cu_seqlens_q and cu_seqlens_k")
    dims = 3 if varlen else 4
    if q.dim() != dims or k.dim() != dims or v.dim() != dims:
        raise ValueError(f"expected {dims}-d q, k, v ({'[total, H, D] with cu_seqlens' if varlen else '[B, H, S, D]'}),"
                         f" got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[-1]
    if k.shape != v.shape or k.shape[-1] != d or hq % hkv:
        raise ValueError(f"q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}: k and v must match, share q's "
                         "head dim, and Hq must be a multiple of Hkv")
    if not varlen and (q.shape[0] != k.shape[0]):
        raise ValueError(f"batch of q ({q.shape[0]}) and k ({k.shape[0]}) differ")
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    problem = _kernel_problem(q, k, v)
    if problem is not None:
        _warn_fallback(problem)
        return _fallback(q, k, v, causal, sm_scale, return_lse, cu_seqlens_q, cu_seqlens_k)
    if not varlen and q.shape[2] <= DECODE_MAX_QUERIES and k.shape[2] >= 8 * q.shape[2]:
        return sage_decode(q, (k, v), causal=causal, sm_scale=sm_scale, return_lse=return_lse)
    pv_fp8 = pv_dtype == "fp8"
    if pv_fp8 and not _fp8_ok(q.device):
        _warn_once("FP8 P·V needs compute capability 8.9; using 16-bit P·V")
        pv_fp8 = False

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    cfg = config or default_config(d, causal, pv_fp8)
    if varlen:
        cu_q = cu_seqlens_q.to(q.device, torch.int32)
        batch = cu_q.numel() - 1
        seqlen_q = max_seqlen_q if max_seqlen_q is not None else int((cu_q[1:] - cu_q[:-1]).max())
        q_strides = (0, q.stride(1), q.stride(0))  # packed [total, H, D]: token offsets come from cu_seqlens
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        o_strides = (0, out.stride(1), out.stride(0))
    else:
        cu_q = q.new_empty(1, dtype=torch.int32)  # unused
        batch, seqlen_q = q.shape[0], q.shape[2]
        q_strides = (q.stride(0), q.stride(1), q.stride(2))
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        o_strides = (out.stride(0), out.stride(1), out.stride(2))
    kv = _quantize_kv(k, v, block_n=cfg.block_n, pv_fp8=pv_fp8, cu_seqlens_k=cu_seqlens_k, max_seqlen_k=max_seqlen_k)

    if return_lse:
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        l_strides = (0, lse.stride(1), lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1), lse.stride(2))
    else:
        lse, l_strides = kv.ksum, (0, 0, 0)
    if pv_fp8:
        v_arg, v_str = kv.vq, (0, 0, 1, kv.padded_k)
    else:
        v_arg, v_str = v, (*kv.v_strides, 1)
    grid = (triton.cdiv(max(seqlen_q, 1), cfg.block_m), batch * hq)
    _prefill_kernel[grid](
        q, kv.kq, kv.ks, v_arg, kv.vmax, kv.ksum, out, lse, cu_q, kv.cu_k, *q_strides, *o_strides, *v_str,
        *l_strides, hq, hq // hkv, seqlen_q, kv.seqlen_k, kv.padded_k, kv.k_stride, sm_scale * LOG2E, sm_scale,
        HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=bool(causal),
        VARLEN=varlen, PV_FP8=pv_fp8, RETURN_LSE=return_lse, P_SHIFT=P_SHIFT_FP8 if pv_fp8 else 0.0,
        MAGIC_CVT=cfg.magic_cvt, PREROUND=interpreting(), EXP2_FMA=cfg.exp2_fma, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return (out, lse) if return_lse else out


class _QuantizedKV(NamedTuple):
    kq: torch.Tensor  # int8 [B, Hkv, padded_k, BLOCK_D], smoothed, zero padded
    ks: torch.Tensor  # fp32 [B, Hkv, padded_k / block_n]
    vq: torch.Tensor  # e4m3 [B, Hkv, BLOCK_D, padded_k] (V^T), or kq when P·V is 16-bit
    ksum: torch.Tensor  # fp32 [B, Hkv, BLOCK_D]: K summed over every k_stride-th token of each sequence
    vmax: torch.Tensor  # fp32 [B, Hkv, BLOCK_D]: |V| max over each sequence
    cu_k: torch.Tensor
    seqlen_k: int
    padded_k: int
    k_stride: int
    v_strides: tuple[int, int, int]


def _quantize_kv(k: torch.Tensor, v: torch.Tensor, *, block_n: int, pv_fp8: bool,
                 cu_seqlens_k: torch.Tensor | None = None, max_seqlen_k: int | None = None) -> _QuantizedKV:
    """The two quantization launches: per-channel K sums and V maxima, then INT8 K blocks and e4m3 V^T."""
    d, hkv, dev = k.shape[-1], k.shape[-2 if cu_seqlens_k is not None else 1], k.device
    if cu_seqlens_k is not None:
        cu_k = cu_seqlens_k.to(dev, torch.int32)
        batch = cu_k.numel() - 1
        seqlen_k = max_seqlen_k if max_seqlen_k is not None else int((cu_k[1:] - cu_k[:-1]).max())
        k_strides, v_strides = (0, k.stride(1), k.stride(0)), (0, v.stride(1), v.stride(0))
    else:
        cu_k = k.new_empty(1, dtype=torch.int32)  # unused
        batch, seqlen_k = k.shape[0], k.shape[2]
        k_strides, v_strides = (k.stride(0), k.stride(1), k.stride(2)), (v.stride(0), v.stride(1), v.stride(2))
    block_d = _block_d(d)
    padded_k = triton.cdiv(max(seqlen_k, 1), block_n) * block_n
    ksum = torch.zeros(batch, hkv, block_d, dtype=torch.float32, device=dev)
    vmax = torch.zeros(batch, hkv, block_d, dtype=torch.float32, device=dev)
    kq = torch.empty(batch, hkv, padded_k, block_d, dtype=torch.int8, device=dev)
    ks = torch.empty(batch, hkv, padded_k // block_n, dtype=torch.float32, device=dev)
    vq = torch.empty(batch, hkv, block_d, padded_k, dtype=torch.float8_e4m3fn, device=dev) if pv_fp8 else kq
    varlen = cu_seqlens_k is not None
    k_stride = max(1, min(16, seqlen_k // 1024))  # the smoothing mean from >= ~1024 tokens
    chunk = 1024 if seqlen_k > 1024 else triton.next_power_of_2(max(seqlen_k, 16))
    block_s = min(32 if interpreting() else 64, chunk)
    _kv_stats_kernel[(triton.cdiv(max(seqlen_k, 1), chunk), batch * hkv)](
        k, v, ksum, vmax, cu_k, *k_strides, *v_strides, hkv, seqlen_k, k_stride,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_S=block_s, CHUNK=chunk, VARLEN=varlen, NEED_V=pv_fp8, num_warps=4)
    _quant_kv_kernel[(padded_k // block_n, batch * hkv)](
        k, v, ksum, vmax, kq, ks, vq, cu_k, *k_strides, *v_strides, hkv, seqlen_k, padded_k, k_stride,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_N=block_n, VARLEN=varlen, PV_FP8=pv_fp8, PREROUND=interpreting(),
        num_warps=4)
    return _QuantizedKV(kq, ks, vq, ksum, vmax, cu_k, seqlen_k, padded_k, k_stride, v_strides)


@dataclass
class QuantizedKVCache:
    """An INT8 KV cache: k = round((K - k_mean) / k_scale), v = round(V / v_scale), scales per token.

    k, v: int8 [B, Hkv, S, D]; k_scale, v_scale: fp32 [B, Hkv, S]; k_mean: fp32 [B, Hkv, D]. Per-token scales
    let new tokens be appended (quantize them with the same k_mean) without touching the old ones.
    """

    k: torch.Tensor
    k_scale: torch.Tensor
    v: torch.Tensor
    v_scale: torch.Tensor
    k_mean: torch.Tensor

    def dequantize(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """The (smoothed) K and V the cache stands for; softmax ignores the subtracted mean."""
        return ((self.k.float() * self.k_scale[..., None]).to(dtype),
                (self.v.float() * self.v_scale[..., None]).to(dtype))


def quantize_kv_cache(k: torch.Tensor, v: torch.Tensor, k_mean: torch.Tensor | None = None) -> QuantizedKVCache:
    """K [B, Hkv, S, D] and V to an INT8 cache: K smoothed by its per-channel mean over tokens (or the given
    k_mean, to append to an existing cache), both with per-token absmax/127 scales."""
    kf, vf = k.float(), v.float()
    if k_mean is None:
        k_mean = kf.mean(dim=2)
    kf = kf - k_mean[:, :, None]
    k_scale = (kf.abs().amax(-1) / 127.0).clamp_min(1e-12)
    v_scale = (vf.abs().amax(-1) / 127.0).clamp_min(1e-12)
    kq = torch.round(kf / k_scale[..., None]).clamp(-127, 127).to(torch.int8)
    vq = torch.round(vf / v_scale[..., None]).clamp(-127, 127).to(torch.int8)
    return QuantizedKVCache(kq, k_scale, vq, v_scale, k_mean.float())


def _num_splits(work: int, seqlen_k: int, block_n: int, device: torch.device) -> int:
    """Enough splits for about four programs per multiprocessor, each over at least 4 key blocks."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = triton.cdiv(4 * sms, max(work, 1))
    return max(1, min(want, triton.cdiv(seqlen_k, 4 * block_n), 64))


def sage_decode(q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | QuantizedKVCache, *, causal: bool = True,
                sm_scale: float | None = None, return_lse: bool = False, num_splits: int | None = None,
                kv_lens: torch.Tensor | None = None):
    """Decode attention: q [B, Hq, Sq, D] (Sq small, e.g. 1..16) against a cache of Sk tokens.

    `kv` is (k, v) [B, Hkv, Sk, D] in q's 16-bit dtype, or a `QuantizedKVCache` (INT8 Q·K^T per token, V
    dequantized to fp16 in registers). The keys are split over programs (flash-decoding) and merged by a combine
    kernel; causal is bottom-right aligned (query i sees keys up to Sk - Sq + i). `kv_lens` (integers [B], each
    1..Sk, on q's device) gives each sequence its own key count, for a batch of caches of different lengths (a
    serving engine's slots): keys past it are ignored and the causal alignment counts from it. Returns like
    `sage_attention`.
    """
    int8 = isinstance(kv, QuantizedKVCache)
    k, v = (kv.k, kv.v) if int8 else kv
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if hq % hkv or k.shape[-1] != d or k.shape[0] != b:
        raise ValueError(f"q {list(q.shape)} does not fit a cache of shape {list(k.shape)}")
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    problem = _kernel_problem(q) if int8 else _kernel_problem(q, k, v)
    if problem is None and not int8 and k.dtype != q.dtype:
        problem = f"q ({q.dtype}) and cache ({k.dtype}) dtypes differ"
    if kv_lens is not None and tuple(kv_lens.shape) != (b,):
        raise ValueError(f"kv_lens: expected one key count per sequence [{b}], got {list(kv_lens.shape)}")
    if problem is not None:
        _warn_fallback(problem)
        if int8:
            k, v = kv.dequantize(q.dtype if q.dtype in SUPPORTED_DTYPES else torch.float32)
        if kv_lens is None:
            out = _fallback(q, k.to(q.dtype), v.to(q.dtype), causal, sm_scale, return_lse, None, None)
        else:
            out = attention_reference(q, k, v, causal, sm_scale, return_lse, kv_lens=kv_lens)
            out = (out[0].to(q.dtype), out[1]) if return_lse else out.to(q.dtype)
        if return_lse and int8:
            out = out[0], out[1] + _mean_shift(q, kv.k_mean, sm_scale)
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
    group = hq // hkv
    block_d = _block_d(d)
    block_m = max(16, min(64, triton.next_power_of_2(group * sq)))
    block_n = 32 if interpreting() else (64 if block_d > 128 else 128)
    row_blocks = triton.cdiv(group * sq, block_m)
    splits = num_splits or _num_splits(row_blocks * b * hkv, sk, block_n, q.device)
    keys_per_split = triton.cdiv(triton.cdiv(max(sk, 1), splits), block_n) * block_n
    splits = triton.cdiv(max(sk, 1), keys_per_split)
    part_o = torch.empty(b * hq * sq, splits, block_d, dtype=torch.float32, device=q.device)
    part_l = torch.empty(b * hq * sq, splits, dtype=torch.float32, device=q.device)
    if int8:
        ksc, vsc = kv.k_scale.contiguous(), kv.v_scale.contiguous()
        s_strides = (ksc.stride(0), ksc.stride(1))
    else:
        ksc = vsc = part_l
        s_strides = (0, 0)
    lens = part_l if kv_lens is None else kv_lens.to(torch.int32)
    _decode_kernel[(row_blocks, b * hkv, splits)](
        q, k, v, ksc, vsc, lens, part_o, part_l, q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), *s_strides,
        hkv, group, sq, sk, keys_per_split, splits, sm_scale * LOG2E,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=bool(causal), KV_INT8=int8,
        VAR_K=kv_lens is not None, num_warps=4, num_stages=3 if not interpreting() else 1)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, hq, sq, dtype=torch.float32, device=q.device) if return_lse else part_l
    _combine_kernel[(b * hq * sq,)](
        part_o, part_l, out, lse, splits, hq, sq, out.stride(0), out.stride(1), out.stride(2),
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(splits), RETURN_LSE=return_lse,
        num_warps=4)
    if not return_lse:
        return out
    if int8:
        lse = lse + _mean_shift(q, kv.k_mean, sm_scale)
    return out, lse


def _mean_shift(q: torch.Tensor, k_mean: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """sm_scale * q . k_mean per query row [B, Hq, Sq]: what subtracting k_mean removed from every score."""
    b, hq, sq, d = q.shape
    mean = k_mean.float().repeat_interleave(hq // k_mean.shape[1], dim=1)  # [B, Hq, D], tiny
    return torch.einsum("bhsd,bhd->bhs", q.float(), mean) * sm_scale
