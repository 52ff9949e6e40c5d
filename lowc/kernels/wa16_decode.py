"""Tensor-core W4/W6 decode GEMM in CUDA C++ for 1..16 tokens, on `lowbit_layout`'s kernel layout: 16-bit
activations (A16, mma.sync m16n8k16) or int8 activation codes with per-token scales (A8/A6, m16n8k32 s8).

Decode reads every weight byte once per token batch, so its speed is the share of HBM bandwidth it sustains. The
Triton kernels of `wa16_gemm` reach 33-53% of copy bandwidth at one token: their unpacking costs more
instructions per byte than the SMs can issue while the loads stream. This kernel (lowc/kernels/cuda/
wa16_decode.cu) keeps each lane's 16-byte weight load as it is and permutes the activations instead, so a
16-bit pair of codes becomes an `mma.sync` operand in one LOP3 and one packed FMA; tensor cores do the products
and the fp32 sums. It reads the same layout as the Triton kernels, so the dispatch table can choose per shape.

Configs are `GemmConfig`s with `cuda=True`: block_m = 8 or 16 tokens, block_n = 16 * rows tiles per CTA,
block_k = 128 * chunks each warp loads before it unpacks, num_warps warps share the CTA's rows and deal its K
chunks among them, split_k CTAs split K (the last to finish sums the others' partials; no zero fill, no cast).
Supported: INT4 and INT6, group sizes that are multiples of 128 or per-channel, 1..16 tokens, sm_80 or newer.
With int8 activations the codes become int8 bytes (add 128 - bias per byte, XOR 0x80: two ops per four codes),
each 128-column chunk is summed exactly in int32 and scaled by its group's scale, the token scale last.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import cuda_build
from .lowbit_layout import LowbitWeight, code_bias
from .wa16_gemm import GemmConfig, interpreting

KERNEL_NAME = "lowc_wa16_decode"
SOURCE = Path(__file__).resolve().parent / "cuda" / "wa16_decode.cu"
CHUNK = 128  # K columns a lane quad covers per step: 4 lanes x 16 bytes of INT4 codes


def supports(w: LowbitWeight, m: int) -> bool:
    """Whether the kernel takes this weight at `m` tokens (INT4/INT6, 128-multiple groups or per-channel)."""
    return w.bits in (4, 6) and 1 <= m <= 16 and (w.per_channel or w.group % CHUNK == 0)


def _code_offset(bits: int, half: bool) -> str:
    """The packed pair -(magic + bias) that turns 0x4300|u (bf16 128+u) or 0x6400|u (fp16 1024+u) into u - bias."""
    magic = 1024.0 if half else 128.0
    v = torch.tensor(-(magic + code_bias(bits)), dtype=torch.float16 if half else torch.bfloat16)
    word = v.view(torch.int16).item() & 0xFFFF
    return f"0x{word:04X}{word:04X}u"


def kernel_source(bits: int, half: bool, per_channel: bool, cfg: GemmConfig, a8: bool = False) -> str:
    """The CUDA source of one variant: its #defines, common.cuh and wa16_decode.cu."""
    defines = (f"#define LOWC_HALF {int(half)}\n#define LOWC_BITS {bits}\n#define LOWC_R {cfg.block_n // 16}\n"
               f"#define LOWC_A8 {int(a8)}\n"
               f"#define LOWC_NT {cfg.block_m // 8}\n#define LOWC_WARPS {cfg.num_warps}\n"
               f"#define LOWC_DEPTH {cfg.block_k // CHUNK}\n#define LOWC_PER_CHANNEL {int(per_channel)}\n"
               f"#define LOWC_CODE_OFFSET {_code_offset(bits, half)}\n")
    return defines + cuda_build.kernel_source(SOURCE.name)


def _kernel(bits: int, half: bool, per_channel: bool, cfg: GemmConfig, a8: bool):
    variant = (bits, half, per_channel, cfg.block_m, cfg.block_n, cfg.num_warps, cfg.block_k, a8)
    return cuda_build.backend().kernel(KERNEL_NAME, variant,
                                       lambda: [kernel_source(bits, half, per_channel, cfg, a8)], "wa16_decode")


