"""What `lowc inspect` reports about an artifact: per-module schemes and sizes, totals against bf16."""

from __future__ import annotations

import math

from .artifact import Artifact
from .scheme import DTYPE_BYTES


def module_kernel(scheme, device: str) -> str:
    """The kernel `lowc.load(..., device=device)` computes a module with (fp16/bf16 inputs on CUDA)."""
    from .runtime.packed_linear import fast_kernel_name

    return (fast_kernel_name(scheme) if device == "cuda" else None) or "reference"


TOKEN_BUCKETS = (1, 16, 128, 4096)
TABLE_KERNELS = ("wa16", "wa8")  # kernels whose launch configs come from the measured dispatch tables
# projections the generation engine fuses into one GEMM for decode (runtime/engine.py, runtime/fused_linear.py)
FUSED_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


def _decode_fusions(art: Artifact, kernels: dict[str, str]) -> dict[str, list[str]]:
    """Module -> the modules it shares a decode GEMM with, for the engine's fused q/k/v and gate/up groups."""
    from .runtime.fused_linear import fusable_schemes

    if art.kind != "decoder":
        return {}
    out: dict[str, list[str]] = {}
    for name in art.schemes:
        for group in FUSED_GROUPS:
            if not name.endswith("." + group[0]):
                continue
            prefix = name[: -len(group[0])]
            names = [prefix + part for part in group]
            if all(n in art.schemes and kernels[n] == kernels[name] in TABLE_KERNELS for n in names) and \
                    fusable_schemes([art.schemes[n] for n in names]):
                out.update({n: names for n in names})
    return out


def _vnm_path(scheme, kernel: str, tokens: int) -> str:
    """How a V:N:M module computes `tokens` tokens: the SpMM's fixed tiles, or for prefills a transient dense weight
    (`kernels/vnm_dense.py`) for cuBLAS or, with A8/A6 inputs, the W8A8 GEMM where its K tiles fit the groups."""
    from .kernels.vnm_dense import DENSE_PREFILL_TOKENS, dense_group

    if tokens < DENSE_PREFILL_TOKENS:
        return "sparse tiles by token count"
    if kernel == "vnm":
        return "expanded to a dense weight + cuBLAS"
    kept_group = None if scheme.group >= scheme.stored_columns else scheme.group
    fits = dense_group(kept_group, scheme.vnm.m) is not None
    return "expanded to dense INT8 + W8A8 GEMM" if fits else "sparse tiles by token count"


def dispatch_configs(art: Artifact, kernels: dict[str, str], fusions: dict[str, list[str]],
                     gpu: str) -> dict[str, dict[str, str]]:
    """Module -> {token bucket: the launch config the GPU model's dispatch table gives (bf16 activations), or
    "timed on first use"}; decode buckets of fused projections (`fusions`) look up the fused weight's shape. V:N:M
    modules get the fixed tiles `vnm_spmm.pick_config` chooses by token count."""
    import torch

    from .kernels.dispatch import config_label, read_table
    from .runtime.packed_linear import layout_bits

    table = read_table(gpu)
    out = {}
    for name, s in art.schemes.items():
        kernel = kernels[name]
        if kernel == "reference":
            continue
        if kernel not in TABLE_KERNELS:
            out[name] = {str(bucket): _vnm_path(s, kernel, bucket) for bucket in TOKEN_BUCKETS}
            continue
        configs = {}
        for bucket in TOKEN_BUCKETS:
            rows = s.shape[0]
            if bucket <= 16 and name in fusions:
                rows = sum(art.schemes[n].shape[0] for n in fusions[name])
            cfg = table.get((kernel, bucket, rows, s.shape[1], layout_bits(s.bits), s.group, torch.bfloat16))
            configs[str(bucket)] = "timed on first use" if cfg is None else config_label(kernel, cfg)
        out[name] = configs
    return out


def describe(art: Artifact, device: str = "cpu", gpu: str | None = None) -> dict:
    """A JSON-ready description of an artifact (the data behind `lowc inspect` and `--json`); `kernel` per module
    is what the runtime computes it with on `device` ("cpu" or "cuda"). On "cuda", `configs` per module gives the
    launch config per token count from the dispatch table of the GPU model `gpu` (default: this machine's GPU)."""
    kernels = {name: module_kernel(s, device) for name, s in art.schemes.items()}
    fused = _decode_fusions(art, kernels) if device == "cuda" else {}
    configs: dict[str, dict[str, str]] = {}
    table = None
    if device == "cuda":
        if gpu is None:
            import torch

            gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        if gpu is not None:
            from .kernels.dispatch import table_path

            configs = dispatch_configs(art, kernels, fused, gpu)
            path = table_path(gpu)
            table = {"gpu": gpu, "file": str(path) if path.is_file() else None}
    modules = []
    for name, s in art.schemes.items():
        modules.append({
            "name": name, "shape": list(s.shape), "scheme": s.label(), "vnm": None if s.vnm is None else str(s.vnm),
            "density": s.density, "bits": s.bits, "group": s.group if s.bits else None, "bytes": s.nbytes(),
            "bf16_bytes": 2 * math.prod(s.shape), "kernel": kernels[name],
            **({"decode_fused_with": fused.get(name), "configs": configs.get(name)} if device == "cuda" else {}),
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
        "dispatch_table": table,
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
