"""Triton W{4,6,8}A16 GEMM: y = x @ W^T (+ bias) with W in the kernel layout of `lowbit_layout`.

Weights are unpacked in registers and never written back in 16 bits. Each program computes the transposed tile
acc[BLOCK_N, BLOCK_M] = W_tile @ x_tile^T ("swap AB"): the weight is the left operand, so one tile of 16 tokens
already fills the tensor cores' smallest shape during decode, and the unpacked weight can feed the MMA straight
from registers. Integer codes are exact in fp16/bf16, so each K tile's dot product is taken on the raw codes in
fp32 and the group's scale multiplies the tile's partial sums (BLOCK_N x BLOCK_M products instead of
BLOCK_N x BLOCK_K); a per-channel weight is scaled once after the K loop.

Decode (M <= 16) is memory-bound: configs with narrow BLOCK_N and split-K put every SM to work streaming weights;
partial sums of a split-K launch meet in an fp32 buffer through atomic adds. Prefill uses wide tiles.

Set TRITON_INTERPRET=1 before this module is first imported to run the kernels on CPU tensors.
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple

import torch
import triton
import triton.language as tl

from .lowbit_layout import LowbitWeight


class GemmConfig(NamedTuple):
    """Tile shape and launch parameters of one low-bit GEMM launch.

    `dequant`: for many tokens, first expand the weight once in a separate pass (to x's dtype with scales for
    A16, then cuBLAS; to int8 codes for A8, then the INT8 kernel) instead of unpacking it in every row tile.
    """

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    dequant: bool = False


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 at import time)."""
    from triton import knobs

    return bool(knobs.runtime.interpret)


def m_bucket(m: int) -> int:
    """Token counts that share tuned configs: 16 for decode (1..16), then powers of two up to 4096."""
    return 16 if m <= 16 else min(triton.next_power_of_2(m), 4096)


_TUNED: dict[tuple, GemmConfig] = {}


def pick_config(key: tuple, candidates: list[GemmConfig], launch: Callable[[GemmConfig], object]) -> GemmConfig:
    """The fastest of `candidates` for `key`, timed once per process as CUDA-graph replays (decode kernels take a
    few microseconds, less than their host-side launch, so eager timing would rank launch overhead); the first
    candidate when there is only one, when interpreting (CPU tests) or when LOWC_AUTOTUNE=0."""
    if len(candidates) == 1 or interpreting() or os.environ.get("LOWC_AUTOTUNE", "1") == "0":
        best = candidates[0]
    else:
        times = []
        for cfg in candidates:
            try:
                times.append((triton.testing.do_bench_cudagraph(lambda: launch(cfg), rep=5,
                                                                return_mode="median"), cfg))
            except triton.runtime.errors.OutOfResources:
                continue
        best = min(times)[1]
    _TUNED[key] = best
    return best


def fit_block_k(cfg: GemmConfig, w: LowbitWeight, m: int) -> GemmConfig:
    """Shrink BLOCK_K so a K tile never straddles two scale groups, and BLOCK_M for few tokens."""
    block_k = cfg.block_k
    while w.k_pad % block_k:
        block_k //= 2
    if not w.per_channel:
        while block_k > 16 and w.group % block_k:
            block_k //= 2
        if w.group % block_k:
            raise ValueError(f"group size {w.group} is not a multiple of 16: no kernel tile fits it")
    block_m = max(16, min(cfg.block_m, triton.next_power_of_2(m)))
    return cfg._replace(block_k=block_k, block_m=block_m)