def auto_split(n: int, k_pad: int, rows: int, warps: int, depth: int) -> int:
    """K splits that give about two CTAs per SM, keeping at least one full round of chunks per warp."""
    ctas = -(-n // rows)
    chunks = k_pad // CHUNK
    want = max(1, -(-2 * cuda_build.sm_count() // ctas))
    return max(1, min(want, chunks // (warps * depth), 16))


def decode_configs(m: int, w: LowbitWeight) -> list[GemmConfig]:
    """Candidates for `m` tokens: rows per CTA x warps x chunks in flight, each without and with split-K."""
    tokens = 8 if m <= 8 else 16
    out = []
    for tiles, warps, depth in ((1, 4, 2), (1, 4, 4), (1, 8, 2), (2, 4, 2), (2, 8, 1), (1, 8, 4)):
        if tokens == 16 and tiles * depth > 2:
            continue  # 16 tokens double the activation registers
        for split in sorted({1, auto_split(w.n, w.k_pad, 16 * tiles, warps, depth)}):
            out.append(GemmConfig(tokens, 16 * tiles, CHUNK * depth, split, warps, 1, cuda=True))
    return out


def candidates(m: int, w: LowbitWeight) -> list[GemmConfig]:
    """The configs this kernel adds to a `wa16` / `wa8` autotuner's list at `m` tokens: `decode_configs` where the
    kernel takes the weight and can run here, else none."""
    if interpreting() or not supports(w, m) or not cuda_build.available():
        return []
    return decode_configs(m, w)


def _check(x2: torch.Tensor, w: LowbitWeight, cfg: GemmConfig) -> None:
    if not supports(w, x2.shape[0]):
        raise ValueError(f"wa16_decode takes INT4/INT6 weights with group sizes that are multiples of {CHUNK} (or "
                         f"per-channel) and 1..16 tokens; got INT{w.bits}, group {w.group}, {x2.shape[0]} tokens")
    if cfg.block_m not in (8, 16) or cfg.block_m < x2.shape[0] or cfg.block_n % 16 or cfg.block_k % CHUNK:
        raise ValueError(f"wa16_decode configs take 8 or 16 tokens (>= {x2.shape[0]}), rows in multiples of 16 and "
                         f"K in multiples of {CHUNK}; got {cfg}")
    for name, t, align in (("codes", w.codes, 16), ("high", w.high, 8)):
        if t is not None and (t.data_ptr() % align or t.stride(0) % align or t.stride(1) != 1):
            raise ValueError(f"kernel layout tensor {name} must have {align}-byte aligned rows")


def launch_decode(x2: torch.Tensor, w: LowbitWeight, bias: torch.Tensor | None, cfg: GemmConfig,
                  x_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y [m, n] = x2 [m, k] @ W^T (+ bias) with the CUDA decode kernel: x2 bf16/fp16 (output in its dtype), or int8
    activation codes with their fp32 per-token `x_scale` [m] (output in `out_dtype`)."""
    _check(x2, w, cfg)
    a8 = x_scale is not None
    if a8 != (x2.dtype == torch.int8) or (a8 and out_dtype not in (torch.float16, torch.bfloat16)):
        raise ValueError("wa16_decode takes 16-bit x, or int8 codes with x_scale and a 16-bit out_dtype")
    out_dtype = out_dtype if a8 else x2.dtype
    m = x2.shape[0]
    if x2.shape[1] != w.k_pad or x2.stride(0) * x2.element_size() % 16 or x2.data_ptr() % 16 or x2.stride(1) != 1:
        # the kernel reads whole 32-column runs of x: give it zero columns up to the padded K
        x2 = torch.nn.functional.pad(x2, (0, w.k_pad - w.k))
    nchunks = w.k_pad // CHUNK
    chunks_per_split = -(-nchunks // max(1, cfg.split_k))
    split = -(-nchunks // chunks_per_split)
    grid_x = -(-w.n // cfg.block_n)
    y = torch.empty(m, w.n, device=x2.device, dtype=out_dtype)
    ws = counters = None
    if split > 1:
        ws = torch.empty(split, m, w.n, device=x2.device, dtype=torch.float32)
        counters = cuda_build.tile_counters(grid_x, x2.device)
    if bias is not None:
        bias = bias.to(out_dtype).contiguous()
    high = w.high if w.high is not None else w.codes
    kernel = _kernel(w.bits, out_dtype == torch.float16, w.per_channel, cfg, a8)
    group_chunks = 1 if w.per_channel else w.group // CHUNK
    args = (x2.data_ptr(), x_scale.data_ptr() if a8 else 0, w.codes.data_ptr(), high.data_ptr(), w.scales.data_ptr(),
            bias.data_ptr() if bias is not None else 0, y.data_ptr(), 0 if ws is None else ws.data_ptr(),
            0 if counters is None else counters.data_ptr(),
            m, w.n, nchunks, x2.stride(0), w.codes.stride(0), high.stride(0), w.scales.stride(0), y.stride(0),
            group_chunks, chunks_per_split, int(bias is not None))
    cuda_build.backend().launch(kernel, (grid_x, split, 1), (32 * cfg.num_warps, 1, 1), args)
    return y
