"""V:N:M sparse GEMM on sparse tensor cores: y = x @ W^T (+ bias) for a V:N:M weight in `vnm_layout`'s layout.

The kernel (lowc/kernels/cuda/vnm_spmm.cu) is CUDA C++ issuing `mma.sp` (Triton cannot), compiled at run time
with NVRTC through `cuda.core` (or cupy's NVRTC when cuda.core is missing) and cached on disk under
~/.cache/lowc/vnm_spmm (LOWC_CACHE_DIR overrides ~/.cache/lowc). One compiled variant per (dtype, tile config).

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

import abc

import hashlib
import os
from pathlib import Path
from typing import NamedTuple

import torch

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


def cache_dir() -> Path:
    root = os.environ.get("LOWC_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "lowc") / "vnm_spmm"


def kernel_source() -> str:
    return SOURCE.read_text()


def _min_blocks(cfg: VNMConfig) -> int:
    """__launch_bounds__ min blocks: CTAs of >= 128 threads are held to 128 registers (no spills for the
    configs pick_config makes, checked with ptxas -v), smaller CTAs (V = 16, 32, 48) may use up to 255."""
    threads = 32 * cfg.wr * cfg.wt
    if threads < 128:
        return 1
    if threads == 128 and cfg.xt and cfg.nt >= 8:  # x^T prefill with 2 row warps (V = 32): 8 gather vectors
        return 3
    return max(1, 512 // threads)


def _defines(half: bool, cfg: VNMConfig, ordered: bool, int8: bool = False) -> str:
    return (f"#define LOWC_HALF {int(half)}\n#define LOWC_INT8 {int(int8)}\n#define LOWC_WR {cfg.wr}\n"
            f"#define LOWC_WT {cfg.wt}\n"
            f"#define LOWC_NT {cfg.nt}\n#define LOWC_KCP {cfg.kcp}\n#define LOWC_XT {int(bool(cfg.xt))}\n"
            f"#define LOWC_MINB {_min_blocks(cfg)}\n#define LOWC_ORDERED {int(ordered)}\n")


class _Backend(abc.ABC):
    """Compiles variants with NVRTC and launches them on torch's current stream (cuda.core or cupy below)."""

    name = "none"

    @abc.abstractmethod
    def kernel(self, half: bool, cfg: VNMConfig, int8: bool = False):
        """The compiled (and cached) kernel of one variant."""

    @abc.abstractmethod
    def launch(self, kernel, grid, block, args):
        """Launch `kernel` on torch's current stream."""


class _CudaCoreBackend(_Backend):
    name = "cuda.core"

    def __init__(self):
        try:
            from cuda.core import Device, LaunchConfig, ObjectCode, Program, ProgramOptions, launch
        except ImportError:
            from cuda.core.experimental import Device, LaunchConfig, ObjectCode, Program, ProgramOptions, launch
        self._api = dict(Device=Device, LaunchConfig=LaunchConfig, ObjectCode=ObjectCode, Program=Program,
                         ProgramOptions=ProgramOptions, launch=launch)
        self._devices: dict[int, object] = {}
        self._kernels: dict[tuple, object] = {}
        self._streams: dict[tuple, object] = {}
        self._modules: list = []  # keep loaded modules alive

    def _device(self):
        idx = torch.cuda.current_device()
        dev = self._devices.get(idx)
        if dev is None:
            torch.cuda.init()
            dev = self._api["Device"](idx)
            dev.set_current()
            self._devices[idx] = dev
        return dev

    def kernel(self, half: bool, cfg: VNMConfig, int8: bool = False):
        self._device()
        major, minor = torch.cuda.get_device_capability()
        arch = f"sm_{major}{minor}{'a' if major == 9 else ''}"
        key = (torch.cuda.current_device(), half, cfg.variant, int8)
        name = KERNEL_NAME_S8 if int8 else KERNEL_NAME
        ker = self._kernels.get(key)
        if ker is not None:
            return ker
        errors = []
        for ordered in (True, False):  # ::ordered_metadata needs PTX ISA 8.5; fall back to plain mma.sp
            src = _defines(half, cfg, ordered, int8) + kernel_source()
            digest = hashlib.sha256(f"{arch}\n{src}".encode()).hexdigest()[:24]
            path = cache_dir() / f"{name}-{arch}-{digest}.cubin"
            if path.exists():
                try:
                    obj = self._api["ObjectCode"].from_cubin(path.read_bytes())
                    ker = obj.get_kernel(name)
                    self._modules.append(obj)
                    self._kernels[key] = ker
                    return ker
                except Exception:  # noqa: BLE001 - a stale or foreign file: rebuild it
                    path.unlink(missing_ok=True)
            try:
                opts = self._api["ProgramOptions"](arch=arch, std="c++17")
                prog = self._api["Program"](src, code_type="c++", options=opts)
                obj = prog.compile("cubin")
                ker = obj.get_kernel(name)
            except Exception as exc:  # noqa: BLE001 - try the other mma.sp spelling, then report
                errors.append(f"[ordered_metadata={ordered}] {type(exc).__name__}: {exc}")
                continue
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                tmp.write_bytes(bytes(obj.code))
                tmp.replace(path)
            except Exception:  # noqa: BLE001 - the disk cache is an optimisation only
                pass
            self._modules.append(obj)
            self._kernels[key] = ker
            return ker
        raise RuntimeError(f"vnm_spmm: compiling {SOURCE.name} with NVRTC (cuda.core, {arch}) failed: "
                           + " | ".join(errors))

    def _stream(self):
        s = torch.cuda.current_stream()
        key = (s.device_index, s.cuda_stream)
        st = self._streams.get(key)
        if st is None:
            handle = s.cuda_stream
            dev = self._device()
            if handle == 0 and hasattr(dev, "default_stream"):  # torch's default stream is the legacy stream 0
                st = dev.default_stream
            else:
                class _TorchStream:  # the __cuda_stream__ protocol: (version, CUstream address)
                    def __cuda_stream__(self):
                        return (0, handle)

                st = dev.create_stream(_TorchStream())
            self._streams[key] = st
        return st

    def launch(self, kernel, grid, block, args):
        cfg = self._api["LaunchConfig"](grid=grid, block=block, shmem_size=0)
        # every kernel parameter is 8 bytes wide: cuda.core passes Python ints as intptr_t
        self._api["launch"](self._stream(), cfg, kernel, *[int(a) for a in args])


