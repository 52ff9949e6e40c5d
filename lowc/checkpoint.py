"""Hugging Face checkpoint directories: config.json, single or sharded safetensors, tokenizer files.

Tensors are memory-mapped through safetensors; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import CheckpointError, UsageError
from .models import Architecture, architecture_of

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
    "merges.txt", "tokenizer.model", "added_tokens.json", "generation_config.json", "chat_template.jinja",
)


def read_json(path: Path, error=CheckpointError) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    return data


class Checkpoint:
    """A validated, memory-mapped view of a Hugging Face model directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise UsageError(f"{self.path}: no such file or directory")
        if not self.path.is_dir():
            raise UsageError(f"{self.path}: expected a Hugging Face model directory (config.json + *.safetensors)")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise UsageError(f"{self.path}: not a Hugging Face checkpoint directory (no config.json)")
        self.config = read_json(config_path)
        self.architecture: Architecture = architecture_of(self.config, where=str(config_path))
        self._handles = {}
        self._key_cache: dict[str, set[str]] = {}
        self.weight_map = self._weight_map()
        for file in sorted(set(self.weight_map.values()) - set(self._handles)):
            self._handles[file] = self._open(file)
        for name, file in self.weight_map.items():
            if name not in self._keys(file):
                raise CheckpointError(f"{self.path / INDEX_FILE}: tensor '{name}' is not in {file}")

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.is_file():
            data = read_json(index)
            wm = data.get("weight_map")
            if not isinstance(wm, dict) or not wm:
                raise CheckpointError(f"{index}: missing or empty 'weight_map'")
            for name, file in wm.items():
                if not isinstance(file, str) or Path(file).name != file or not file.endswith(".safetensors"):
                    raise CheckpointError(f"{index}: tensor '{name}' maps to '{file}', expected a .safetensors file name in the directory")
                if not (self.path / file).is_file():
                    raise CheckpointError(f"{index}: shard {file} is missing")
            return dict(wm)
        single = self.path / SINGLE_FILE
        if single.is_file():
            self._handles[SINGLE_FILE] = self._open(SINGLE_FILE)
            return {k: SINGLE_FILE for k in self._handles[SINGLE_FILE].keys()}
        raise CheckpointError(f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are supported)")

    def _open(self, file: str):
        try:
            return safe_open(str(self.path / file), framework="pt", device="cpu")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{self.path / file}: truncated or corrupted safetensors file ({e})") from None

    def _keys(self, file: str) -> set[str]:
        if file not in self._key_cache:
            self._key_cache[file] = set(self._handles[file].keys())
        return self._key_cache[file]

    @property
    def kind(self) -> str:
        return self.architecture.kind

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.weight_map[name]].get_slice(name).get_shape())

    def safetensors_dtype(self, name: str) -> str:
        """The dtype tag of a tensor as stored (BF16, F16, F32, I64, ...), read from the header only."""
        return self._handles[self.weight_map[name]].get_slice(name).get_dtype()

    def get(self, name: str, check_finite: bool = True) -> torch.Tensor:
        """Read one tensor (memory-mapped); NaN/Inf in a floating tensor raises CheckpointError naming it."""
        file = self.weight_map[name]
        try:
            tensor = self._handles[file].get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{self.path / file}: cannot read tensor '{name}' ({e})") from None
        if check_finite and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{self.path / file}: tensor '{name}' contains NaN or Inf")
        return tensor

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.weight_map:
            yield name, self.get(name)

    def dtype(self) -> str:
        """The dominant floating dtype of the checkpoint's weights (bfloat16, float16 or float32)."""
        declared = self.config.get("torch_dtype") or self.config.get("dtype")
        if declared in ("bfloat16", "float16", "float32"):
            return declared
        tags = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
        first = next((n for n in self.weight_map if self.safetensors_dtype(n) in tags), None)
        return "float32" if first is None else tags[self.safetensors_dtype(first)]

    def nbytes_bf16(self) -> int:
        """Bytes the checkpoint's floating weights take in bf16 (the baseline sizes are compared against)."""
        return sum(2 * math.prod(self.shape(n)) for n in self.weight_map)

    def tokenizer_files(self) -> list[Path]:
        return [self.path / f for f in TOKENIZER_FILES if (self.path / f).is_file()]


def write_checkpoint(path: str | Path, config: dict, tensors: dict[str, torch.Tensor],
                     extra_files: list[Path] = (), max_shard_bytes: int = 5 * 2**30) -> None:
    """Write an HF-style checkpoint directory (sharded above `max_shard_bytes`); used by tests and examples."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(path / SINGLE_FILE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / file), metadata={"format": "pt"})
            weight_map.update({n: file for n in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    for f in extra_files:
        dst = path / Path(f).name
        if not dst.exists():
            dst.write_bytes(Path(f).read_bytes())