@triton.jit
def load_biased_codes(codes_ptr, high_ptr, rows, row_mask, k0, stride_c, stride_h,
                      BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Biased unsigned codes int16 [BLOCK_N, BLOCK_K] of K columns k0 .. k0+BLOCK_K (INT4 and INT6)."""
    # byte offsets as multiples of the tile width, so the compiler sees aligned, contiguous 16-byte loads
    cols = tl.multiple_of(k0 // 2, BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    b = tl.load(codes_ptr + rows[:, None] * stride_c + cols[None, :], mask=row_mask[:, None], other=0).to(tl.int16)
    u = tl.reshape(tl.join(b & 0xF, b >> 4), (BLOCK_N, BLOCK_K))
    if BITS == 6:
        hcols = tl.multiple_of(k0 // 4, BLOCK_K // 4) + tl.arange(0, BLOCK_K // 4)
        h = tl.load(high_ptr + rows[:, None] * stride_h + hcols[None, :], mask=row_mask[:, None], other=0)
        h = h.to(tl.int16)
        # column 4i+j sits at bits 2j of byte i: join pairs (0, 2) and (1, 3) so the flattened order is 0,1,2,3
        hi = tl.join(tl.join(h & 0x3, (h >> 4) & 0x3), tl.join((h >> 2) & 0x3, h >> 6))
        u = u | (tl.reshape(hi, (BLOCK_N, BLOCK_K)) << 4)
    return u


@triton.jit
def load_weight_tile(codes_ptr, high_ptr, rows, row_mask, k0, stride_c, stride_h, DTYPE: tl.constexpr,
                     BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Signed codes as exact DTYPE (fp16, bf16 or fp32) values [BLOCK_N, BLOCK_K], unscaled."""
    if BITS == 8:
        cols = k0 + tl.arange(0, BLOCK_K)
        c = tl.load(codes_ptr + rows[:, None] * stride_c + cols[None, :], mask=row_mask[:, None], other=0)
        return c.to(DTYPE)
    u = load_biased_codes(codes_ptr, high_ptr, rows, row_mask, k0, stride_c, stride_h, BITS, BLOCK_N, BLOCK_K)
    bias: tl.constexpr = 1 << (BITS - 1)
    if DTYPE == tl.float32:
        return u.to(tl.float32) - bias
    elif DTYPE == tl.float16:
        return (u | 0x6400).to(tl.float16, bitcast=True) - (1024.0 + bias)  # 0x6400|u is 1024+u
    else:
        return (u | 0x4300).to(tl.bfloat16, bitcast=True) - (128.0 + bias)  # 0x4300|u is 128+u (u < 128)


@triton.jit
def tile_coords(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program; GROUP_M row tiles sweep N together so their weight tiles stay in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % size_m, (pid % per_group) // size_m


@triton.jit
def _wa16_kernel(x_ptr, codes_ptr, high_ptr, scales_ptr, bias_ptr, out_ptr,
                 M, N, K, K_PAD, stride_xm, stride_om, stride_c, stride_h,
                 BITS: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr, DOT_F32: tl.constexpr):
    # DOT_F32: the CPU interpreter cannot do bf16 arithmetic, so tests run the same math in fp32
    DTYPE: tl.constexpr = tl.float32 if DOT_F32 else x_ptr.dtype.element_ty
    pid_m, pid_n = tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    toks = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    tok_mask = toks < M

    tiles = K_PAD // BLOCK_K
    per_split = tl.cdiv(tiles, SPLIT_K)
    t_begin = pid_k * per_split
    t_end = tl.minimum(t_begin + per_split, tiles)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for t in range(t_begin, t_end):
        k0 = t * BLOCK_K
        ks = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + toks[None, :] * stride_xm + ks[:, None],
                     mask=tok_mask[None, :] & (ks[:, None] < K), other=0.0).to(DTYPE)
        w = load_weight_tile(codes_ptr, high_ptr, rows, row_mask, k0, stride_c, stride_h, DTYPE, BITS,
                             BLOCK_N, BLOCK_K)
        if PER_CHANNEL:
            acc = tl.dot(w, xt, acc)
        else:
            s = tl.load(scales_ptr + (k0 // GROUP) * N + rows, mask=row_mask, other=0.0).to(tl.float32)
            acc += tl.dot(w, xt) * s[:, None]
    if PER_CHANNEL:
        acc *= tl.load(scales_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    out = out_ptr + toks[None, :] * stride_om + rows[:, None]
    mask = tok_mask[None, :] & row_mask[:, None]
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out, acc, mask=mask)


@triton.jit
def _expand_kernel(codes_ptr, high_ptr, scales_ptr, out_ptr, N, K, stride_c, stride_h, stride_o,
                   BITS: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, SCALED: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One [BLOCK_N, BLOCK_K] tile of the weight: codes * scale in out's dtype (SCALED) or int8 codes."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    ks = k0 + tl.arange(0, BLOCK_K)
    row_mask = rows < N
    if BITS == 8:
        c = tl.load(codes_ptr + rows[:, None] * stride_c + ks[None, :], mask=row_mask[:, None], other=0)
    else:
        u = load_biased_codes(codes_ptr, high_ptr, rows, row_mask, k0, stride_c, stride_h, BITS, BLOCK_N, BLOCK_K)
        c = (u - (1 << (BITS - 1))).to(tl.int8)
    out = out_ptr + rows[:, None] * stride_o + ks[None, :]
    if SCALED:
        if PER_CHANNEL:
            s = tl.load(scales_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        else:
            s = tl.load(scales_ptr + (k0 // GROUP) * N + rows, mask=row_mask, other=0.0).to(tl.float32)
        tl.store(out, (c.to(tl.float32) * s[:, None]).to(out_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & (ks[None, :] < K))
    else:
        tl.store(out, c, mask=row_mask[:, None])


def expand_weight(w: LowbitWeight, dtype: torch.dtype) -> torch.Tensor:
    """The weight expanded on the GPU in one pass: `dtype` float [n, k] (codes times scales), or for
    dtype=torch.int8 the signed codes [n, k_pad] (zero padded) for the INT8 kernel."""
    if not w.per_channel and w.group % 16:
        raise ValueError(f"group size {w.group} is not a multiple of 16: no kernel tile fits it")
    scaled = dtype != torch.int8
    cols = w.k if scaled else w.k_pad
    out = torch.empty(w.n, cols, device=w.codes.device, dtype=dtype)
    block_k = 128 if w.per_channel else min(128, w.group & -w.group)
    high = w.high if w.high is not None else w.codes
    grid = (triton.cdiv(w.n, 32), w.k_pad // block_k)
    _expand_kernel[grid](w.codes, high, w.scales, out, w.n, w.k, w.codes.stride(0), high.stride(0), out.stride(0),
                         BITS=w.bits, GROUP=w.group, PER_CHANNEL=w.per_channel, SCALED=scaled, BLOCK_N=32,
                         BLOCK_K=block_k, num_warps=4)
    return out


def wa16_configs(m: int, n: int, k: int) -> list[GemmConfig]:
    """Candidate configs for M tokens and an [n, k] weight; the first is the default."""
    if interpreting():
        return [GemmConfig(16, 32, 64)]
    if m <= 16:
        def split(block_n: int) -> int:  # enough programs (>= 256) that every SM streams weights
            return min(8, triton.cdiv(256, triton.cdiv(n, block_n)))

        return [GemmConfig(16, 64, 128, split(64), 4, 3), GemmConfig(16, 32, 128, split(32), 4, 3),
                GemmConfig(16, 16, 256, split(16), 4, 3), GemmConfig(16, 64, 256, split(64), 4, 3),
                GemmConfig(16, 128, 128, split(128), 8, 3), GemmConfig(16, 32, 256, split(32), 4, 4)]
    if m <= 128:
        return [GemmConfig(m_bucket(m), 64, 128, 1, 4, 4), GemmConfig(m_bucket(m), 128, 128, 1, 4, 3),
                GemmConfig(m_bucket(m), 32, 256, 1, 4, 3), GemmConfig(m_bucket(m), 64, 128, 2, 4, 4)]
    return [GemmConfig(128, 128, 128, 1, 8, 3), GemmConfig(128, 128, 64, 1, 8, 4),
            GemmConfig(128, 128, 128, dequant=True)]


def _launch_wa16(x2: torch.Tensor, w: LowbitWeight, bias: torch.Tensor | None, cfg: GemmConfig) -> torch.Tensor:
    if cfg.dequant:
        return torch.nn.functional.linear(x2, expand_weight(w, x2.dtype), bias)
    m = x2.shape[0]
    if cfg.split_k > 1:
        out = torch.zeros(m, w.n, device=x2.device, dtype=torch.float32)
    else:
        out = torch.empty(m, w.n, device=x2.device, dtype=x2.dtype)
    high = w.high if w.high is not None else w.codes
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(w.n, cfg.block_n), cfg.split_k)
    _wa16_kernel[grid](
        x2, w.codes, high, w.scales, bias if bias is not None else w.scales, out,
        m, w.n, w.k, w.k_pad, x2.stride(0), out.stride(0), w.codes.stride(0), high.stride(0),
        BITS=w.bits, GROUP=w.group, PER_CHANNEL=w.per_channel, HAS_BIAS=bias is not None,
        SPLIT_K=cfg.split_k, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=8,
        DOT_F32=interpreting() and x2.dtype == torch.bfloat16,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out if cfg.split_k == 1 else out.to(x2.dtype)


def wa16_gemm(x: torch.Tensor, w: LowbitWeight, bias: torch.Tensor | None = None,
              config: GemmConfig | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) for fp16/bf16 x [..., k] and a low-bit weight; returns x's dtype, [..., n].

    Without `config` the fastest of `wa16_configs` is picked once per (M bucket, n, k, bits, group, dtype).
    """
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"wa16_gemm takes float16 or bfloat16 activations, got {x.dtype}")
    if x.shape[-1] != w.k:
        raise ValueError(f"activations have {x.shape[-1]} features, the weight expects {w.k}")
    x2 = x.reshape(-1, w.k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if bias is not None:
        bias = bias.contiguous()
    if config is None:
        key = ("wa16", m_bucket(m), w.n, w.k, w.bits, w.group, x.dtype)
        config = _TUNED.get(key)
        if config is None:
            cands = [fit_block_k(c, w, m) for c in wa16_configs(m, w.n, w.k)]
            config = pick_config(key, cands, lambda c: _launch_wa16(x2, w, bias, c))
    else:
        config = fit_block_k(config, w, m)
    return _launch_wa16(x2, w, bias, config).reshape(*x.shape[:-1], w.n)

