"""Compile lowc's CUDA C++ kernels at run time and launch them on torch's current stream.

Kernels Triton cannot express (sparse `mma.sp`, binary `mma ... and.popc`) are CUDA C++ files under
lowc/kernels/cuda/, specialised by #defines the caller prepends and compiled with NVRTC for the current GPU,
through `cuda.core` (or cupy's NVRTC when cuda.core is missing; LOWC_CUDA_BACKEND=cuda.core|cupy forces one).
Compiled cubins are cached on disk under ~/.cache/lowc/<name> (LOWC_CACHE_DIR overrides ~/.cache/lowc) and in
memory per device.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import os
from pathlib import Path
from typing import Callable

import torch

CUDA_DIR = Path(__file__).resolve().parent / "cuda"


@functools.cache
def kernel_source(file: str) -> str:
    """A kernel file of lowc/kernels/cuda/ with the shared common.cuh in front (callers prepend their #defines)."""
    return (CUDA_DIR / "common.cuh").read_text() + "\n" + (CUDA_DIR / file).read_text()


def check_operands(op: str, x: torch.Tensor, weight: torch.Tensor, k: int, n: int, bias: torch.Tensor | None,
                   hardware: str, cpu_hint: str) -> None:
    """The errors every lowc CUDA GEMM gives alike: no GPU (with what to use on CPU), tensors off the GPU, a GPU
    older than compute capability 8.0, activations that are not bf16/fp16 [..., k], a bias that is not [n]."""
    if not torch.cuda.is_available():
        raise RuntimeError(f"{op} needs a CUDA GPU ({hardware}, sm_80 or newer); on CPU use {cpu_hint}")
    if not x.is_cuda or not weight.is_cuda:
        raise RuntimeError(f"{op} runs on CUDA tensors; got x on {x.device}, weight on {weight.device}")
    if torch.cuda.get_device_capability(x.device)[0] < 8:
        raise RuntimeError(f"{op} needs {hardware} (compute capability 8.0 or newer)")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"{op} takes bfloat16 or float16 activations, got {x.dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {k}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")


def cache_dir(name: str) -> Path:
    root = os.environ.get("LOWC_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "lowc") / name


def gpu_arch() -> str:
    """NVRTC target of the current GPU: sm_90a on Hopper (wgmma / mma.sp need the `a` target), else sm_XY."""
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}{'a' if major == 9 else ''}"


class Backend(abc.ABC):
    """Compiles kernel sources with NVRTC and launches them on torch's current stream."""

    name = "none"

    def __init__(self):
        self._kernels: dict[tuple, object] = {}

    def kernel(self, name: str, variant: tuple, sources: Callable[[], list[str]], cache: str):
        """The kernel `name` of the variant `variant` (the caller's hashable description of its #defines): the
        first of `sources()` that compiles (callers list fallbacks after the preferred spelling), built once per
        device and variant, so a launch costs a dict lookup; raises RuntimeError with every compiler error."""
        key = (torch.cuda.current_device(), name, variant)
        ker = self._kernels.get(key)
        if ker is None:
            errors = []
            for i, src in enumerate(sources()):
                try:
                    ker = self._compile(name, src, cache)
                    break
                except Exception as exc:  # noqa: BLE001 - try the next spelling, then report them all
                    errors.append(f"[source {i}] {type(exc).__name__}: {exc}")
            else:
                raise RuntimeError(f"compiling {name} with NVRTC ({self.name}, {gpu_arch()}) failed: "
                                   + " | ".join(errors))
            self._kernels[key] = ker
        return ker

    @abc.abstractmethod
    def _compile(self, name: str, src: str, cache: str):
        """Compile one source (or load its cached cubin) and return the kernel `name`."""

    @abc.abstractmethod
    def launch(self, kernel, grid: tuple, block: tuple, args: tuple, shmem: int = 0) -> None:
        """Launch `kernel` on torch's current stream; every argument is passed as a 64-bit integer."""


