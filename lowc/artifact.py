"""The lowc artifact: a directory with a manifest (lowc.json), packed safetensors, tokenizer and config.json.

Written atomically (a temporary sibling directory renamed into place) and verified on load: every file's sha256,
the format version, every module's tensor shapes and dtypes, and that no file lies outside the directory.
The byte-level specification is docs/FORMAT.md.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__
from .errors import ArtifactError, LowcError, UsageError
from .scheme import ModuleScheme

FORMAT_NAME = "lowc"
FORMAT_VERSION = "1.0"
MANIFEST = "lowc.json"
SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "U8": "uint8", "I8": "int8",
                      "I64": "int64", "I32": "int32", "F64": "float64", "BOOL": "bool"}


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse to replace anything the user did not ask to replace; called before any work is done."""
    if out.exists() or out.is_symlink():
        if not force:
            raise UsageError(f"{out}: already exists (pass --force to replace it)")
        if not out.is_dir() or out.is_symlink():
            raise UsageError(f"{out}: exists and is not a directory; refusing to replace it")
        if any(out.iterdir()) and not is_artifact(out):
            raise UsageError(f"{out}: exists and is not a lowc artifact; refusing to replace it even with --force")
    if not out.parent.exists():
        raise UsageError(f"{out.parent}: parent directory of the output does not exist")


