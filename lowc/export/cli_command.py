"""The `lowc export` command (registered on the CLI group with `cli.add_command(export)`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..console import format_bytes as _fmt_bytes
from . import MANIFEST, PLUGIN_IMPLEMENTATIONS, TARGETS
from . import export as export_artifact


@click.command("export")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--target", type=click.Choice(TARGETS), default="onnx", show_default=True,
              help="onnx: model.onnx for onnxruntime (CPU/GPU) and other ONNX runtimes; trt: also a TensorRT engine "
                   "(needs `pip install tensorrt`).")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Directory to create (default: ARTIFACT-onnx / ARTIFACT-trt next to the artifact).")
@click.option("--allow-fallback", is_flag=True,
              help="Store modules the target cannot express (INT2/INT3 weights) as dequantized float32 weights "
                   "instead of failing; they are listed in export_manifest.json.")
@click.option("--opset", type=int, default=21, show_default=True, help="ONNX opset to write (21 to 23).")
@click.option("--trt-plugins", type=click.Choice(PLUGIN_IMPLEMENTATIONS), default="aot", show_default=True,
              help="With --target trt: aot embeds the plugins' compiled Triton kernels in the engine (no Python at run "
                   "time); jit runs every plugin through its Python implementation.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it is an existing lowc export.")
@click.option("--json", "as_json", is_flag=True, help="Print the export manifest as JSON.")
def export(artifact: Path, target: str, output: Path | None, allow_fallback: bool, opset: int, trt_plugins: str,
           force: bool, as_json: bool) -> None:
    """Export a lowc artifact to ONNX (and a TensorRT engine with --target trt).

    \b
    lowc export ./llama-lowc -o ./llama-onnx
    lowc export ./llama-lowc --target trt -o ./llama-trt
    """
    out = export_artifact(artifact, target=target, output=output, allow_fallback=allow_fallback, opset=opset,
                          force=force, trt_plugins=trt_plugins)
    manifest = json.loads((out / MANIFEST).read_text())
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
        return
    onnx_info = manifest["onnx"]
    click.echo(f"wrote {out}")
    click.echo(f"  model.onnx: {_fmt_bytes(onnx_info['bytes'])} ({onnx_info['ratio_vs_artifact_tensors']}x the "
               f"artifact's tensors), opset {onnx_info['opset']}, IR {onnx_info['ir_version']}")
    ops = ", ".join(manifest["lowc_ops"]) or "none"
    click.echo(f"  lowc ops (ONNX functions + TensorRT plugins): {ops}")
    if manifest["fallbacks"]:
        click.echo(f"  dequantized to float32 (--allow-fallback): {len(manifest['fallbacks'])} module(s), "
                   f"see {MANIFEST}")
    if target == "trt":
        click.echo("  model.engine + plugins.json: register lowc's plugins before loading the engine")
