"""Ahead-of-time implementations of lowc's TensorRT GEMM plugins: Triton kernels compiled to PTX for the engine.

A `tensorrt.plugin` AOT implementation (`trtp.aot_impl`) returns, per plugin instance, one kernel's name and PTX, its
launch parameters (grid as expressions of the input shapes, block, shared memory) and the extra scalar arguments;
TensorRT embeds the PTX in the engine and launches it with (input pointers..., scalars..., output pointers...), with
no Python at run time. lowc's kernels for this are written in that order: the GEMMs of
`lowc/kernels/canonical_gemm.py` and the one-kernel SageAttention of `lowc/kernels/sage_single.py` (which smooths
and quantizes Q and K inside the attention kernel, since an AOT plugin launches exactly one kernel).

This module holds everything but the TensorRT objects, so it runs without TensorRT:
- `aot_launch(op, shapes, attrs)`: the kernel, its constexprs and its grid and scalars as expressions over the input
  dimensions (ints here, `tensorrt.plugin` shape expressions in the plugin), with `cdiv` supplied by the caller;
- `compile_aot(launch, dtypes, arch)`: the PTX (cached), with Triton's two hidden trailing parameters (global and
  profile scratch pointers, unused by these kernels) removed from the entry so the parameter list is exactly what
  TensorRT passes; it refuses a kernel that would need either scratch buffer;
- `run_aot(...)` (tests, GPU): launch that PTX through cuda.core with TensorRT's argument list.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable, Sequence

AOT_OPS = ("Int6Gemm", "BTCGemm", "VNMGemm", "VNMQGemm", "SageAttention")
NUM_WARPS = 4
# Tactics TensorRT times at engine build (`trtp.autotune`) and passes to the AOT implementation: tile sizes for
# few tokens (many row tiles, so every SM streams weights) and for many. BLOCK_N is capped at V for V:N:M.
TACTICS: dict[int, dict[str, int]] = {
    1: dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=128, BLOCK_B=32),  # decode
    2: dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_B=16),  # prefill
}
# SageAttention's tiles per tactic: query rows per program (few for decode steps) and keys per block
ATTENTION_TACTICS: dict[int, dict[str, int]] = {1: dict(BLOCK_M=16, BLOCK_N=64), 2: dict(BLOCK_M=64, BLOCK_N=64)}
DEFAULT_TACTIC = 2
# Triton signature strings per dtype name (torch and TensorRT names map onto these)
POINTER_TYPES = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32", "uint8": "*u8", "int8": "*i8"}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class AotLaunch:
    """One plugin instance's kernel: which Triton kernel with which constexprs, and how to launch it."""

    kernel_name: str  # attribute of lowc.kernels.<module>
    constexprs: tuple[tuple[str, int | float | bool], ...]
    grid: tuple  # (x, y, z) expressions
    scalars: tuple  # int32 expressions, in kernel order after the input pointers
    num_warps: int = NUM_WARPS
    module: str = "canonical_gemm"

    @property
    def kernel(self):
        return _kernel(self.module, self.kernel_name)


def _kernel(module: str, name: str):
    import importlib

    return getattr(importlib.import_module(f"lowc.kernels.{module}"), name)


def _product(dims: Sequence):
    out = dims[0]
    for d in dims[1:]:
        out = out * d
    return out


def aot_launch(op: str, shapes: Sequence[Sequence], attrs: dict, cdiv: Callable = _cdiv,
               tactic: int = DEFAULT_TACTIC) -> AotLaunch:
    """The AOT kernel of plugin `op` for inputs of `shapes` (in the node's input order), attributes `attrs` and
    tile `tactic` (a key of TACTICS).

    Dimensions may be ints or symbolic shape expressions supporting `*`; `cdiv(a, b)` must accept them."""
    if op not in AOT_OPS:
        raise ValueError(f"no AOT kernel for {op!r} (AOT plugins: {', '.join(AOT_OPS)})")
    if tactic not in TACTICS:
        raise ValueError(f"unknown AOT tactic {tactic} (tactics: {', '.join(map(str, TACTICS))})")
    if op == "SageAttention":
        return _attention_launch(shapes, attrs, cdiv, ATTENTION_TACTICS[tactic])
    tiles = TACTICS[tactic]
    x = shapes[0]
    m, n, k = _product(list(x[:-1])), shapes[1][0], x[-1]
    if op in ("Int6Gemm", "BTCGemm"):
        bits = 6 if op == "Int6Gemm" else int(attrs["bits"])
        const = dict(BITS=bits, GROUP=int(attrs["group"]), BLOCK_M=tiles["BLOCK_M"], BLOCK_N=tiles["BLOCK_N"],
                     BLOCK_K=tiles["BLOCK_K"])
        return AotLaunch("bitfield_gemm_kernel", tuple(const.items()),
                         (cdiv(m, tiles["BLOCK_M"]), cdiv(n, tiles["BLOCK_N"]), 1),
                         (m, n, k, shapes[1][1], shapes[2][1]))
    v, cols = int(attrs["v"]), int(attrs["m"])
    block_n = math.gcd(v, tiles["BLOCK_N"])  # divides V: a tile's rows share one V-row block
    if block_n < 16:
        raise ValueError(f"{op}: V={v} is not a multiple of 16, which the AOT kernel's tensor-core tiles need")
    const = dict(V=v, BLOCK_COLS=cols, BLOCK_M=tiles["BLOCK_M"], BLOCK_N=block_n, BLOCK_B=tiles["BLOCK_B"])
    grid = (cdiv(m, tiles["BLOCK_M"]), cdiv(n, block_n), 1)
    if op == "VNMGemm":  # X, values, columns, positions
        return AotLaunch("vnm_gemm_kernel", tuple(const.items()), grid,
                         (m, n, k, shapes[2][1], shapes[1][1], shapes[3][1]))
    const.update(BITS=int(attrs["bits"]), GROUP=int(attrs["group"]))  # X, qweight, scales, columns, positions
    return AotLaunch("vnm_qgemm_kernel", tuple(const.items()), grid,
                     (m, n, k, shapes[3][1], shapes[1][1], shapes[4][1], shapes[2][1]))


