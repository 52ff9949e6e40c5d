"""Model architectures lowc understands, resolved from a Hugging Face config dict.

The rest of lowc never names an architecture: it asks `architecture_of(config)` or calls `build_model(config)`.
Models hold no buffers (RoPE and position ids are computed in forward), so this works:

    with torch.device("meta"):
        model = build_model(config)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()          # decoders with tie_word_embeddings; encoders have a no-op
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import CheckpointError
from .bert import BertConfig, BertModel
from .llama import KVCache, LlamaConfig, LlamaForCausalLM


@dataclass(frozen=True)
class Architecture:
    """An HF architecture: how to build it from config.json and which modules stay dense by default."""

    name: str  # HF architectures[0], e.g. "LlamaForCausalLM"
    kind: str  # "decoder" or "encoder"
    build: Callable[[dict], torch.nn.Module]  # from the HF config dict
    keep_dense: tuple[str, ...]  # fnmatch patterns of module names never compressed by default


ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture("LlamaForCausalLM", "decoder", LlamaForCausalLM.from_hf,
                                     ("lm_head", "model.embed_tokens")),
    "BertModel": Architecture("BertModel", "encoder", BertModel.from_hf, ("embeddings.*",)),
}
MODEL_TYPES = {"llama": "LlamaForCausalLM", "bert": "BertModel"}  # for configs without "architectures"


def architecture_of(config: dict, where: str = "config.json") -> Architecture:
    """The Architecture a config describes (architectures[0], else model_type); anything else is a CheckpointError."""
    archs = config.get("architectures")
    if archs:
        name = archs[0] if isinstance(archs, list) else archs
    else:
        model_type = config.get("model_type")
        name = MODEL_TYPES.get(model_type, model_type) if isinstance(model_type, str) else model_type
    if not isinstance(name, str) or name not in ARCHITECTURES:
        raise CheckpointError(f"{where}: unsupported architecture '{name}' (supported: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[name]


def build_model(config: dict) -> torch.nn.Module:
    """Build the model a config describes: float32 parameters on the current default device (meta works)."""
    return architecture_of(config).build(config)


__all__ = ["Architecture", "ARCHITECTURES", "architecture_of", "build_model",
           "LlamaConfig", "LlamaForCausalLM", "KVCache", "BertConfig", "BertModel"]
