"""Triton W{4,6,8}A16 GEMM: y = x @ W^T (+ bias) with W in the kernel layout of `lowbit_layout`.

Weights are unpacked in registers and never written back in 16 bits. Each program computes the transposed tile
acc[BLOCK_N, BLOCK_M] = W_tile @ x_tile^T ("swap AB"): the weight is the left operand, so one tile of 16 tokens
already fills the tensor cores' smallest shape during decode, and the unpacked weight can feed the MMA straight
from registers. Integer codes are exact in fp16/bf16, so each K tile's dot product is taken on the raw codes in
fp32 and the group's scale multiplies the tile's partial sums (BLOCK_N x BLOCK_M products instead of
BLOCK_N x BLOCK_K); a per-channel weight is scaled once after the K loop.

Decode (M <= 16) is memory-bound: configs with narrow BLOCK_N and split-K put every SM to work streaming weights;
partial sums of a split-K launch meet in an fp32 buffer through atomic adds. A single token (batch-1 decode) has a
GEMV kernel besides: no tensor cores (15 of 16 MMA rows would be padding), each program unpacks a [BLOCK_N,
BLOCK_K] weight tile to fp32 and reduces it against the token in registers. Prefill uses wide tiles.

Scales may be a column slice of a wider [groups, N'] matrix (a projection fused with its neighbours at load time
shares their memory), so the kernels take the scales' row stride instead of assuming N.

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
    gemv: bool = False  # the one-token kernel (block_m ignored)
    cuda: bool = False  # the CUDA C++ tensor-core decode kernel of `wa16_decode` (1..16 tokens, INT4/INT6)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 at import time)."""
    from triton import knobs

    return bool(knobs.runtime.interpret)


def m_bucket(m: int) -> int:
    """Token counts that share tuned configs: 1 (batch-1 decode), 16 (2..16), then powers of two up to 4096."""
    return 1 if m == 1 else 16 if m <= 16 else min(triton.next_power_of_2(m), 4096)


_TUNED: dict[tuple, GemmConfig] = {}


_FLUSH: dict[int, torch.Tensor] = {}


def bench_cold(fn: Callable[[], object]) -> float:
    """Milliseconds per call of `fn` with the L2 cache cleared before each call, timed as CUDA-graph replays
    (a decode GEMM runs for a few microseconds, less than its host-side launch; in a model every layer's weights
    come from DRAM, so a weight left in L2 by the previous repetition would rank configs wrongly)."""
    dev = torch.cuda.current_device()
    if dev not in _FLUSH:
        l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20)
        _FLUSH[dev] = torch.empty(2 * l2, dtype=torch.int8, device=f"cuda:{dev}")
    flush = _FLUSH[dev]

    def both():
        flush.zero_()
        fn()

    bench = triton.testing.do_bench_cudagraph
    return bench(both, rep=10, return_mode="median") - bench(flush.zero_, rep=10, return_mode="median")


def pick_config(key: tuple, candidates: list[GemmConfig], launch: Callable[[GemmConfig], object],
                cold: bool = False) -> GemmConfig:
    """The fastest of `candidates` for `key`, timed once per process as CUDA-graph replays (decode kernels take a
    few microseconds, less than their host-side launch, so eager timing would rank launch overhead), with L2
    cleared before each call when `cold` (decode shapes: see `bench_cold`); the first candidate when there is only
    one, when interpreting (CPU tests) or when LOWC_AUTOTUNE=0. A candidate whose output differs from the first
    candidate's (relative error > 1e-2) is dropped with a warning: a kernel that is wrong on this GPU must never
    win on speed."""
    if len(candidates) == 1 or interpreting() or os.environ.get("LOWC_AUTOTUNE", "1") == "0":
        best = candidates[0]
    else:
        times = []
        ref = launch(candidates[0]).float()
        for cfg in candidates:
            try:
                out = launch(cfg)  # also compiles outside the timed graphs
                err = float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))
                if not err <= 1e-2:
                    import warnings

                    warnings.warn(f"lowc: GEMM config {tuple(cfg)} disagrees with {tuple(candidates[0])} on {key} "
                                  f"(relative difference {err:.3g}); it is left out")
                    continue
                if cold:
                    times.append((bench_cold(lambda: launch(cfg)), cfg))
                else:
                    times.append((triton.testing.do_bench_cudagraph(lambda: launch(cfg), rep=5,
                                                                    return_mode="median"), cfg))
            except triton.runtime.errors.OutOfResources:
                continue
        best = min(times)[1]
    _TUNED[key] = best
    return best


