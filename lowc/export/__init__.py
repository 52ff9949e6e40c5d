"""`lowc export`: turn a lowc artifact into what other runtimes deploy — an ONNX model or a TensorRT engine.

Why: the lowc runtime is one way to run an artifact; onnxruntime (CPU/GPU) and TensorRT are how many teams deploy.
The export keeps weights packed (INT4/INT8 as standard block-quantized `DequantizeLinear`, INT6 and V:N:M as lowc
ops that carry an exact ONNX-function decomposition and a TensorRT plugin identity), so the exported file is about
the artifact's size and onnxruntime runs it without any plugin. docs/EXPORT.md describes the file.

The output is a directory written atomically: `model.onnx` (+ `model.onnx.data` for models over 1.5 GiB),
`export_manifest.json` (files and sizes, opset, lowc ops / TensorRT plugins used, modules dequantized by
`allow_fallback`, lowc version), the artifact's `config.json` and tokenizer files, and for `target="trt"` also
`model.engine` and `plugins.json`.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import uuid
from pathlib import Path

from .. import __version__
from ..artifact import open_artifact, sha256_file
from ..errors import LowcError, UsageError

TARGETS = ("onnx", "trt")
PLUGIN_IMPLEMENTATIONS = ("aot", "jit")  # TensorRT GEMM plugins: PTX in the engine, or Python callbacks
MANIFEST = "export_manifest.json"
MODEL_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx.data"
EXTERNAL_DATA_THRESHOLD = 3 * 2**29  # 1.5 GiB: protobuf cannot serialize 2 GiB in one message
MIN_OPSET, MAX_OPSET = 21, 23
COPIED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                "generation_config.json")


class ExportError(LowcError):
    """The artifact cannot be exported to the requested target as it is (exit code 1)."""


def _check_output(out: Path, force: bool) -> None:
    if out.exists() or out.is_symlink():
        if not force:
            raise UsageError(f"{out}: already exists (pass --force to replace it)")
        if not out.is_dir() or out.is_symlink():
            raise UsageError(f"{out}: exists and is not a directory; refusing to replace it")
        if any(out.iterdir()) and not (out / MANIFEST).is_file():
            raise UsageError(f"{out}: exists and is not a lowc export; refusing to replace it even with --force")
    if not out.parent.exists():
        raise UsageError(f"{out.parent}: parent directory of the output does not exist")


def _plan_fallbacks(art, target: str, allow_fallback: bool) -> set[str]:
    from .onnx_graph import unsupported_modules

    bad = unsupported_modules(art)
    if bad and not allow_fallback:
        listed = "; ".join(f"{m}: {why}" for m, why in list(bad.items())[:8])
        more = f" (and {len(bad) - 8} more)" if len(bad) > 8 else ""
        raise ExportError(f"{art.path}: {len(bad)} module(s) cannot be exported to {target}: {listed}{more}. "
                          "Pass --allow-fallback (allow_fallback=True) to store them as dequantized float32 weights "
                          "(recorded in the export manifest), or compress with --wbits 4, 6 or 8")
    return set(bad)


def _save_onnx(model, directory: Path, external: bool) -> list[str]:
    import onnx

    path = directory / MODEL_FILE
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=EXTERNAL_DATA_FILE, size_threshold=1024)
        onnx.checker.check_model(str(path))
        return [MODEL_FILE, EXTERNAL_DATA_FILE]
    onnx.save_model(model, str(path))
    onnx.checker.check_model(model)
    return [MODEL_FILE]


def _io_json(model) -> dict:
    def shape(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    return {"inputs": {v.name: shape(v) for v in model.graph.input},
            "outputs": {v.name: shape(v) for v in model.graph.output}}


def export(artifact_path: str | Path, target: str = "onnx", output: str | Path | None = None,
           allow_fallback: bool = False, opset: int = MIN_OPSET, force: bool = False,
           external_data: bool | None = None, fp16: bool = True, verify: bool = True,
           trt_plugins: str = "aot") -> Path:
    """Export a lowc artifact to `target` ("onnx" or "trt") into the directory `output`; returns that directory.

    `output` defaults to the artifact's path with `-onnx` / `-trt` appended. Modules whose scheme the target cannot
    express (INT2/INT3 weights) raise ExportError naming them, unless `allow_fallback` stores them dequantized
    (float32) and records them in export_manifest.json. `opset` is 21 to 23. `external_data` (default: only past
    1.5 GiB) puts the weights in model.onnx.data. For "trt", `fp16` enables FP16 kernels in the engine build and
    `trt_plugins` picks the GEMM plugins' implementation: "aot" (PTX kernels inside the engine, no Python needed to
    run it) or "jit" (Python callbacks); TensorRT must be installed (`pip install tensorrt`), otherwise a LowcError
    says so before any work is done.
    `verify=False` skips the artifact's sha256 check (faster on huge artifacts).
    """
    if target not in TARGETS:
        raise UsageError(f"--target: expected one of {', '.join(TARGETS)}, got {target!r}")
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise UsageError(f"--opset: lowc writes opsets {MIN_OPSET} to {MAX_OPSET}, got {opset}")
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise LowcError("ONNX export needs the onnx package: pip install onnx onnxruntime "
                        "(or pip install 'lowc[onnx]')") from None
    if trt_plugins not in PLUGIN_IMPLEMENTATIONS:
        raise UsageError(f"--trt-plugins: expected one of {', '.join(PLUGIN_IMPLEMENTATIONS)}, got {trt_plugins!r}")
    if target == "trt":
        from .tensorrt_engine import require_tensorrt

        require_tensorrt()
    art = open_artifact(artifact_path, verify=verify)
    out = Path(output) if output is not None else art.path.with_name(f"{art.path.name}-{target}")
    out = out.absolute()
    if out == art.path.absolute():
        raise UsageError(f"{out}: the output must not be the artifact itself")
    _check_output(out, force)
    fallback = _plan_fallbacks(art, target, allow_fallback)

    from .onnx_graph import build_onnx
    from .tensorrt_plugins import plugin_records

    exported = build_onnx(art, fallback, opset)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        weights = sum(len(t.raw_data) for t in exported.model.graph.initializer)
        external = external_data if external_data is not None else weights > EXTERNAL_DATA_THRESHOLD
        files = _save_onnx(exported.model, tmp, external)
        for name in COPIED_FILES:
            if (art.path / name).is_file():
                shutil.copyfile(art.path / name, tmp / name)
        plugins = plugin_records(exported.lowc_ops, trt_plugins)
        if target == "trt":
            from .tensorrt_engine import build_engine

            files += build_engine(tmp / MODEL_FILE, tmp, exported.lowc_ops, fp16=fp16, plugins=trt_plugins)
        onnx_bytes = sum((tmp / f).stat().st_size for f in files if f.startswith(MODEL_FILE))
        tensor_bytes = sum(p.stat().st_size for n, p in art.files.items() if n.endswith(".safetensors"))
        manifest = {
            "format": "lowc-export", "format_version": "1.0", "target": target,
            "producer": {"name": "lowc", "version": __version__,
                         "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
            "artifact": {"path": str(art.path.absolute()), "architecture": art.architecture.name, "kind": art.kind,
                         "format_version": art.manifest.get("format_version"), "bytes": art.nbytes(),
                         "tensor_bytes": tensor_bytes},
            "onnx": {"file": MODEL_FILE, "external_data": EXTERNAL_DATA_FILE if external else None, "opset": opset,
                     "ir_version": exported.model.ir_version, "bytes": onnx_bytes,
                     "ratio_vs_artifact_tensors": round(onnx_bytes / tensor_bytes, 4) if tensor_bytes else None,
                     **_io_json(exported.model)},
            "lowc_ops": sorted(exported.lowc_ops),
            "plugins": plugins,
            "fallbacks": {m: {"reason": why, "stored_as": "float32 dequantized weight"}
                          for m, why in sorted(exported.fallbacks.items())},
            "files": {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                      for p in sorted(tmp.iterdir()) if p.is_file()},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


__all__ = ["export", "ExportError", "TARGETS", "PLUGIN_IMPLEMENTATIONS", "MANIFEST", "MODEL_FILE"]