class _CupyBackend(_Backend):
    name = "cupy"

    def __init__(self):
        import cupy  # noqa: F401

        self._cupy = cupy
        self._kernels: dict[tuple, object] = {}
        os.environ.setdefault("CUPY_CACHE_DIR", str(cache_dir() / "cupy"))

    def kernel(self, half: bool, cfg: VNMConfig, int8: bool = False):
        major, minor = torch.cuda.get_device_capability()
        key = (torch.cuda.current_device(), half, cfg.variant, int8)
        ker = self._kernels.get(key)
        if ker is not None:
            return ker
        last = None
        for ordered in (True, False):
            src = _defines(half, cfg, ordered, int8) + kernel_source()
            try:
                with self._cupy.cuda.Device(torch.cuda.current_device()):
                    mod = self._cupy.RawModule(code=src, options=("-std=c++17",), backend="nvrtc")
                    ker = mod.get_function(KERNEL_NAME_S8 if int8 else KERNEL_NAME)
                    if hasattr(ker, "compile"):
                        ker.compile()
                self._kernels[key] = ker
                return ker
            except Exception as exc:  # noqa: BLE001
                last = exc
        raise RuntimeError(f"vnm_spmm: compiling {SOURCE.name} with cupy/NVRTC (sm_{major}{minor}) failed: {last}")

    def launch(self, kernel, grid, block, args):
        import numpy as np

        stream = self._cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
        with stream:
            kernel(grid, block, tuple(np.int64(a) for a in args))


_BACKEND: list[_Backend] = []


def backend() -> _Backend:
    """The compile/launch backend: cuda.core, else cupy (LOWC_VNM_BACKEND=cuda.core|cupy forces one)."""
    if _BACKEND:
        return _BACKEND[0]
    want = os.environ.get("LOWC_VNM_BACKEND", "")
    errors = []
    for cls in (_CudaCoreBackend, _CupyBackend):
        if want and cls.name != want:
            continue
        try:
            _BACKEND.append(cls())
            return _BACKEND[0]
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{cls.name}: {type(exc).__name__}: {exc}")
    raise RuntimeError("vnm_spmm needs cuda.core (pip install cuda-core) or cupy to compile its CUDA kernel "
                       "with NVRTC; " + "; ".join(errors))


