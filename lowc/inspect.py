"""What `lowc inspect` reports about an artifact: per-module schemes and sizes, totals against bf16."""

from __future__ import annotations

import math

from .artifact import Artifact
from .scheme import DTYPE_BYTES


def module_kernel(scheme, device: str) -> str:
    """The kernel `lowc.load(..., device=device)` computes a module with (fp16/bf16 inputs on CUDA)."""
    from .runtime.packed_linear import fast_kernel_name

    return (fast_kernel_name(scheme) if device == "cuda" else None) or "reference"


def describe(art: Artifact, device: str = "cpu") -> dict:
    """A JSON-ready description of an artifact (the data behind `lowc inspect` and `--json`); `kernel` per module
    is what the runtime computes it with on `device` ("cpu" or "cuda")."""
    modules = []
    for name, s in art.schemes.items():
        modules.append({
            "name": name, "shape": list(s.shape), "scheme": s.label(), "vnm": None if s.vnm is None else str(s.vnm),
            "density": s.density, "bits": s.bits, "group": s.group if s.bits else None, "bytes": s.nbytes(),
            "bf16_bytes": 2 * math.prod(s.shape), "kernel": module_kernel(s, device),
        })
    dense = art.dense_tensor_names()
    dense_bytes = 0
    for name in dense:
        shape, dtype = art.tensor_info(name)
        dense_bytes += math.prod(shape) * DTYPE_BYTES.get(dtype, 4)
    on_disk = art.nbytes()
    bf16 = art.source.get("bf16_bytes")
    return {
        "path": str(art.path),
        "format_version": art.manifest.get("format_version"),
        "producer": art.manifest.get("producer", {}),
        "architecture": art.architecture.name,
        "kind": art.kind,
        "device": device,
        "recipe": art.recipe,
        "modules": modules,
        "dense_tensors": {"count": len(dense), "bytes": dense_bytes},
        "totals": {
            "bytes_on_disk": on_disk,
            "bf16_bytes": bf16,
            "ratio_vs_bf16": on_disk / bf16 if isinstance(bf16, (int, float)) and bf16 > 0 else None,
            "compressed_modules": len(modules),
        },
        "metrics": {k: v for k, v in art.metrics.items() if k != "weight_rel_error"},
    }