def static_dim(dim, what: str) -> int:
    """`dim` as an int: an int, or a TensorRT shape expression that is a build-time constant."""
    if isinstance(dim, int):
        return dim
    if getattr(dim, "is_constant", False):
        return int(dim.constant_value())
    raise ValueError(f"{what} must be known when the engine is built, got a dimension that varies ({dim!r})")


def _is_one(dim) -> bool:
    return (isinstance(dim, int) or getattr(dim, "is_constant", False)) and static_dim(dim, "") == 1


def _attention_launch(shapes: Sequence[Sequence], attrs: dict, cdiv: Callable, tiles: dict) -> AotLaunch:
    """SageAttention (Q [B, Hq, Sq, D], K, V [B, Hkv, Sk, D], bias [B or 1, 1, 1, Sk or 1]) as one launch of
    `sage_single_kernel`: a program per BLOCK_M query rows of one (batch, head)."""
    from ..kernels.sage_single import bias_strides, block_d

    q, k, v, bias = shapes
    if not len(q) == len(k) == len(v) == len(bias) == 4:
        raise ValueError("SageAttention's AOT kernel takes 4-D Q, K, V and bias")
    head_dim = static_dim(q[3], "SageAttention's head dim")
    if head_dim > 256:
        raise ValueError(f"SageAttention's AOT kernel takes head dims up to 256, got {head_dim}")
    stride_b, stride_k = bias_strides(bias, _is_one)
    const = dict(SCALE=float(attrs["scale"]), CAUSAL=bool(attrs["causal"]), HEAD_DIM=head_dim,
                 BLOCK_D=block_d(head_dim), **tiles)
    return AotLaunch("sage_single_kernel", tuple(const.items()), (cdiv(q[2], tiles["BLOCK_M"]), q[0] * q[1], 1),
                     (q[2], k[2], q[1], k[1], stride_b, stride_k), module="sage_single")


@dataclass(frozen=True)
class AotKernel:
    """A compiled AOT kernel: PTX entry `name`, `block` threads, `shared` bytes of dynamic shared memory."""

    name: str
    ptx: str
    block: int
    shared: int
    params: tuple[str, ...] = field(default=())  # the entry's parameter types as PTX declares them


_ENTRY = re.compile(r"\.entry\s+(\w+)\s*\((.*?)\)", re.S)


def _strip_hidden_params(ptx: str, name: str, keep: int) -> tuple[str, tuple[str, ...]]:
    """Drop the entry's parameters after the first `keep` (Triton's scratch pointers) if the body never reads
    them; returns (ptx, the kept parameters' PTX types)."""
    match = _ENTRY.search(ptx)
    if match is None or match.group(1) != name:
        raise RuntimeError(f"no .entry {name} in the PTX Triton produced")
    params = [p.strip() for p in match.group(2).split(",") if p.strip()]
    if len(params) < keep:
        raise RuntimeError(f"{name}: PTX has {len(params)} parameters, the kernel declares {keep}")
    body = ptx[match.end():]
    for extra in params[keep:]:
        param_name = extra.split()[-1]
        if re.search(rf"\b{re.escape(param_name)}\b", body):
            raise RuntimeError(f"{name}: Triton's hidden parameter {param_name} is used by the kernel, so it cannot "
                               "be launched with TensorRT's AOT argument list")
    entry = f".entry {name}(\n\t" + ",\n\t".join(params[:keep]) + "\n)"
    types = tuple(" ".join(t for t in p.split()[1:-1] if t in (".u32", ".u64", ".s32", ".b32", ".b64"))
                  for p in params[:keep])
    return ptx[:match.start()] + entry + ptx[match.end():], types


