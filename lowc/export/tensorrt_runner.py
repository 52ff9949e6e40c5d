"""Run a TensorRT engine written by `lowc export --target trt` with the interface of an onnxruntime session.

`EngineSession(path)` registers lowc's plugins, deserializes `model.engine` and offers `get_inputs()`,
`get_outputs()` (objects with `.name` and `.shape`, -1 for dynamic dimensions) and `run(output_names, feeds)` on
numpy arrays, so `onnx_run.empty_cache` and `onnx_run.decoder_step` drive prefill and KV-cache decode of an engine
exactly as they drive an onnxruntime session. Each `run` sets the input shapes, binds torch tensors on the GPU to
every I/O tensor (outputs sized by the execution context once the inputs are set) and enqueues the engine with
`execute_async_v3` on torch's current stream.

Untested against TensorRT (it cannot be installed where lowc is developed): the binding logic is tested with a
stand-in `tensorrt` module on CPU tensors (tests/test_tensorrt_aot.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import LowcError
from .tensorrt_engine import ENGINE_FILE, require_tensorrt
from .tensorrt_plugins import register_plugins

_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
                 "INT32": torch.int32, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}


@dataclass(frozen=True)
class TensorInfo:
    """An engine I/O tensor as onnxruntime describes its inputs and outputs."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


class EngineSession:
    """A deserialized lowc TensorRT engine driven like an onnxruntime InferenceSession."""

    def __init__(self, path: str | Path, device: str | torch.device = "cuda", trt=None):
        trt = trt or require_tensorrt()
        engine_file = Path(path) / ENGINE_FILE if Path(path).is_dir() else Path(path)
        if not engine_file.is_file():
            raise LowcError(f"{engine_file}: no TensorRT engine (write one with `lowc export ARTIFACT --target trt`)")
        register_plugins()
        self.device = torch.device(device)
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(engine_file.read_bytes())
        if self.engine is None:
            raise LowcError(f"{engine_file}: TensorRT could not deserialize the engine (built by another TensorRT "
                            "version or GPU?)")
        self.context = self.engine.create_execution_context()
        self._inputs, self._outputs = [], []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            info = TensorInfo(name, tuple(self.engine.get_tensor_shape(name)),
                              _TORCH_DTYPES[self.engine.get_tensor_dtype(name).name])
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self._inputs if is_input else self._outputs).append(info)

    def get_inputs(self) -> list[TensorInfo]:
        return list(self._inputs)

    def get_outputs(self) -> list[TensorInfo]:
        return list(self._outputs)

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Execute the engine on `feeds` (every input, numpy) and return the named outputs (all when None)."""
        missing = [t.name for t in self._inputs if t.name not in feeds]
        unknown = sorted(set(feeds) - {t.name for t in self._inputs})
        if missing or unknown:
            raise LowcError(f"engine inputs: missing {missing or 'none'}, unknown {unknown or 'none'}")
        bound = {}
        for info in self._inputs:
            tensor = torch.from_numpy(np.ascontiguousarray(feeds[info.name])).to(self.device, info.dtype)
            if not self.context.set_input_shape(info.name, tuple(tensor.shape)):
                raise LowcError(f"input {info.name}: shape {tuple(tensor.shape)} is outside the engine's "
                                "optimization profile")
            bound[info.name] = tensor
        for info in self._outputs:
            shape = tuple(self.context.get_tensor_shape(info.name))
            if any(d < 0 for d in shape):
                raise LowcError(f"output {info.name}: TensorRT left its shape {shape} unresolved")
            bound[info.name] = torch.empty(shape, dtype=info.dtype, device=self.device)
        for name, tensor in bound.items():
            self.context.set_tensor_address(name, tensor.data_ptr())
        stream = torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0
        if not self.context.execute_async_v3(stream):
            raise LowcError("TensorRT failed to enqueue the engine")
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        names = [t.name for t in self._outputs] if output_names is None else output_names
        return [bound[n].float().cpu().numpy() if bound[n].is_floating_point() else bound[n].cpu().numpy()
                for n in names]


__all__ = ["EngineSession", "TensorInfo"]
