"""Measured dispatch tables: the fastest low-bit GEMM config per shape, per GPU model, committed as JSON.

Without a table, `pick_config` times every candidate config of a (kernel, token bucket, N, K, bits, group,
dtype) key the first time a process meets it: seconds per shape while a model loads, and a winner that can flip
between runs when two configs are within noise. A table measured once per GPU model (`lowc bench kernels`, which
calls `tune`) is read instead: keys found in it are used as they are, keys it lacks are still timed on first use.
Tables live in `lowc/kernels/tables/<device>.json`; LOWC_DISPATCH_TABLE=0 ignores them.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from pathlib import Path
from typing import Callable, Iterable

import torch

from .wa16_gemm import _TUNED, GemmConfig, m_bucket

TABLE_DIR = Path(__file__).with_name("tables")

# (N out, K in) of the Llama-2 linears, with the fused q/k/v and gate/up projections the runtime builds
LLAMA_SHAPES = {
    "llama-2-7b": [(4096, 4096), (11008, 4096), (4096, 11008), (12288, 4096), (22016, 4096)],
    "llama-2-70b": [(8192, 8192), (1024, 8192), (28672, 8192), (8192, 28672), (10240, 8192), (57344, 8192)],
}

_LOADED: set[int] = set()


def device_slug(name: str) -> str:
    """File name of a GPU model's table: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def table_path(device_name: str) -> Path:
    return TABLE_DIR / f"{device_slug(device_name)}.json"


def _entry(key: tuple, cfg: GemmConfig) -> dict:
    kernel, bucket, n, k, bits, group, dtype = key
    return {"kernel": kernel, "m_bucket": bucket, "n": n, "k": k, "bits": bits, "group": group,
            "dtype": str(dtype).replace("torch.", ""), "config": cfg._asdict()}


def _key(e: dict) -> tuple:
    return (e["kernel"], e["m_bucket"], e["n"], e["k"], e["bits"], e["group"], getattr(torch, e["dtype"]))


def read_table(device_name: str) -> dict[tuple, GemmConfig]:
    """The committed table of a GPU model as {key: config} ({} when there is none); does not touch the cache."""
    path = table_path(device_name)
    if not path.is_file():
        return {}
    return {_key(e): GemmConfig(**e["config"]) for e in json.loads(path.read_text())["entries"]}


def config_label(kernel: str, cfg: GemmConfig) -> str:
    """A config in a few words, e.g. "gemv 8x512 split 4", "mma 16x64x128" (tensor cores: tokens x rows x K),
    "bf16 weight + cuBLAS" (wa16 prefill expands the weight and calls cuBLAS), "cuda mma 16 rows x 4 warps, 2
    chunks" (the CUDA decode kernel)."""
    split = f" split {cfg.split_k}" if cfg.split_k > 1 else ""
    if cfg.cuda:
        return f"cuda mma {cfg.block_n} rows x {cfg.num_warps} warps, {cfg.block_k // 128} chunks{split}"
    if cfg.dequant and kernel == "wa16":
        return "bf16 weight + cuBLAS"
    if cfg.gemv:
        return f"gemv {cfg.block_n}x{cfg.block_k}{split}"
    expand = "int8 weight + " if cfg.dequant else ""
    return f"{expand}mma {cfg.block_m}x{cfg.block_n}x{cfg.block_k}{split}"


def load_table(device: torch.device | int | None = None) -> int:
    """Put the committed table of this GPU model into the tuned-config cache (once per device per process);
    returns the number of entries read (0 without a table, or when LOWC_DISPATCH_TABLE=0)."""
    index = torch.device("cuda", torch.cuda.current_device()).index if device is None else \
        (device if isinstance(device, int) else (device.index or 0))
    if index in _LOADED:
        return 0
    _LOADED.add(index)
    if os.environ.get("LOWC_DISPATCH_TABLE", "1") == "0":
        return 0
    table = read_table(torch.cuda.get_device_name(index))
    from .cuda_build import available

    if not available():  # measured where the CUDA decode kernel compiled; here its keys are timed again
        table = {key: cfg for key, cfg in table.items() if not cfg.cuda}
    for key, cfg in table.items():
        _TUNED.setdefault(key, cfg)
    return len(table)


def tune(shapes: Iterable[tuple[int, int]], tokens: Iterable[int], bits: Iterable[int] = (4, 6, 8),
         kernels: Iterable[str] = ("wa16", "wa8"), group: int = 128, dtype: torch.dtype = torch.bfloat16,
         on_key: Callable[[str], None] | None = None) -> list[dict]:
    """Time every candidate config of every (kernel, shape, token count, bits) on the current GPU, ignoring any
    table, and return the winners as table entries."""
    from .lowbit_layout import to_lowbit_layout
    from .packing import pack_int
    from .wa8_gemm import wa8_gemm
    from .wa16_gemm import wa16_gemm

    _LOADED.add(torch.cuda.current_device())  # measure, do not read the committed table
    found = {}
    g = torch.Generator(device="cuda").manual_seed(0)
    for n, k in shapes:
        for b in bits:
            lo, hi = -(1 << (b - 1)), (1 << (b - 1)) - 1
            codes = torch.randint(lo, hi + 1, (n, k), device="cuda", generator=g)
            scales = torch.rand(n, -(-k // group), device="cuda", generator=g).to(torch.float16) * 0.01 + 1e-3
            w = to_lowbit_layout(pack_int(codes, b), scales, b, group, k)
            del codes
            for m in tokens:
                x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
                for kernel in kernels:
                    key = (kernel, m_bucket(m), n, k, b, group, dtype)
                    _TUNED.pop(key, None)
                    (wa16_gemm if kernel == "wa16" else wa8_gemm)(x, w)
                    found[key] = _TUNED[key]
                    if on_key is not None:
                        on_key(f"{kernel} W{b} {n}x{k} t{m}: {tuple(found[key])}")
            del w
            torch.cuda.empty_cache()
    return [_entry(key, cfg) for key, cfg in found.items()]


def save_table(entries: list[dict], path: Path | None = None, command: str = "lowc bench kernels") -> Path:
    """Write a table for the current GPU model (merged over the entries of an existing file at `path`)."""
    name = torch.cuda.get_device_name()
    path = Path(path) if path is not None else table_path(name)
    merged = {}
    if path.is_file():
        merged = {_key(e): e for e in json.loads(path.read_text())["entries"]}
    merged.update({_key(e): e for e in entries})
    import triton

    doc = {"device": name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "versions": {"torch": torch.__version__, "triton": triton.__version__}, "command": command,
           "entries": sorted(merged.values(), key=lambda e: (e["kernel"], e["n"], e["k"], e["bits"],
                                                             e["m_bucket"]))}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path
