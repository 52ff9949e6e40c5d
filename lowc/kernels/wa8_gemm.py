"""Triton W{4,6,8}A8 / A6 GEMM: per-token INT8 activations times low-bit weights on the INT8 tensor cores.

Two kernels:
- `quantize_rows`: per-token symmetric quantization of fp16/bf16 activations, one program per row: scale =
  absmax / qmax (qmax 127 for A8, 31 for A6, whose codes live in int8 containers), codes = round half away from
  zero of x / scale, both divisions IEEE-rounded so the result is bit-identical to `quantize_rows_reference`.
- `wa8_gemm`: weights are unpacked to int8 in registers, each K tile is one int8 x int8 -> int32 `tl.dot`.
  For group-wise weights every K tile lies in one group (BLOCK_K divides the group) and its int32 partial sum is
  converted to fp32 and multiplied by that group's scale; a per-channel weight keeps one int32 accumulator and is
  scaled once. The token's scale multiplies the result last. Tiles are computed transposed, acc[BLOCK_N, BLOCK_M]
  = W_tile @ xq_tile^T, as in `wa16_gemm`, so both int8 operands are K-major as the tensor cores require.
  A `gemv=True` config runs one token through `wa16_gemm`'s GEMV kernel on the int8 codes instead (no tensor
  cores; the products and their sums over a group are exact in fp32, the token's scale applied last); the
  autotuner offers it next to the MMA configs for one token.

`wa8_reference` is the exact emulation in torch (integer products, int32 sums per group, scales in the same order).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import load_table
from .lowbit_layout import LowbitWeight
from .packing import unpack_int
from .reference import quantize_activations
from .wa16_gemm import (_TUNED, GemmConfig, expand_weight, fit_block_k, gemv_configs, interpreting, k_splits,
                        launch_gemv, load_biased_codes, m_bucket, output_buffer, pick_config, tile_coords)

ACT_BITS = (6, 8)


def _act_qmax(act_bits: int) -> int:
    if act_bits not in ACT_BITS:
        raise ValueError(f"unsupported activation bits {act_bits} (supported: 6, 8)")
    return (1 << (act_bits - 1)) - 1


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q,
                          QMAX: tl.constexpr, BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr):
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_x
    q_row = q_ptr + row.to(tl.int64) * stride_q
    cols = tl.arange(0, BLOCK_K)
    if ONE_PASS:
        x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=0)
    else:
        amax = 0.0
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=0))
    scale = tl.where(amax > 0, tl.div_rn(amax, QMAX * 1.0), 1.0)
    tl.store(s_ptr + row, scale)
    if ONE_PASS:
        v = tl.div_rn(x, scale)
        q = tl.where(v < 0, -tl.floor(-v + 0.5), tl.floor(v + 0.5))
        tl.store(q_row + cols, tl.clamp(q, -QMAX, QMAX).to(tl.int8), mask=cols < K)
    else:
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
            v = tl.div_rn(x, scale)
            q = tl.where(v < 0, -tl.floor(-v + 0.5), tl.floor(v + 0.5))
            tl.store(q_row + k0 + cols, tl.clamp(q, -QMAX, QMAX).to(tl.int8), mask=k0 + cols < K)


def quantize_rows(x: torch.Tensor, act_bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric quantization of x [M, K] (fp16/bf16/fp32) -> (int8 codes [M, K], fp32 scales [M]).

    A row's scale is absmax/qmax (1 for an all-zero row); codes lie in [-qmax, qmax], qmax = 2^(act_bits-1) - 1.
    """
    qmax = _act_qmax(act_bits)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, k = x2.shape
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    s = torch.empty(m, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(k)
    one_pass = block <= 16384
    block = block if one_pass else 4096
    warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    if m:
        _quantize_rows_kernel[(m,)](x2, q, s, k, x2.stride(0), q.stride(0), QMAX=qmax, BLOCK_K=block,
                                    ONE_PASS=one_pass, num_warps=warps)
    return q.reshape(x.shape), s.reshape(x.shape[:-1])


def quantize_rows_reference(x: torch.Tensor, act_bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of `quantize_rows`, bit for bit: (int8 codes, fp32 scales); see `reference.quantize_activations`."""
    return quantize_activations(x, act_bits)


def wa8_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bits: int, group: int,
                  columns: int, act_bits: int = 8, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Exact emulation of the A8/A6 GEMM on canonical packed weights; returns x's dtype [..., N].

    Activations are quantized by `quantize_rows_reference`; per group of `group` columns the integer products are
    summed exactly (in float64, equal to the kernel's int32), converted to fp32 and multiplied by the group's weight
    scale, the groups are added in order, then each row is multiplied by its activation scale and the bias added.
    """
    xq, xs = quantize_rows_reference(x.reshape(-1, columns), act_bits)
    # float64 products and sums of int8 codes are exact (|sum| < 2^53) on every device, unlike int64 matmul
    wq = unpack_int(qweight, bits, columns).to(torch.float64)
    xq = xq.to(torch.float64)
    n_groups = scales.shape[1]
    if n_groups == 1:
        acc = (xq @ wq.t()).to(torch.float32) * scales[:, 0].float()
    else:
        acc = torch.zeros(xq.shape[0], wq.shape[0], dtype=torch.float32, device=x.device)
        for g in range(n_groups):
            sl = slice(g * group, min((g + 1) * group, columns))
            acc = acc + (xq[:, sl] @ wq[:, sl].t()).to(torch.float32) * scales[:, g].float()
    acc = acc * xs.unsqueeze(-1)
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(x.dtype).reshape(*x.shape[:-1], -1)


@triton.jit
def _int32_to_f32(v):
    """Exact int32 -> fp32 for |v| <= 2^22 with one integer and one float add: the conversion instruction
    runs at a quarter of the FP32 rate, and a group-wise GEMM converts every partial sum of every K tile."""
    return (v + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def _load_int8_tile(codes_ptr, high_ptr, rows, row_mask, k0, stride_c, stride_h,
                    BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Signed weight codes int8 [BLOCK_N, BLOCK_K]."""
    if BITS == 8:
        cols = k0 + tl.arange(0, BLOCK_K)
        return tl.load(codes_ptr + rows[:, None] * stride_c + cols[None, :], mask=row_mask[:, None], other=0)
    u = load_biased_codes(codes_ptr, high_ptr, rows, row_mask, k0, stride_c, stride_h, BITS, BLOCK_N, BLOCK_K)
    return (u - (1 << (BITS - 1))).to(tl.int8)


@triton.jit
def _wa8_kernel(xq_ptr, xs_ptr, codes_ptr, high_ptr, scales_ptr, bias_ptr, out_ptr,
                M, N, K, K_PAD, stride_xm, stride_om, stride_c, stride_h, stride_s,
                BITS: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                GROUP_M: tl.constexpr):
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
    acc_i = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    for t in range(t_begin, t_end):
        k0 = t * BLOCK_K
        ks = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(xq_ptr + toks[None, :] * stride_xm + ks[:, None],
                     mask=tok_mask[None, :] & (ks[:, None] < K), other=0)
        w = _load_int8_tile(codes_ptr, high_ptr, rows, row_mask, k0, stride_c, stride_h, BITS, BLOCK_N, BLOCK_K)
        if PER_CHANNEL:
            acc_i = tl.dot(w, xt, acc_i, out_dtype=tl.int32)
        else:
            tl.static_assert(BLOCK_K <= 256)  # |partial| <= 128 * 128 * 256 = 2^22
            s = tl.load(scales_ptr + (k0 // GROUP) * stride_s + rows, mask=row_mask, other=0.0).to(tl.float32)
            acc += _int32_to_f32(tl.dot(w, xt, out_dtype=tl.int32)) * s[:, None]
    if PER_CHANNEL:
        acc = acc_i.to(tl.float32) * tl.load(scales_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    acc *= tl.load(xs_ptr + toks, mask=tok_mask, other=0.0)[None, :]
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    out = out_ptr + toks[None, :] * stride_om + rows[:, None]
    mask = tok_mask[None, :] & row_mask[:, None]
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out, acc, mask=mask)


def wa8_configs(m: int, n: int, k: int) -> list[GemmConfig]:
    """Candidate configs for M tokens and an [n, k] weight; the first is the default."""
    if interpreting():
        return [GemmConfig(16, 32, 64)]
    if m <= 16:
        def split(block_n: int) -> int:
            return k_splits(n, block_n)

        mma = [GemmConfig(16, 64, 128, split(64), 4, 3), GemmConfig(16, 32, 128, split(32), 4, 3),
               GemmConfig(16, 16, 256, split(16), 4, 4), GemmConfig(16, 64, 256, split(64), 4, 4)]
        return mma + gemv_configs(n) if m == 1 else mma
    if m <= 128:
        return [GemmConfig(m_bucket(m), 64, 128, 1, 4, 4), GemmConfig(m_bucket(m), 128, 128, 1, 4, 3),
                GemmConfig(m_bucket(m), 64, 256, 1, 4, 3)]
    return [GemmConfig(128, 128, 128, 1, 8, 3), GemmConfig(256, 128, 128, 1, 8, 3),
            GemmConfig(128, 128, 128, 1, 8, 3, dequant=True), GemmConfig(256, 128, 128, 1, 8, 3, dequant=True)]


def _launch_wa8(xq: torch.Tensor, xs: torch.Tensor, w: LowbitWeight, bias: torch.Tensor | None,
                out_dtype: torch.dtype, cfg: GemmConfig) -> torch.Tensor:
    if cfg.cuda:  # 1..16 tokens: the CUDA tensor-core decode kernel on the int8 codes
        from .wa16_decode import launch_decode

        return launch_decode(xq, w, bias, cfg, x_scale=xs, out_dtype=out_dtype)
    if cfg.gemv:  # one token: the GEMV kernel on the int8 codes, exact per group like the int32 MMA sums
        return launch_gemv(xq, w, bias, cfg, out_dtype, x_scale=xs)
    if cfg.dequant and w.bits != 8:
        w = LowbitWeight(8, w.group, w.n, w.k, w.k_pad, expand_weight(w, torch.int8), None, w.scales)
    m = xq.shape[0]
    out = output_buffer(m, w.n, xq.device, cfg.split_k, out_dtype)
    high = w.high if w.high is not None else w.codes
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(w.n, cfg.block_n), cfg.split_k)
    _wa8_kernel[grid](
        xq, xs, w.codes, high, w.scales, bias if bias is not None else w.scales, out,
        m, w.n, w.k, w.k_pad, xq.stride(0), out.stride(0), w.codes.stride(0), high.stride(0), w.scales.stride(0),
        BITS=w.bits, GROUP=w.group, PER_CHANNEL=w.per_channel, HAS_BIAS=bias is not None,
        SPLIT_K=cfg.split_k, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=8,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out if cfg.split_k == 1 else out.to(out_dtype)


def wa8_gemm_quantized(xq: torch.Tensor, xs: torch.Tensor, w: LowbitWeight, bias: torch.Tensor | None = None,
                       out_dtype: torch.dtype = torch.bfloat16, config: GemmConfig | None = None) -> torch.Tensor:
    """y = (xq * xs) @ W^T (+ bias) for already quantized activations: int8 codes [M, k], fp32 scales [M]."""
    if xq.dtype != torch.int8 or xq.dim() != 2 or xq.shape[1] != w.k:
        raise ValueError(f"xq must be int8 [M, {w.k}], got {xq.dtype} {list(xq.shape)}")
    if xq.stride(-1) != 1:
        xq = xq.contiguous()
    xs = xs.float().contiguous()
    if bias is not None:
        bias = bias.contiguous()
    m = xq.shape[0]
    if config is None:
        key = ("wa8", m_bucket(m), w.n, w.k, w.bits, w.group, out_dtype)
        if not interpreting():
            load_table(xq.device)  # the committed dispatch table of this GPU model, once per process
        config = _TUNED.get(key)
        if config is None:
            cands = [fit_block_k(c, w, m) for c in wa8_configs(m, w.n, w.k)]
            from .wa16_decode import candidates as decode_candidates

            cands += decode_candidates(m, w)  # the CUDA decode kernel at 1..16 tokens, where it applies
            config = pick_config(key, cands, lambda c: _launch_wa8(xq, xs, w, bias, out_dtype, c), cold=m <= 16)
    else:
        config = fit_block_k(config, w, m)
    return _launch_wa8(xq, xs, w, bias, out_dtype, config)


def wa8_gemm(x: torch.Tensor, w: LowbitWeight, bias: torch.Tensor | None = None, act_bits: int = 8,
             config: GemmConfig | None = None) -> torch.Tensor:
    """y = Q(x) @ W^T (+ bias): x [..., k] fp16/bf16 quantized per token to `act_bits` (8 or 6), then the INT8
    GEMM; returns x's dtype [..., n]. Matches `wa8_reference` up to fp32 rounding of the scale products."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"wa8_gemm takes float16 or bfloat16 activations, got {x.dtype}")
    if x.shape[-1] != w.k:
        raise ValueError(f"activations have {x.shape[-1]} features, the weight expects {w.k}")
    xq, xs = quantize_rows(x.reshape(-1, w.k), act_bits)
    y = wa8_gemm_quantized(xq, xs, w, bias, x.dtype, config)
    return y.reshape(*x.shape[:-1], w.n)