class _CudaCoreBackend(Backend):
    name = "cuda.core"

    def __init__(self):
        super().__init__()
        try:
            from cuda.core import Device, LaunchConfig, ObjectCode, Program, ProgramOptions, launch
        except ImportError:
            from cuda.core.experimental import Device, LaunchConfig, ObjectCode, Program, ProgramOptions, launch
        self._api = dict(Device=Device, LaunchConfig=LaunchConfig, ObjectCode=ObjectCode, Program=Program,
                         ProgramOptions=ProgramOptions, launch=launch)
        self._devices: dict[int, object] = {}
        self._streams: dict[tuple, object] = {}
        self._modules: list = []  # keep loaded modules alive
        self._ptx: dict[str, object] = {}  # PTX text -> loaded module (launch_ptx)

    def _device(self):
        idx = torch.cuda.current_device()
        dev = self._devices.get(idx)
        if dev is None:
            torch.cuda.init()
            dev = self._api["Device"](idx)
            dev.set_current()
            self._devices[idx] = dev
        return dev

    def _compile(self, name: str, src: str, cache: str):
        self._device()
        arch = gpu_arch()
        digest = hashlib.sha256(f"{arch}\n{src}".encode()).hexdigest()[:24]
        path = cache_dir(cache) / f"{name}-{arch}-{digest}.cubin"
        if path.exists():
            try:
                obj = self._api["ObjectCode"].from_cubin(path.read_bytes())
                ker = obj.get_kernel(name)
                self._modules.append(obj)
                return ker
            except Exception:  # noqa: BLE001 - a stale or foreign file: rebuild it
                path.unlink(missing_ok=True)
        opts = self._api["ProgramOptions"](arch=arch, std="c++17")
        obj = self._api["Program"](src, code_type="c++", options=opts).compile("cubin")
        ker = obj.get_kernel(name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(bytes(obj.code))
            tmp.replace(path)
        except Exception:  # noqa: BLE001 - the disk cache is an optimisation only
            pass
        self._modules.append(obj)
        return ker

    def stream(self):
        """torch's current stream as a cuda.core stream (one wrapper per torch stream)."""
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

    def launch(self, kernel, grid, block, args, shmem=0):
        cfg = self._api["LaunchConfig"](grid=grid, block=block, shmem_size=shmem)
        # every kernel parameter is 8 bytes wide: cuda.core passes Python ints as intptr_t
        self._api["launch"](self.stream(), cfg, kernel, *[int(a) for a in args])

    def launch_ptx(self, ptx: str, name: str, grid: tuple, block: int, args: tuple, shmem: int = 0) -> None:
        """Load PTX (once per text) and launch its kernel `name` on torch's current stream with `args` as given
        (numpy scalars keep their width, e.g. np.int32 for a .u32 parameter; ints are pointers)."""
        self._device()
        obj = self._ptx.get(ptx)
        if obj is None:
            obj = self._ptx[ptx] = self._api["ObjectCode"].from_ptx(ptx.encode())
        cfg = self._api["LaunchConfig"](grid=grid, block=block, shmem_size=shmem)
        self._api["launch"](self.stream(), cfg, obj.get_kernel(name), *args)


class _CupyBackend(Backend):
    name = "cupy"

    def __init__(self):
        super().__init__()
        import cupy

        self._cupy = cupy

    def _compile(self, name: str, src: str, cache: str):
        os.environ.setdefault("CUPY_CACHE_DIR", str(cache_dir("cupy")))
        with self._cupy.cuda.Device(torch.cuda.current_device()):
            mod = self._cupy.RawModule(code=src, options=("-std=c++17",), backend="nvrtc")
            ker = mod.get_function(name)
            if hasattr(ker, "compile"):
                ker.compile()
        return ker

    def launch(self, kernel, grid, block, args, shmem=0):
        import numpy as np

        stream = self._cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
        with stream:
            kernel(grid, block, tuple(np.int64(a) for a in args), shared_mem=shmem)


_COUNTERS: dict[tuple, torch.Tensor] = {}


def tile_counters(n: int, device: torch.device) -> torch.Tensor:
    """Zeroed int32 split-K tile counters for the current stream (lowc's CUDA GEMMs let the last CTA of a tile to
    finish sum the others' partials, counted here). Kernels leave them zero, so one buffer per (device, stream) is
    reused by every launch on that stream (launches on one stream never overlap). A buffer allocated during
    CUDA-graph capture belongs to the graph's pool and is not kept."""
    stream = torch.cuda.current_stream(device)
    key = (stream.device_index, stream.cuda_stream)
    buf = _COUNTERS.get(key)
    if buf is not None and buf.numel() >= n:
        return buf
    buf = torch.zeros(max(n, 4096), device=device, dtype=torch.int32)
    if not torch.cuda.is_current_stream_capturing():
        _COUNTERS[key] = buf
    return buf


_BACKEND: list[Backend] = []


@functools.lru_cache(maxsize=None)
def cuda_core_backend() -> "_CudaCoreBackend":
    """The cuda.core backend whatever `backend()` chose (launch_ptx needs cuda.core)."""
    if _BACKEND and isinstance(_BACKEND[0], _CudaCoreBackend):
        return _BACKEND[0]
    return _CudaCoreBackend()


def sm_count() -> int:
    """Streaming multiprocessors of the current GPU (split-K heuristics aim at a few CTAs per SM)."""
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


@functools.cache
def available() -> bool:
    """True where lowc's CUDA C++ kernels can run: a GPU of compute capability >= 8.0 and an NVRTC backend."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
        return False
    try:
        backend()
    except RuntimeError:
        return False
    return True


def backend() -> Backend:
    """The compile/launch backend: cuda.core, else cupy (LOWC_CUDA_BACKEND=cuda.core|cupy forces one)."""
    if _BACKEND:
        return _BACKEND[0]
    want = os.environ.get("LOWC_CUDA_BACKEND", os.environ.get("LOWC_VNM_BACKEND", ""))
    errors = []
    for cls in (_CudaCoreBackend, _CupyBackend):
        if want and cls.name != want:
            continue
        try:
            _BACKEND.append(cls())
            return _BACKEND[0]
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{cls.name}: {type(exc).__name__}: {exc}")
    raise RuntimeError("lowc's CUDA kernels need cuda.core (pip install cuda-core) or cupy to compile with NVRTC; "
                       + "; ".join(errors))
