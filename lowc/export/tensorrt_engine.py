"""Build a TensorRT engine from lowc's exported ONNX: parse, set precision and shape ranges, build, save.

`tensorrt` is imported lazily: without it, `require_tensorrt()` raises a LowcError that says how to install it, and
nothing else in lowc needs it. The engine uses lowc's plugins (`tensorrt_plugins.register_plugins()` runs before
parsing, so the parser picks plugins over the ONNX functions); `plugins.json` next to `model.engine` lists them,
and a process that deserializes the engine must register them the same way first.

Untested here (no TensorRT on lowc's CI or GPU machines): everything that calls into `tensorrt`. Tested: the
error without it, the optimization-profile shapes (`profile_shapes`) and the network flags against a stand-in module.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx

from ..errors import LowcError, UsageError
from . import PLUGIN_IMPLEMENTATIONS
from .tensorrt_plugins import plugin_records, register_plugins

ENGINE_FILE = "model.engine"
PLUGINS_FILE = "plugins.json"
MIN_TENSORRT = (10, 9)  # tensorrt.plugin with aot_impl and the PREFER_AOT/JIT_PYTHON_PLUGINS network flags


def require_tensorrt():
    """The `tensorrt` module, or a LowcError explaining how to install it."""
    try:
        import tensorrt as trt
    except ImportError:
        raise LowcError("--target trt needs TensorRT, which is not installed: pip install tensorrt "
                        "(or pip install 'lowc[trt]'; needs an NVIDIA GPU and driver). "
                        "`lowc export --target onnx` works without it") from None
    version = tuple(int(p) for p in trt.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_TENSORRT:
        raise LowcError(f"TensorRT {trt.__version__} is too old for lowc's plugins (tensorrt.plugin needs "
                        f"{'.'.join(map(str, MIN_TENSORRT))}+): pip install -U tensorrt")
    return trt


def profile_shapes(model: onnx.ModelProto, max_batch: int = 8, max_sequence: int = 2048,
                   opt_sequence: int = 128) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shapes of every graph input for one TensorRT optimization profile.

    Named dimensions: `batch` 1..max_batch (opt 1), `sequence` 1..max_sequence (opt opt_sequence),
    `past_sequence` 0..max_sequence (opt opt_sequence); fixed dimensions stay as they are.
    """
    ranges = {"batch": (1, 1, max_batch), "sequence": (1, opt_sequence, max_sequence),
              "past_sequence": (0, opt_sequence, max_sequence)}
    out = {}
    for value in model.graph.input:
        dims = []
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param:
                if d.dim_param not in ranges:
                    raise LowcError(f"input {value.name}: no shape range for dimension '{d.dim_param}'")
                dims.append(ranges[d.dim_param])
            else:
                dims.append((d.dim_value,) * 3)
        out[value.name] = tuple(tuple(r[i] for r in dims) for i in range(3))
    return out


def network_flags(trt, plugins: str) -> int:
    """Network creation flags: which implementation TensorRT takes for plugins that have both ("aot" or "jit")."""
    if plugins not in PLUGIN_IMPLEMENTATIONS:
        raise UsageError(f"--trt-plugins: expected one of {', '.join(PLUGIN_IMPLEMENTATIONS)}, got {plugins!r}")
    flag = "PREFER_AOT_PYTHON_PLUGINS" if plugins == "aot" else "PREFER_JIT_PYTHON_PLUGINS"
    return 1 << int(getattr(trt.NetworkDefinitionCreationFlag, flag))


def build_engine(onnx_path: Path, out_dir: Path, lowc_ops: set[str], fp16: bool = True, max_batch: int = 8,
                 max_sequence: int = 2048, workspace_bytes: int = 8 * 2**30, plugins: str = "aot") -> list[str]:
    """Parse `onnx_path`, build a serialized engine and write model.engine + plugins.json; returns the file names.

    `plugins="aot"` embeds the GEMM plugins' PTX kernels in the engine (`tensorrt_aot.py`); "jit" runs every plugin
    through its Python implementation."""
    trt = require_tensorrt()
    flags = network_flags(trt, plugins)
    register_plugins()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise LowcError(f"{onnx_path}: TensorRT could not parse the model: {errors[:2000]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile_shapes(onnx.load(str(onnx_path), load_external_data=False), max_batch,
                                              max_sequence).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise LowcError(f"{onnx_path}: TensorRT failed to build an engine (run with TensorRT's VERBOSE log to see why)")
    (out_dir / ENGINE_FILE).write_bytes(bytes(serialized))
    (out_dir / PLUGINS_FILE).write_text(json.dumps({
        "tensorrt": trt.__version__, "fp16": fp16, "max_batch": max_batch, "max_sequence": max_sequence,
        "plugins": plugin_records(lowc_ops, plugins),
        "load": "call lowc.export.tensorrt_plugins.register_plugins() before deserializing the engine",
    }, indent=2) + "\n")
    return [ENGINE_FILE, PLUGINS_FILE]