def fit_block_k(cfg: GemmConfig, w: LowbitWeight, m: int) -> GemmConfig:
    """Shrink BLOCK_K so a K tile never straddles two scale groups (the GEMV kernel also takes whole groups),
    and BLOCK_M for few tokens. CUDA decode configs are taken as they are (`wa16_decode` checks them)."""
    if cfg.cuda:
        return cfg
    block_k = cfg.block_k
    while w.k_pad % block_k:
        block_k //= 2
    if cfg.gemv and not w.per_channel and block_k > w.group and block_k % w.group == 0 \
            and (block_k // w.group) & (block_k // w.group - 1) == 0:
        return cfg._replace(block_k=block_k)  # the GEMV kernel takes tiles of whole groups (a power of two)
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
                 M, N, K, K_PAD, stride_xm, stride_om, stride_c, stride_h, stride_s,
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
            s = tl.load(scales_ptr + (k0 // GROUP) * stride_s + rows, mask=row_mask, other=0.0).to(tl.float32)
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
def load_code_bytes(codes_ptr, high_ptr, rows, mask, k0, stride_c, stride_h,
                    BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The raw bytes of one weight tile, rows masked by `mask`: (codes, high plane) for INT6, else (codes, codes)."""
    WIDTH: tl.constexpr = BLOCK_K if BITS == 8 else BLOCK_K // 2  # bytes per row of the tile
    cols = tl.multiple_of(k0 * WIDTH // BLOCK_K, WIDTH) + tl.arange(0, WIDTH)
    b = tl.load(codes_ptr + rows[:, None] * stride_c + cols[None, :], mask=mask[:, None], other=0)
    if BITS == 6:
        hcols = tl.multiple_of(k0 // 4, BLOCK_K // 4) + tl.arange(0, BLOCK_K // 4)
        h = tl.load(high_ptr + rows[:, None] * stride_h + hcols[None, :], mask=mask[:, None], other=0)
    else:
        h = b
    return b, h


@triton.jit
def f32_codes(b, h, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Signed codes as float32 [BLOCK_N, BLOCK_K] from `load_code_bytes`. 0x4B000000|u is 2^23+u for u < 2^23:
    an OR and a subtraction instead of an int-to-float conversion (which runs at a quarter of the FMA rate)."""
    if BITS == 8:
        u = b.to(tl.int32) + 128
    else:
        b = b.to(tl.int32)
        u = tl.reshape(tl.join(b & 0xF, b >> 4), (BLOCK_N, BLOCK_K))
        if BITS == 6:
            h = h.to(tl.int32)
            hi = tl.join(tl.join(h & 0x3, (h >> 4) & 0x3), tl.join((h >> 2) & 0x3, h >> 6))  # as load_biased_codes
            u = u | (tl.reshape(hi, (BLOCK_N, BLOCK_K)) << 4)
    bias: tl.constexpr = 1 << (BITS - 1)  # INT8 is biased by 128 above
    return (u | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + bias)


@triton.jit
def _wa16_gemv_kernel(x_ptr, xs_ptr, codes_ptr, high_ptr, scales_ptr, bias_ptr, out_ptr,
                      N, K, K_PAD, stride_xm, stride_om, stride_c, stride_h, stride_s,
                      BITS: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                      HAS_XSCALE: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, TILE_GROUPS: tl.constexpr):
    """out[tok, rows] (+)= W[rows, K range of this split] @ x[tok] (* xs[tok]); grid (N tiles, SPLIT_K, tokens).

    x is 16-bit activations, or with HAS_XSCALE int8 activation codes and their per-token scales (the A8/A6 GEMM
    at one token): code products and their sums over a 128-column group are exact in fp32 (< 2^24), as in the
    INT8 tensor-core kernel's int32 accumulators.

    A K tile lies in one scale group (TILE_GROUPS = 1) or covers TILE_GROUPS whole groups: wide tiles keep more
    bytes in flight than one 128-column group would. The next tile's bytes are loaded before the current one is
    unpacked (a register double buffer), so every program always has a load outstanding."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    tok = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    tiles = K_PAD // BLOCK_K
    per_split = tl.cdiv(tiles, SPLIT_K)
    t_begin = pid_k * per_split
    t_end = tl.minimum(t_begin + per_split, tiles)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    k_end = tl.minimum(t_end * BLOCK_K, K)  # loads at or past it are masked (the prefetch after the last tile)
    ks = t_begin * BLOCK_K + tl.arange(0, BLOCK_K)
    xt = tl.load(x_ptr + tok * stride_xm + ks, mask=ks < k_end, other=0.0)
    b, h = load_code_bytes(codes_ptr, high_ptr, rows, rows < N * (t_begin < t_end).to(tl.int32), t_begin * BLOCK_K,
                           stride_c, stride_h, BITS, BLOCK_N, BLOCK_K)
    for t in range(t_begin, t_end):
        k0 = t * BLOCK_K
        ks_next = ks + BLOCK_K
        x_next = tl.load(x_ptr + tok * stride_xm + ks_next, mask=ks_next < k_end, other=0.0)
        b_next, h_next = load_code_bytes(codes_ptr, high_ptr, rows, rows < N * (t + 1 < t_end).to(tl.int32),
                                         k0 + BLOCK_K, stride_c, stride_h, BITS, BLOCK_N, BLOCK_K)
        prod = f32_codes(b, h, BITS, BLOCK_N, BLOCK_K) * xt.to(tl.float32)[None, :]
        if PER_CHANNEL:
            acc += tl.sum(prod, axis=1)
        elif TILE_GROUPS == 1:
            s = tl.load(scales_ptr + (k0 // GROUP) * stride_s + rows, mask=row_mask, other=0.0).to(tl.float32)
            acc += tl.sum(prod, axis=1) * s
        else:
            part = tl.sum(tl.reshape(prod, (BLOCK_N, TILE_GROUPS, BLOCK_K // TILE_GROUPS)), axis=2)
            gs = k0 // GROUP + tl.arange(0, TILE_GROUPS)
            s = tl.load(scales_ptr + gs[None, :] * stride_s + rows[:, None], mask=row_mask[:, None], other=0.0)
            acc += tl.sum(part * s.to(tl.float32), axis=1)
        xt, b, h, ks = x_next, b_next, h_next, ks_next
    if PER_CHANNEL:
        acc *= tl.load(scales_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    if HAS_XSCALE:
        acc *= tl.load(xs_ptr + tok)
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    out = out_ptr + tok * stride_om + rows
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask)
    else:
        tl.atomic_add(out, acc, mask=row_mask)


@triton.jit
def _expand_kernel(codes_ptr, high_ptr, scales_ptr, out_ptr, N, K, stride_c, stride_h, stride_s, stride_o,
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
            s = tl.load(scales_ptr + (k0 // GROUP) * stride_s + rows, mask=row_mask, other=0.0).to(tl.float32)
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
    _expand_kernel[grid](w.codes, high, w.scales, out, w.n, w.k, w.codes.stride(0), high.stride(0),
                         w.scales.stride(0), out.stride(0),
                         BITS=w.bits, GROUP=w.group, PER_CHANNEL=w.per_channel, SCALED=scaled, BLOCK_N=32,
                         BLOCK_K=block_k, num_warps=4)
    return out


def k_splits(n: int, block_n: int, programs: int = 256) -> int:
    """Split-K factor (at most 8) that gives an n-row weight about `programs` programs, so every SM streams
    weights during decode."""
    return min(8, triton.cdiv(programs, triton.cdiv(n, block_n)))


def gemv_configs(n: int) -> list[GemmConfig]:
    """One-token GEMV candidates for an n-row weight: the best of a sweep on H100 (benchmarks/kernels_gemm.py
    --sweep NxK --tokens 1), each without and with enough K splits for ~264 programs. Stages stay 1: the kernel
    double-buffers its loads itself."""
    return [GemmConfig(1, bn, bk, sk, warps, 1, gemv=True)
            for bn, bk, warps in ((8, 512, 4), (16, 512, 4), (8, 512, 2), (4, 1024, 2), (8, 1024, 4),
                                  (16, 1024, 4), (32, 512, 4))
            for sk in sorted({1, k_splits(n, bn, 264)})]


def output_buffer(m: int, n: int, device: torch.device, split_k: int, dtype: torch.dtype) -> torch.Tensor:
    """A GEMM's output: zeroed fp32 when split-K programs add their partial sums into it, else `dtype`."""
    if split_k > 1:
        return torch.zeros(m, n, device=device, dtype=torch.float32)
    return torch.empty(m, n, device=device, dtype=dtype)


def launch_gemv(x2: torch.Tensor, w: LowbitWeight, bias: torch.Tensor | None, cfg: GemmConfig,
                out_dtype: torch.dtype, x_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The GEMV kernel on 16-bit activations, or on int8 activation codes with their fp32 per-token `x_scale`."""
    m = x2.shape[0]
    out = output_buffer(m, w.n, x2.device, cfg.split_k, out_dtype)
    high = w.high if w.high is not None else w.codes
    _wa16_gemv_kernel[(triton.cdiv(w.n, cfg.block_n), cfg.split_k, m)](
        x2, x_scale if x_scale is not None else w.scales, w.codes, high, w.scales,
        bias if bias is not None else w.scales, out,
        w.n, w.k, w.k_pad, x2.stride(0), out.stride(0), w.codes.stride(0), high.stride(0), w.scales.stride(0),
        BITS=w.bits, GROUP=w.group, PER_CHANNEL=w.per_channel, HAS_BIAS=bias is not None,
        HAS_XSCALE=x_scale is not None, SPLIT_K=cfg.split_k, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        TILE_GROUPS=1 if w.per_channel else max(1, cfg.block_k // w.group),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out if cfg.split_k == 1 else out.to(out_dtype)


def wa16_configs(m: int, n: int, k: int) -> list[GemmConfig]:
    """Candidate configs for M tokens and an [n, k] weight; the first is the default."""
    if interpreting():
        return [GemmConfig(16, 32, 64)]

    def split(block_n: int) -> int:
        return k_splits(n, block_n)

    if m == 1:
        return gemv_configs(n) + [GemmConfig(16, 64, 128, split(64), 4, 3), GemmConfig(16, 16, 256, split(16), 4, 3)]
    if m <= 16:
        return [GemmConfig(16, 64, 128, split(64), 4, 3), GemmConfig(16, 32, 128, split(32), 4, 3),
                GemmConfig(16, 16, 256, split(16), 4, 3), GemmConfig(16, 64, 256, split(64), 4, 3),
                GemmConfig(16, 128, 128, split(128), 8, 3), GemmConfig(16, 32, 256, split(32), 4, 4)]
    if m <= 128:
        return [GemmConfig(m_bucket(m), 64, 128, 1, 4, 4), GemmConfig(m_bucket(m), 128, 128, 1, 4, 3),
                GemmConfig(m_bucket(m), 32, 256, 1, 4, 3), GemmConfig(m_bucket(m), 64, 128, 2, 4, 4)]
    return [GemmConfig(128, 128, 128, 1, 8, 3), GemmConfig(128, 128, 64, 1, 8, 4),
            GemmConfig(128, 128, 128, dequant=True)]


def _launch_wa16(x2: torch.Tensor, w: LowbitWeight, bias: torch.Tensor | None, cfg: GemmConfig) -> torch.Tensor:
    if cfg.cuda:
        from .wa16_decode import launch_decode

        return launch_decode(x2, w, bias, cfg)
    if cfg.dequant:
        return torch.nn.functional.linear(x2, expand_weight(w, x2.dtype), bias)
    if cfg.gemv:
        return launch_gemv(x2, w, bias, cfg, x2.dtype)
    m = x2.shape[0]
    out = output_buffer(m, w.n, x2.device, cfg.split_k, x2.dtype)
    high = w.high if w.high is not None else w.codes
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(w.n, cfg.block_n), cfg.split_k)
    _wa16_kernel[grid](
        x2, w.codes, high, w.scales, bias if bias is not None else w.scales, out,
        m, w.n, w.k, w.k_pad, x2.stride(0), out.stride(0), w.codes.stride(0), high.stride(0), w.scales.stride(0),
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
        if not interpreting():
            from .dispatch import load_table

            load_table(x.device)  # the committed dispatch table of this GPU model, once per process
        config = _TUNED.get(key)
        if config is None:
            cands = [fit_block_k(c, w, m) for c in wa16_configs(m, w.n, w.k)]
            from .wa16_decode import candidates as decode_candidates

            cands += decode_candidates(m, w)  # the CUDA decode kernel at 1..16 tokens, where it applies
            config = pick_config(key, cands, lambda c: _launch_wa16(x2, w, bias, c), cold=m <= 16)
    else:
        config = fit_block_k(config, w, m)
    return _launch_wa16(x2, w, bias, config).reshape(*x.shape[:-1], w.n)

