"""Run an exported model with onnxruntime: sessions, and a decoder step that carries the KV cache.

Used by the tests and benchmarks/export_onnx.py; also a minimal example of how to drive the exported graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import LowcError


EXACT_SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "0"}


def session(path: str | Path, provider: str = "CPUExecutionProvider", optimize: bool = True, exact: bool = True,
            threads: int | None = None):
    """An onnxruntime InferenceSession on `provider`.

    optimize=False disables every graph optimization. With optimizations on, onnxruntime fuses the INT4/INT8
    `DequantizeLinear -> MatMul` pairs into `MatMulNBits`; by default it then quantizes the activations to int8
    (accuracy level 4, about 1e-2 relative error on logits). exact=True (default) sets accuracy level 0 so the fused
    kernels compute in float like the graph says (`EXACT_SESSION_CONFIG`), and on the CUDA EP turns TF32 off.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise LowcError("running an exported model needs onnxruntime: pip install onnxruntime "
                        "(onnxruntime-gpu for CUDA)") from None
    if provider not in ort.get_available_providers():
        raise LowcError(f"onnxruntime provider {provider} is not available here "
                        f"(available: {', '.join(ort.get_available_providers())})")
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if threads:
        options.intra_op_num_threads = threads
    if exact:
        for key, value in EXACT_SESSION_CONFIG.items():
            options.add_session_config_entry(key, value)
    model = str(Path(path) / "model.onnx") if Path(path).is_dir() else str(path)
    if exact and provider == "CUDAExecutionProvider":
        # the CUDA EP computes float32 MatMuls in TF32 by default (10-bit mantissa): about 1e-3 relative error
        return ort.InferenceSession(model, options, providers=[(provider, {"use_tf32": "0"})])
    return ort.InferenceSession(model, options, providers=[provider])


def empty_cache(sess, batch: int) -> dict[str, np.ndarray]:
    """Zero-length past_key_values inputs for a decoder session."""
    past = {}
    for value in sess.get_inputs():
        if value.name.startswith("past_key_values."):
            _, heads, _, head_dim = value.shape
            past[value.name] = np.zeros((batch, heads, 0, head_dim), dtype=np.float32)
    return past


def decoder_step(sess, input_ids: np.ndarray, past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One forward of the decoder graph: (logits [B, T, V], the cache with the T tokens appended)."""
    names = [o.name for o in sess.get_outputs()]
    outputs = sess.run(names, {"input_ids": input_ids.astype(np.int64), **past})
    result = dict(zip(names, outputs))
    present = {n.replace("present.", "past_key_values.", 1): v for n, v in result.items() if n.startswith("present.")}
    return result["logits"], present
