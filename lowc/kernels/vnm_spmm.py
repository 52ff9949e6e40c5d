"""V:N:M sparse GEMM on sparse tensor cores: y = x @ W^T (+ bias) for a V:N:M weight in `vnm_layout`'s layout.

The kernel (lowc/kernels/cuda/vnm_spmm.cu) is CUDA C++ issuing `mma.sp` (Triton cannot), compiled at run time
with NVRTC (`cuda_build`: cuda.core or cupy) and cached on disk under ~/.cache/lowc/vnm_spmm. One compiled variant
per (dtype, tile config).

Tiles (`VNMConfig`): a CTA is WR x WT warps; each warp owns 16 weight rows (the mma.sp M dimension) and 8*NT
tokens; all rows of a CTA lie in one V-row block, so the CTA gathers that block's kept columns of x once per K
chunk (32*KCP gathered columns) into shared memory and every warp reuses them. Decode (<= 16 tokens) is
memory-bound: narrow token tiles, long K chunks (more weight loads in flight) and split-K so that every SM
streams weights; the last CTA of a tile to finish sums the fp32 partials of the others (no zeroing pass, no extra
launch). Prefill uses 2 x 64 tokens per CTA and first transposes x to x^T, so that the gather copies 16-byte runs
of tokens of every kept column and ldmatrix.trans builds the B fragments.

`vnm_spmm_int8` is the INT8 variant (mma.sp m16n8k32 .s8, int32 accumulation): int8 V:N:M weight codes with
per-row scales (`vnm_layout.to_vnm_int8_layout`), activations quantized per token on the fly (`wa8_gemm.quantize_rows`,
FORMAT.md's A8 rule), both scales applied in the epilogue. Its metadata layout has two candidate readings of the
PTX ISA figure (`vnm_layout.META_MODES`); `benchmarks/kernels_vnm.py` checks which one the hardware uses.

On CPU (or without a GPU) the runtime keeps using `kernels.reference`; calling `vnm_spmm` there raises a clear
RuntimeError.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from . import cuda_build
from .cuda_build import backend, check_operands, sm_count, tile_counters
from .vnm_layout import VNMInt8Weight, VNMKernelWeight

KERNEL_NAME = "lowc_vnm_spmm"
KERNEL_NAME_S8 = "lowc_vnm_spmm_s8"
SOURCE = Path(__file__).resolve().parent / "cuda" / "vnm_spmm.cu"


class VNMConfig(NamedTuple):
    """Launch shape of one V:N:M SpMM: warps over rows (wr) and tokens (wt), 8-token tiles per warp (nt),
    pairs of k16 steps per K chunk (kcp, chunk = 32*kcp gathered columns), the split-K factor (0 = auto) and
    whether x is first transposed to x^T so the gather copies 16-byte runs of tokens (xt, prefill; nt even)."""

    wr: int = 4
    wt: int = 1
    nt: int = 2
    kcp: int = 4
    split_k: int = 0
    xt: bool = False

    @property
    def variant(self) -> tuple:
        """The fields that select a compiled kernel (split_k is a launch parameter)."""
        return (self.wr, self.wt, self.nt, self.kcp, bool(self.xt))


def kernel_source() -> str:
    return cuda_build.kernel_source(SOURCE.name)


def _min_blocks(cfg: VNMConfig) -> int:
    """__launch_bounds__ min blocks: CTAs of >= 128 threads are held to 128 registers (no spills for the
    configs pick_config makes, checked with ptxas -v), smaller CTAs (V = 16, 32, 48) may use up to 255."""
    threads = 32 * cfg.wr * cfg.wt
    if threads < 128:
        return 1
    if threads == 128 and cfg.xt and cfg.nt >= 8:  # x^T prefill with 2 row warps (V = 32): 8 gather vectors
        return 3
    return max(1, 512 // threads)


def _defines(half: bool, cfg: VNMConfig, ordered: bool, int8: bool = False, group_pairs: int = 0) -> str:
    return (f"#define LOWC_HALF {int(half)}\n#define LOWC_INT8 {int(int8)}\n#define LOWC_GP {group_pairs}\n"
            f"#define LOWC_WR {cfg.wr}\n"
            f"#define LOWC_WT {cfg.wt}\n"
            f"#define LOWC_NT {cfg.nt}\n#define LOWC_KCP {cfg.kcp}\n#define LOWC_XT {int(bool(cfg.xt))}\n"
            f"#define LOWC_MINB {_min_blocks(cfg)}\n#define LOWC_ORDERED {int(ordered)}\n")


def _kernel(half: bool, cfg: VNMConfig, int8: bool = False, group_pairs: int = 0):
    """The compiled kernel of one variant; ::ordered_metadata needs PTX ISA 8.5, plain mma.sp is the fallback
    (lowc's metadata is ascending, so both read it the same)."""
    return backend().kernel(KERNEL_NAME_S8 if int8 else KERNEL_NAME, (half, cfg.variant, group_pairs),
                            lambda: [_defines(half, cfg, ordered, int8, group_pairs) + kernel_source()
                                     for ordered in (True, False)],
                            "vnm_spmm")


def _row_warps(v: int, limit: int = 4) -> int:
    """Largest power of two <= limit such that 16 * it divides V (a CTA's rows stay inside one V-row block)."""
    wr = limit
    while wr > 1 and (v // 16) % wr:
        wr //= 2
    return wr


def pick_config(tokens: int, w: VNMKernelWeight) -> VNMConfig:
    """Default tile shape for `tokens` tokens (see the module docstring)."""
    if tokens <= 16:
        return VNMConfig(wr=_row_warps(w.v), wt=1, nt=1 if tokens <= 8 else 2, kcp=4)
    if tokens <= 64:
        return VNMConfig(wr=_row_warps(w.v), wt=1, nt=4 if tokens <= 32 else 8, kcp=2)
    return VNMConfig(wr=_row_warps(w.v), wt=2, nt=8, kcp=2, xt=True)


def _split_for(cfg: VNMConfig, grid_xy: int, nchunks: int) -> int:
    """Split K until the grid has about 4 CTAs per SM (one full wave at the 128-register cap, so every SM keeps
    many weight loads in flight), at least one K chunk per split, at most 16 splits."""
    want = max(1, -(-4 * sm_count() // max(1, grid_xy)))
    return max(1, min(want, nchunks, 16))


def _check(x: torch.Tensor, w: VNMKernelWeight, bias: torch.Tensor | None) -> None:
    check_operands("vnm_spmm", x, w.values, w.cols, w.rows, bias, "sparse tensor cores",
                   "lowc.kernels.reference.packed_linear / vnm_to_dense")
    if w.values.dtype != x.dtype:
        raise ValueError(f"weight values are {w.values.dtype} but x is {x.dtype}: convert the layout with "
                         f"to_vnm_kernel_layout(..., dtype={x.dtype})")
    for name, t in (("columns", w.columns), ("values", w.values), ("meta", w.meta)):
        if not t.is_contiguous() or t.data_ptr() % 16:
            raise ValueError(f"kernel layout tensor {name} must be contiguous and 16-byte aligned")


def vnm_spmm(x: torch.Tensor, w: VNMKernelWeight, bias: torch.Tensor | None = None,
             config: VNMConfig | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) on sparse tensor cores; x [..., K] bf16/fp16, W in kernel layout of x's dtype.
    Returns x's dtype, shape [..., R]. fp32 accumulation; the result is rounded once to x's dtype."""
    _check(x, w, bias)
    x2 = x.reshape(-1, w.cols)
    if x2.stride(-1) != 1 or x2.data_ptr() % 4:
        x2 = x2.contiguous()
    tokens = x2.shape[0]
    out_shape = (*x.shape[:-1], w.rows)
    if tokens == 0:
        return torch.empty(out_shape, device=x.device, dtype=x.dtype)
    cfg = config or pick_config(tokens, w)
    if (w.v // 16) % cfg.wr:
        raise ValueError(f"config wr={cfg.wr}: 16*wr must divide V={w.v}")
    kp = w.kb_pad // 8
    if kp % cfg.kcp:
        raise ValueError(f"config kcp={cfg.kcp} must divide the {kp} k16-step pairs of the layout")
    if cfg.xt and cfg.nt % 2:
        raise ValueError(f"config xt=True needs an even nt, got nt={cfg.nt}")
    nchunks = kp // cfg.kcp
    block_tokens = 8 * cfg.nt * cfg.wt
    grid_x = w.rows_pad // (16 * cfg.wr)
    grid_y = -(-tokens // block_tokens)
    split = cfg.split_k or _split_for(cfg, grid_x * grid_y, nchunks)
    per_split = -(-nchunks // split)
    split = -(-nchunks // per_split)
    if bias is not None:
        bias = bias.to(x.dtype).contiguous()
    kernel = _kernel(x.dtype == torch.float16, cfg)
    y = torch.empty(tokens, w.rows, device=x.device, dtype=x.dtype)
    ws = counters = None
    if split > 1:
        ws = torch.empty(split, tokens, w.rows, device=x.device, dtype=torch.float32)
        counters = tile_counters(grid_x * grid_y, x.device)
    if cfg.xt:  # x^T [K, tokens rounded up to 8], zero past the last token: the gather copies 16-byte rows
        tp = -(-tokens // 8) * 8
        xin = torch.nn.functional.pad(x2, (0, 0, 0, tp - tokens)).t().contiguous() if tp != tokens \
            else x2.t().contiguous()
        ldx = tp
    else:
        xin, ldx = x2, x2.stride(0)
    args = (xin.data_ptr(), w.values.data_ptr(), w.meta.data_ptr(), w.columns.data_ptr(),
            bias.data_ptr() if bias is not None else 0, y.data_ptr(), 0 if ws is None else ws.data_ptr(),
            0 if counters is None else counters.data_ptr(),
            tokens, w.cols, w.rows, w.v, kp, ldx, w.rows, per_split, int(bias is not None))
    backend().launch(kernel, (grid_x, grid_y, split), (32 * cfg.wr * cfg.wt, 1, 1), args)
    return y.reshape(out_shape)


def vnm_linear_reference(x: torch.Tensor, w: VNMKernelWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same product through the canonical form and `kernels.reference` (fp32, any device), x's dtype."""
    from .reference import vnm_to_dense
    from .vnm_layout import from_vnm_kernel_layout

    st = from_vnm_kernel_layout(w)
    dense = vnm_to_dense(st["values"].float(), st["columns"], st["positions"], w.v, w.m, (w.rows, w.cols))
    y = torch.nn.functional.linear(x.float(), dense.to(x.device), None if bias is None else bias.float())
    return y.to(x.dtype)


def pick_config_int8(tokens: int, w: VNMInt8Weight) -> VNMConfig:
    """Default tiles of the INT8 kernel (token-major gather only; a K chunk is 64*kcp gathered columns)."""
    if tokens <= 16:
        return VNMConfig(wr=_row_warps(w.v), wt=1, nt=1 if tokens <= 8 else 2, kcp=2)
    if tokens <= 64:
        return VNMConfig(wr=_row_warps(w.v), wt=1, nt=4 if tokens <= 32 else 8, kcp=1)
    return VNMConfig(wr=_row_warps(w.v), wt=2, nt=8, kcp=1)


def vnm_spmm_int8(x: torch.Tensor, w: VNMInt8Weight, bias: torch.Tensor | None = None,
                  config: VNMConfig | None = None, act_bits: int = 8) -> torch.Tensor:
    """y = s_x * (q_x . Wq^T) * s_w (+ bias) on sparse INT8 tensor cores (mma.sp m16n8k32 s8, int32 accumulation):
    x [..., K] bf16/fp16 is quantized per token (FORMAT.md's A8/A6 rule, `wa8_gemm.quantize_rows`), the weight is
    an INT8 V:N:M layout with per-row or group-wise scales. Returns x's dtype, [..., R]."""
    check_operands("vnm_spmm_int8", x, w.values, w.cols, w.rows, bias, "sparse tensor cores",
                   "lowc.kernels.reference.packed_linear")
    from .wa8_gemm import quantize_rows

    x2 = x.reshape(-1, w.cols)
    tokens = x2.shape[0]
    out_shape = (*x.shape[:-1], w.rows)
    if tokens == 0:
        return torch.empty(out_shape, device=x.device, dtype=x.dtype)
    xq, xs = quantize_rows(x2, act_bits)
    cfg = config or pick_config_int8(tokens, w)
    if (w.v // 16) % cfg.wr:
        raise ValueError(f"config wr={cfg.wr}: 16*wr must divide V={w.v}")
    kp = w.kb_pad // 16
    if kp % cfg.kcp:
        raise ValueError(f"config kcp={cfg.kcp} must divide the {kp} k32-step pairs of the layout")
    nchunks = kp // cfg.kcp
    grid_x = w.rows_pad // (16 * cfg.wr)
    grid_y = -(-tokens // (8 * cfg.nt * cfg.wt))
    split = cfg.split_k or _split_for(cfg, grid_x * grid_y, nchunks)
    per_split = -(-nchunks // split)
    split = -(-nchunks // per_split)
    if bias is not None:
        bias = bias.to(x.dtype).contiguous()
    kernel = _kernel(x.dtype == torch.float16, cfg._replace(xt=False), int8=True, group_pairs=w.group_pairs)
    y = torch.empty(tokens, w.rows, device=x.device, dtype=x.dtype)
    ws = counters = None
    if split > 1:
        ws = torch.empty(split, tokens, w.rows, device=x.device,
                         dtype=torch.float32 if w.group_pairs else torch.int32)
        counters = tile_counters(grid_x * grid_y, x.device)
    args = (xq.data_ptr(), w.values.data_ptr(), w.meta.data_ptr(), w.columns.data_ptr(), xs.data_ptr(),
            w.scales.data_ptr(), bias.data_ptr() if bias is not None else 0, y.data_ptr(),
            0 if ws is None else ws.data_ptr(), 0 if counters is None else counters.data_ptr(),
            tokens, w.cols, w.rows, w.v, kp, xq.stride(0), w.rows, per_split, int(bias is not None), w.rows_pad)
    backend().launch(kernel, (grid_x, grid_y, split), (32 * cfg.wr * cfg.wt, 1, 1), args)
    return y.reshape(out_shape)
