"""BTC GEMM: any W/A bit pair on binary tensor cores (`mma ... .b1.and.popc`), FlexQ / ABQ-LLM style.

y = x @ W^T (+ bias) for a weight in `btc_layout`'s bit planes: x [..., K] bf16/fp16 is quantized per token to
A6/A8 (`wa8_gemm.quantize_rows`, the same codes as the A8 GEMM and the reference) and cut into bit planes by a
Triton kernel; the CUDA C++ kernel (cuda/btc_gemm.cu, compiled with NVRTC through `cuda_build`, cached under
~/.cache/lowc/btc_gemm) runs one binary MMA per plane pair. The result equals `wa8_gemm.wa8_reference` up to the
order of fp32 additions across warps. Weights of 2, 3, 4, 6 or 8 bits; activations of 6 or 8 bits.

Where it pays: B_w * B_a binary MMAs replace one INT8 MMA, at 8x the INT8 rate on Hopper, so in prefill it loses
to the unpack-to-INT8 GEMM (H100: 0.08-0.26x at 4096 tokens), while at one token, where only bytes and unpacking
count, it is 1.3-2.6x faster than that GEMM (benchmarks/kernels_btc.py, results/kernels_btc_h100.json).
On CPU `btc_gemm` raises; `btc_layout.btc_emulate` computes the same arithmetic in torch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import cuda_build
from .btc_layout import BTCWeight
from .cuda_build import CUDA_DIR, backend, check_operands
from .wa8_gemm import quantize_rows

KERNEL_NAME = "lowc_btc_gemm"
SOURCE = CUDA_DIR / "btc_gemm.cu"


class BTCConfig(NamedTuple):
    """Warps over weight rows (wn, 16 rows each) and over K (wk, partial sums meet in shared memory), 8-token tiles
    per warp (nt)."""

    wn: int = 1
    wk: int = 4
    nt: int = 1


@triton.jit
def _pack_planes_kernel(q_ptr, out_ptr, K, KW, T, stride_q, BITS: tl.constexpr, BLOCK_W: tl.constexpr):
    """Bit planes of int8 codes, one token row and BLOCK_W words per program, in the chunk-transposed order."""
    row = tl.program_id(0)
    words = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    lanes = tl.arange(0, 32)
    cols = words[:, None] * 32 + lanes[None, :]
    q = tl.load(q_ptr + row * stride_q + cols, mask=cols < K, other=0).to(tl.int32)
    within = words % 16
    dest = (words - within) + (within % 4) * 4 + within // 4  # word w of sub-group s -> 4w + s
    for b in tl.static_range(BITS):
        # distinct bits: their sum is their OR (bit 31 wraps to the sign bit of the int32 word)
        word = tl.sum(((q >> b) & 1) << lanes[None, :], axis=1)
        tl.store(out_ptr + (b * T + row) * KW + dest, word, mask=words < KW)


def pack_activation_planes(q: torch.Tensor, bits: int, k_pad: int) -> torch.Tensor:
    """int8 codes [T, K] -> int32 bit planes [bits, T, k_pad / 32] (`btc_layout.bit_planes` on the GPU)."""
    t, k = q.shape
    kw = k_pad // 32
    out = torch.empty(bits, t, kw, dtype=torch.int32, device=q.device)
    block_w = 16
    if t:
        _pack_planes_kernel[(t, triton.cdiv(kw, block_w))](q, out, k, kw, t, q.stride(0), BITS=bits,
                                                           BLOCK_W=block_w, num_warps=4)
    return out


def btc_quantize(x: torch.Tensor, act_bits: int, k_pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] -> (activation bit planes [act_bits, T, k_pad / 32], per-token fp32 scales [T])."""
    q, s = quantize_rows(x, act_bits)
    return pack_activation_planes(q, act_bits, k_pad), s


def pick_config(tokens: int) -> BTCConfig:
    """Decode: one 16-row tile per CTA, K split over 4 warps, so a 4096-row weight gives 256 CTAs. Prefill: four
    row tiles and 16 tokens per CTA."""
    if tokens <= 8:
        return BTCConfig(1, 4, 1)
    if tokens <= 16:
        return BTCConfig(1, 4, 2)
    return BTCConfig(4, 1, 2)


def kernel_source() -> str:
    return cuda_build.kernel_source(SOURCE.name)


def defines(half: bool, wbits: int, abits: int, cfg: BTCConfig, gsteps: int) -> str:
    return (f"#define LOWC_HALF {int(half)}\n#define LOWC_WBITS {wbits}\n#define LOWC_ABITS {abits}\n"
            f"#define LOWC_WN {cfg.wn}\n#define LOWC_WK {cfg.wk}\n#define LOWC_NT {cfg.nt}\n"
            f"#define LOWC_GSTEPS {gsteps}\n")


def group_steps(w: BTCWeight) -> int:
    """Scale group in 128-column steps (0: one scale per row)."""
    return 0 if w.per_channel else w.group // 128


def btc_gemm(x: torch.Tensor, w: BTCWeight, bias: torch.Tensor | None = None, act_bits: int = 8,
             config: BTCConfig | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) with x quantized per token to `act_bits` and the product on binary tensor cores;
    x [..., K] bf16/fp16, returns x's dtype [..., N]."""
    check_operands("btc_gemm", x, w.planes, w.k, w.n, bias, "binary tensor cores",
                   "lowc.kernels.btc_layout.btc_emulate or wa8_gemm.wa8_reference")
    x2 = x.reshape(-1, w.k)
    tokens = x2.shape[0]
    out = torch.empty(tokens, w.n, device=x.device, dtype=x.dtype)
    if tokens == 0:
        return out.reshape(*x.shape[:-1], w.n)
    xp, xs = btc_quantize(x2, act_bits, w.k_pad)
    cfg = config or pick_config(tokens)
    if bias is not None:
        bias = bias.to(x.dtype).contiguous()
    variant = (x.dtype == torch.float16, w.bits, act_bits, cfg, group_steps(w))
    kernel = backend().kernel(KERNEL_NAME, variant, lambda: [defines(*variant) + kernel_source()], "btc_gemm")
    grid = (-(-w.n_pad // (16 * cfg.wn)), -(-tokens // (8 * cfg.nt)), 1)
    args = (w.planes.data_ptr(), xp.data_ptr(), w.scales.data_ptr(), xs.data_ptr(),
            bias.data_ptr() if bias is not None else 0, out.data_ptr(),
            tokens, w.n, w.n_pad, w.k_pad // 32, tokens, w.n, int(bias is not None))
    backend().launch(kernel, grid, (32 * cfg.wn * cfg.wk, 1, 1), args)
    return out.reshape(*x.shape[:-1], w.n)