@functools.lru_cache(maxsize=None)
def _compile(module: str, kernel_name: str, constexprs: tuple, signature: tuple, arch: int,
             num_warps: int) -> AotKernel:
    from ..kernels.wa16_gemm import interpreting

    if interpreting():  # Triton's interpreter wraps the kernels; compile them in a process without it
        request = json.dumps([module, kernel_name, constexprs, signature, arch, num_warps])
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        done = subprocess.run([sys.executable, "-m", __name__, request], env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"compiling {kernel_name} to PTX failed: {done.stderr.strip()[-2000:]}")
        return AotKernel(**{k: tuple(v) if k == "params" else v
                            for k, v in json.loads(done.stdout.splitlines()[-1]).items()})
    return _compile_here(module, kernel_name, constexprs, signature, arch, num_warps)


def _compile_here(module: str, kernel_name: str, constexprs: tuple, signature: tuple, arch: int,
                  num_warps: int) -> AotKernel:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernel(module, kernel_name)
    const = dict(constexprs)
    runtime = [p for p in fn.arg_names if p not in const]
    if len(runtime) != len(signature):
        raise ValueError(f"{kernel_name} takes {len(runtime)} runtime arguments, got {len(signature)} types")
    sig = {**dict(zip(runtime, signature)), **{p: "constexpr" for p in const}}
    src = ASTSource(fn=fn, signature=sig, constexprs=const)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    meta = compiled.metadata
    for what in ("global_scratch_size", "profile_scratch_size"):
        if getattr(meta, what, 0):
            raise RuntimeError(f"{kernel_name} needs Triton {what.replace('_', ' ')} {getattr(meta, what)}, "
                               "which a TensorRT AOT launch does not provide")
    ptx, params = _strip_hidden_params(compiled.asm["ptx"], meta.name, len(runtime))
    return AotKernel(meta.name, ptx, meta.num_warps * 32, meta.shared, params)


def compile_aot(launch: AotLaunch, dtypes: Sequence[str], arch: int = 90) -> AotKernel:
    """PTX of `launch`'s kernel for input dtypes `dtypes` (node order; the output takes the first input's dtype),
    compiled for sm_`arch` (TensorRT JIT-compiles PTX for newer GPUs)."""
    try:
        pointers = [POINTER_TYPES[str(d).replace("torch.", "")] for d in dtypes]
    except KeyError as e:
        raise ValueError(f"AOT kernels take {', '.join(POINTER_TYPES)} tensors, got {e.args[0]}") from None
    signature = (*pointers, *["i32"] * len(launch.scalars), pointers[0])
    return _compile(launch.module, launch.kernel_name, launch.constexprs, signature, arch, launch.num_warps)


def run_triton(launch: AotLaunch, inputs: Sequence, out) -> None:
    """Launch `launch`'s kernel through Triton itself (its CPU interpreter in tests) with the AOT argument order."""
    launch.kernel[tuple(int(g) for g in launch.grid)](*inputs, *(int(s) for s in launch.scalars), out,
                                                      **dict(launch.constexprs), num_warps=launch.num_warps)


def run_aot(kernel: AotKernel, launch: AotLaunch, inputs: Sequence, out) -> None:
    """Launch `kernel` on torch's current stream as TensorRT would: grid and scalars from `launch` (ints), the
    arguments (input pointers..., int32 scalars..., output pointer). Needs CUDA and cuda.core."""
    import numpy as np

    from ..kernels.cuda_build import cuda_core_backend

    args = (*(t.data_ptr() for t in inputs), *(np.int32(s) for s in launch.scalars), out.data_ptr())
    cuda_core_backend().launch_ptx(kernel.ptx, kernel.name, tuple(int(g) for g in launch.grid), kernel.block, args,
                                   kernel.shared)


if __name__ == "__main__":  # python -m lowc.export.tensorrt_aot '[module, kernel, constexprs, signature, arch, warps]'
    module_name, name, const, sig, target, warps = json.loads(sys.argv[1])
    compiled = _compile_here(module_name, name, tuple(tuple(c) for c in const), tuple(sig), target, warps)
    print(json.dumps(dataclasses.asdict(compiled)))


__all__ = ["AOT_OPS", "TACTICS", "ATTENTION_TACTICS", "DEFAULT_TACTIC", "AotLaunch", "AotKernel", "aot_launch",
           "compile_aot", "run_aot", "run_triton", "static_dim"]