def _row_warps(v: int, limit: int = 4) -> int:
    """Largest power of two <= limit such that 16 * it divides V (a CTA's rows stay inside one V-row block)."""
    wr = limit
    while wr > 1 and (v // 16) % wr:
        wr //= 2
    return wr


def _sm_count() -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


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
    want = max(1, -(-4 * _sm_count() // max(1, grid_xy)))
    return max(1, min(want, nchunks, 16))


def _check(x: torch.Tensor, w: VNMKernelWeight, bias: torch.Tensor | None) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError("vnm_spmm needs a CUDA GPU (sparse tensor cores, sm_80 or newer); on CPU use "
                           "lowc.kernels.reference.packed_linear / vnm_to_dense")
    if not x.is_cuda or not w.values.is_cuda:
        raise RuntimeError(f"vnm_spmm runs on CUDA tensors; got x on {x.device}, weight on {w.values.device}")
    if torch.cuda.get_device_capability(x.device)[0] < 8:
        raise RuntimeError("vnm_spmm needs sparse tensor cores (compute capability 8.0 or newer)")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"vnm_spmm takes bfloat16 or float16 activations, got {x.dtype}")
    if w.values.dtype != x.dtype:
        raise ValueError(f"weight values are {w.values.dtype} but x is {x.dtype}: convert the layout with "
                         f"to_vnm_kernel_layout(..., dtype={x.dtype})")
    if x.shape[-1] != w.cols:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {w.cols}")
    if bias is not None and tuple(bias.shape) != (w.rows,):
        raise ValueError(f"bias must have shape ({w.rows},), got {tuple(bias.shape)}")
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
    be = backend()
    kernel = be.kernel(x.dtype == torch.float16, cfg)
    y = torch.empty(tokens, w.rows, device=x.device, dtype=x.dtype)
    ws = counters = None
    if split > 1:
        ws = torch.empty(split, tokens, w.rows, device=x.device, dtype=torch.float32)
        counters = _counters(grid_x * grid_y, x.device)
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
    be.launch(kernel, (grid_x, grid_y, split), (32 * cfg.wr * cfg.wt, 1, 1), args)
    return y.reshape(out_shape)


_COUNTERS: dict[tuple, torch.Tensor] = {}


def _counters(n: int, device: torch.device) -> torch.Tensor:
    """Zeroed int32 split-K tile counters for the current stream; the kernel leaves them zero, so one buffer per
    (device, stream) is reused by every launch on that stream (launches on one stream never overlap). A buffer
    allocated during CUDA-graph capture belongs to the graph's pool and is not kept."""
    stream = torch.cuda.current_stream(device)
    key = (stream.device_index, stream.cuda_stream)
    buf = _COUNTERS.get(key)
    if buf is not None and buf.numel() >= n:
        return buf
    buf = torch.zeros(max(n, 4096), device=device, dtype=torch.int32)
    if not torch.cuda.is_current_stream_capturing():
        _COUNTERS[key] = buf
    return buf


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
    an INT8 V:N:M layout with per-row scales. Returns x's dtype, [..., R]."""
    if not torch.cuda.is_available():
        raise RuntimeError("vnm_spmm_int8 needs a CUDA GPU (sparse tensor cores, sm_80 or newer); on CPU use "
                           "lowc.kernels.reference.packed_linear")
    if not x.is_cuda or not w.values.is_cuda:
        raise RuntimeError(f"vnm_spmm_int8 runs on CUDA tensors; got x on {x.device}, weight on {w.values.device}")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"vnm_spmm_int8 takes bfloat16 or float16 activations, got {x.dtype}")
    if x.shape[-1] != w.cols:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {w.cols}")
    if bias is not None and tuple(bias.shape) != (w.rows,):
        raise ValueError(f"bias must have shape ({w.rows},), got {tuple(bias.shape)}")
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
    be = backend()
    kernel = be.kernel(x.dtype == torch.float16, cfg._replace(xt=False), int8=True)
    y = torch.empty(tokens, w.rows, device=x.device, dtype=x.dtype)
    ws = counters = None
    if split > 1:
        ws = torch.empty(split, tokens, w.rows, device=x.device, dtype=torch.int32)
        counters = _counters(grid_x * grid_y, x.device)
    args = (xq.data_ptr(), w.values.data_ptr(), w.meta.data_ptr(), w.columns.data_ptr(), xs.data_ptr(),
            w.scales.data_ptr(), bias.data_ptr() if bias is not None else 0, y.data_ptr(),
            0 if ws is None else ws.data_ptr(), 0 if counters is None else counters.data_ptr(),
            tokens, w.cols, w.rows, w.v, kp, xq.stride(0), w.rows, per_split, int(bias is not None))
    be.launch(kernel, (grid_x, grid_y, split), (32 * cfg.wr * cfg.wt, 1, 1), args)
    return y.reshape(out_shape)