class ArtifactWriter:
    """Collects tensors into size-bounded safetensors shards in a temporary directory, then renames it into place."""

    def __init__(self, out: str | Path, force: bool = False, max_shard_bytes: int = 4 * 2**30):
        self.out = Path(out).absolute()
        self.force = force
        check_output_dir(self.out, force)
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.tensor_names: set[str] = set()

    def __enter__(self) -> "ArtifactWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.tensor_names:
            raise ValueError(f"tensor {name} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().cpu().contiguous()
        self._pending_bytes += nbytes
        self.tensor_names.add(name)

    def _flush(self) -> None:
        if not self._pending:
            return
        save_file(self._pending, str(self.tmp / f"part-{len(self._shards)}.safetensors"), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def copy_file(self, src: Path, name: str | None = None) -> None:
        shutil.copyfile(src, self.tmp / (name or src.name))

    def write_json(self, name: str, data: dict) -> None:
        (self.tmp / name).write_text(json.dumps(data, indent=2) + "\n")

    def finish(self, manifest: dict) -> Path:
        """Name the shards, hash every file, write lowc.json and move the directory into place."""
        self._flush()
        count = len(self._shards)
        tensors: dict[str, str] = {}
        for i, names in enumerate(self._shards):
            file = "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.tmp / f"part-{i}.safetensors", self.tmp / file)
            tensors.update({n: file for n in names})
        files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                 for p in sorted(self.tmp.iterdir()) if p.is_file() and p.name != MANIFEST}
        manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **manifest,
                    "tensors": tensors, "files": files}
        self.write_json(MANIFEST, manifest)
        old = None
        if self.out.exists():
            check_output_dir(self.out, self.force)
            old = self.out.parent / f".{self.out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def producer_info() -> dict:
    return {"name": "lowc", "version": __version__, "torch": torch.__version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _safe_member(root: Path, name: object, what: str) -> Path:
    """A file named by the manifest, guaranteed to be a plain file directly inside the artifact directory."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\x00" in name or os.path.isabs(name)):
        raise ArtifactError(f"{root / MANIFEST}: {what} '{name}' is not a plain file name inside the artifact directory")
    path = root / name
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise ArtifactError(f"{root}: {what} '{name}' listed in {MANIFEST} is missing") from None
    if resolved.parent != root.resolve() or not resolved.is_file():
        raise ArtifactError(f"{root / MANIFEST}: {what} '{name}' points outside the artifact directory")
    return path


class Artifact:
    """A verified lowc artifact opened for reading (tensors memory-mapped)."""

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        if not self.path.exists():
            raise UsageError(f"{self.path}: no such file or directory")
        if not self.path.is_dir() or not (self.path / MANIFEST).is_file():
            raise ArtifactError(f"{self.path}: not a lowc artifact (no {MANIFEST})")
        self.manifest = self._read_manifest()
        self._check_files(verify)
        self.config = self._require(dict, "config")
        from .models import architecture_of
        from .errors import CheckpointError
        try:
            self.architecture = architecture_of(self.config, where=f"{self.path / MANIFEST}: config")
        except CheckpointError as e:
            raise ArtifactError(str(e)) from None
        self.recipe = self._require(dict, "recipe")
        modules = self._require(dict, "modules")
        self.schemes = {name: ModuleScheme.from_json(name, entry) for name, entry in modules.items()}
        self._check_modules_against_config()
        self._open_tensors()

    def _check_modules_against_config(self) -> None:
        """Every compressed module must be a Linear of the model its config builds, with the same shape."""
        with torch.device("meta"):
            try:
                model = self.architecture.build(self.config)
            except LowcError as e:
                raise ArtifactError(f"{self.path / MANIFEST}: config: {e}") from None
        linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        for name, scheme in self.schemes.items():
            m = linears.get(name)
            if m is None:
                raise ArtifactError(f"{self.path / MANIFEST}: module '{name}' is not a Linear of a {self.architecture.name}")
            if (m.out_features, m.in_features) != scheme.shape or (m.bias is not None) != scheme.bias:
                raise ArtifactError(f"{self.path / MANIFEST}: module '{name}' is {list(scheme.shape)} (bias {scheme.bias}), "
                                    f"the config implies {[m.out_features, m.in_features]} (bias {m.bias is not None})")

    # -- manifest structure -------------------------------------------------------------------------------------
    def _read_manifest(self) -> dict:
        where = self.path / MANIFEST
        try:
            data = json.loads(where.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise ArtifactError(f"{where}: not readable JSON ({str(e)[:200]})") from None
        if not isinstance(data, dict):
            raise ArtifactError(f"{where}: expected a JSON object")
        if data.get("format") != FORMAT_NAME:
            raise ArtifactError(f"{where}: 'format' is {data.get('format')!r}, expected 'lowc'")
        version = data.get("format_version")
        if not isinstance(version, str) or version.split(".")[0] != FORMAT_VERSION.split(".")[0]:
            raise ArtifactError(f"{where}: format version {version!r} is not supported by lowc {__version__} "
                                f"(it reads {FORMAT_VERSION.split('.')[0]}.x); use a matching lowc release")
        return data

    def _require(self, kind: type, key: str):
        value = self.manifest.get(key)
        if not isinstance(value, kind):
            raise ArtifactError(f"{self.path / MANIFEST}: '{key}' must be a JSON {'object' if kind is dict else kind.__name__}")
        return value

    def _check_files(self, verify: bool) -> None:
        files = self._require(dict, "files")
        self.files: dict[str, Path] = {}
        for name, entry in files.items():
            path = _safe_member(self.path, name, "file")
            if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or not isinstance(entry.get("bytes"), int):
                raise ArtifactError(f"{self.path / MANIFEST}: file '{name}' needs 'sha256' and 'bytes'")
            size = path.stat().st_size
            if size != entry["bytes"]:
                raise ArtifactError(f"{path}: {size} bytes on disk, the manifest says {entry['bytes']} (truncated or replaced)")
            if verify and sha256_file(path) != entry["sha256"]:
                raise ArtifactError(f"{path}: sha256 does not match the manifest (the file was modified or corrupted)")
            self.files[name] = path

    def _open_tensors(self) -> None:
        where = self.path / MANIFEST
        tensors = self._require(dict, "tensors")
        self.weight_map: dict[str, str] = {}
        self._handles = {}
        for name, file in tensors.items():
            if file not in self.files or not str(file).endswith(".safetensors"):
                raise ArtifactError(f"{where}: tensor '{name}' is in '{file}', which is not a listed .safetensors file")
            if file not in self._handles:
                try:
                    self._handles[file] = safe_open(str(self.files[file]), framework="pt", device="cpu")
                except (SafetensorError, OSError) as e:
                    raise ArtifactError(f"{self.files[file]}: truncated or corrupted safetensors file ({e})") from None
            self.weight_map[name] = file
        for file, handle in self._handles.items():
            present = set(handle.keys())
            for name, f in self.weight_map.items():
                if f == file and name not in present:
                    raise ArtifactError(f"{self.files[file]}: tensor '{name}' listed in {MANIFEST} is missing")
        for module, scheme in self.schemes.items():
            for suffix, (shape, dtype) in scheme.expected_tensors().items():
                name = f"{module}.{suffix}"
                if name not in self.weight_map:
                    raise ArtifactError(f"{where}: module '{module}' needs tensor '{name}', which is not listed")
                got_shape, got_dtype = self.tensor_info(name)
                if tuple(got_shape) != tuple(shape) or got_dtype != dtype:
                    raise ArtifactError(f"{self.files[self.weight_map[name]]}: tensor '{name}' is {got_dtype}{list(got_shape)}, "
                                        f"the manifest's scheme for '{module}' needs {dtype}{list(shape)}")

    # -- access -------------------------------------------------------------------------------------------------
    def tensor_info(self, name: str) -> tuple[tuple[int, ...], str]:
        sl = self._handles[self.weight_map[name]].get_slice(name)
        return tuple(sl.get_shape()), SAFETENSORS_DTYPES.get(sl.get_dtype(), sl.get_dtype())

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handles[self.weight_map[name]].get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ArtifactError(f"{self.files[self.weight_map[name]]}: cannot read tensor '{name}' ({e})") from None

    def module_tensors(self, module: str) -> dict[str, torch.Tensor]:
        return {suffix: self.get(f"{module}.{suffix}") for suffix in self.schemes[module].expected_tensors()}

    def dense_tensor_names(self) -> list[str]:
        """Tensors that are not part of a compressed module (norms, embeddings, skipped layers)."""
        owned = {f"{m}.{s}" for m, sch in self.schemes.items() for s in sch.expected_tensors()}
        return [n for n in self.weight_map if n not in owned]

    @property
    def kind(self) -> str:
        return self.architecture.kind

    @property
    def metrics(self) -> dict:
        m = self.manifest.get("metrics")
        return m if isinstance(m, dict) else {}

    @property
    def source(self) -> dict:
        s = self.manifest.get("source")
        return s if isinstance(s, dict) else {}

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.files.values())


def open_artifact(path: str | Path, verify: bool = True) -> Artifact:
    """Open and verify an artifact; every problem is an ArtifactError (or UsageError for a missing path)."""
    try:
        return Artifact(path, verify=verify)
    except LowcError:
        raise
    except (OSError, ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError) as e:
        raise ArtifactError(f"{path}: invalid artifact ({type(e).__name__}: {e})") from None
