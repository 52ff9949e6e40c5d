"""`lowc.load`: a checkpoint or artifact directory -> a ready torch module (weights stay packed)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..artifact import is_artifact, open_artifact
from ..checkpoint import Checkpoint
from ..errors import ArtifactError, CheckpointError, UsageError
from ..models import build_model
from .packed_linear import PackedLinear
from .tokenizer import load_tokenizer

log = logging.getLogger("lowc.runtime")
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _set_submodule(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         verify: bool = True) -> torch.nn.Module:
    """Load a lowc artifact (or a plain HF checkpoint) as an eval-mode torch module on `device`.

    Compressed Linears become PackedLinear modules that keep their packed tensors; on CUDA, dense INT4/INT6/INT8
    modules move to the Triton GEMMs' layout and compute through them (LOWC_KERNELS=reference keeps every module on
    the reference kernels); everything else is loaded in `dtype`. The module carries `.tokenizer` (when the directory
    has one), `.lowc_config` (the HF config dict), `.lowc_manifest` (None for checkpoints) and `.lowc_path`.
    """
    path = Path(path)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available on this machine")
    if is_artifact(path):
        source = open_artifact(path, verify=verify)
        manifest, schemes, names = source.manifest, source.schemes, source.dense_tensor_names()
        error = ArtifactError
    else:
        source = Checkpoint(path)
        manifest, schemes, names = None, {}, source.keys()
        error = CheckpointError
    config = source.config
    with torch.device("meta"):
        model = build_model(config)
    for name, scheme in schemes.items():
        # the artifact checked on open that `name` is a Linear of this shape in the config's model
        tensors = {s: t.to(device) for s, t in source.module_tensors(name).items()}
        if "bias" in tensors:
            tensors["bias"] = tensors["bias"].to(dtype)
        if "values" in tensors:
            tensors["values"] = tensors["values"].to(dtype)
        _set_submodule(model, name, PackedLinear(scheme, tensors))
    wanted = set(model.state_dict().keys())
    state = {}
    for name in names:
        if name not in wanted:
            log.debug("ignoring tensor %s (not used by the model)", name)
            continue
        t = source.get(name)
        state[name] = t.to(device, dtype) if t.is_floating_point() else t.to(device)
    model.load_state_dict(state, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing:
        raise error(f"{path}: missing weights for {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    model.eval().requires_grad_(False)
    if schemes:
        fast = 0
        if device.type == "cuda" and os.environ.get("LOWC_KERNELS", "fast") != "reference":
            fast = sum(m.use_fast_kernel(dtype) for m in model.modules() if isinstance(m, PackedLinear))
        log.info("%d packed modules compute through lowc's GPU kernels (low-bit GEMMs, V:N:M SpMM; fp16/bf16 "
                 "inputs), %d through the reference kernels (plain torch on %s)", fast, len(schemes) - fast, device)
    model.lowc_path = path
    model.lowc_config = config
    model.lowc_manifest = manifest
    model.tokenizer = load_tokenizer(path, config) if (path / "tokenizer.json").is_file() else None
    return model
