"""The onnxruntime MatMulNBits peer of the low-bit GEMM benchmark: 4-bit block-quantized weights served by
onnxruntime's `com.microsoft.MatMulNBits` (the op onnxruntime-gpu ships for INT4 LLM weights).

lowc's symmetric INT4 codes c in [-8, 7] with one fp16 scale per `block` input columns are exactly MatMulNBits'
unsigned nibbles c + 8 with its default zero point 8, so both run the same weights. To time decode the way
kernels_gemm times lowc (every weight read from DRAM, no launch overhead), the graph holds `copies` MatMulNBits
nodes, each with its own copy of the weight and all reading the same input, and runs under onnxruntime's CUDA
graph with inputs and outputs bound to torch tensors; time per product = time per run / copies.
"""

from __future__ import annotations

import numpy as np
import torch

BITS = 4
ZERO_POINT = 8  # MatMulNBits' default zero point for 4-bit weights without a zero_points input


def pack_matmulnbits(codes: torch.Tensor, block: int) -> np.ndarray:
    """int codes [N, K] in [-8, 7] -> MatMulNBits' B, uint8 [N, ceil(K/block), block/2]: nibbles c + 8, the even
    column in the low nibble, K padded with zero codes to whole blocks."""
    n, k = codes.shape
    if int(codes.min()) < -ZERO_POINT or int(codes.max()) > ZERO_POINT - 1:
        raise ValueError("4-bit codes must lie in [-8, 7]")
    blocks = -(-k // block)
    padded = torch.nn.functional.pad(codes.to(torch.int16), (0, blocks * block - k))
    u = (padded + ZERO_POINT).to(torch.uint8).cpu().reshape(n, blocks, block // 2, 2)
    return (u[..., 0] | (u[..., 1] << 4)).numpy()


def matmulnbits_model(b: np.ndarray, scales: np.ndarray, k: int, copies: int = 1,
                      dtype: np.dtype = np.float16):
    """An ONNX model: input A [M, K]; outputs Y0..Y{copies-1} [M, N] = A @ dequant(B_i)^T, one MatMulNBits node
    per copy of the weight (B uint8 [N, blocks, block/2], scales [N, blocks])."""
    from onnx import TensorProto, helper, numpy_helper

    n, blocks, half = b.shape
    elem = TensorProto.FLOAT16 if np.dtype(dtype) == np.float16 else TensorProto.FLOAT
    nodes, inits, outputs = [], [], []
    for i in range(copies):
        inits += [numpy_helper.from_array(b, f"B{i}"),
                  numpy_helper.from_array(scales.astype(dtype).reshape(n * blocks), f"S{i}")]
        nodes.append(helper.make_node("MatMulNBits", ["A", f"B{i}", f"S{i}"], [f"Y{i}"], domain="com.microsoft",
                                      K=k, N=n, bits=BITS, block_size=2 * half))
        outputs.append(helper.make_tensor_value_info(f"Y{i}", elem, ["M", n]))
    graph = helper.make_graph(nodes, "matmulnbits_peer", [helper.make_tensor_value_info("A", elem, ["M", k])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model


def cuda_available() -> bool:
    """Whether onnxruntime here has its CUDA execution provider (the onnxruntime-gpu wheel)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


class MatMulNBitsPeer:
    """One onnxruntime session over `matmulnbits_model`, run on torch tensors (CUDA EP with its CUDA graph on a GPU,
    the CPU EP otherwise)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, block: int, m: int, copies: int = 1):
        import onnxruntime as ort

        self.cuda = codes.is_cuda
        np_dtype = np.float16 if self.cuda else np.float32
        self.dtype = torch.float16 if self.cuda else torch.float32
        n, k = codes.shape
        model = matmulnbits_model(pack_matmulnbits(codes, block), scales.float().cpu().numpy(), k, copies, np_dtype)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        device = codes.device
        index = (device.index or 0) if self.cuda else 0
        providers = ([("CUDAExecutionProvider", {"enable_cuda_graph": "1", "device_id": str(index)})] if self.cuda
                     else ["CPUExecutionProvider"])
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        if self.cuda and "CUDAExecutionProvider" not in self.session.get_providers():
            raise RuntimeError("onnxruntime has no CUDA execution provider here (onnxruntime-gpu is not installed)")
        self.x = torch.zeros(m, k, dtype=self.dtype, device=device)
        self.ys = [torch.empty(m, n, dtype=self.dtype, device=device) for _ in range(copies)]
        self.binding = self.session.io_binding()
        kind = "cuda" if self.cuda else "cpu"
        self.binding.bind_input("A", kind, index, np_dtype, list(self.x.shape), self.x.data_ptr())
        for i, y in enumerate(self.ys):
            self.binding.bind_output(f"Y{i}", kind, index, np_dtype, list(y.shape), y.data_ptr())

    def run(self) -> None:
        """One run of the graph (every copy once) on the bound input."""
        self.session.run_with_iobinding(self.binding)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> [M, N] through the first copy (x is copied into the bound input)."""
        self.x.copy_(x)
        self.run()
        if self.cuda:
            torch.cuda.synchronize()
        return self.ys[0].clone()


__all__ = ["pack_matmulnbits", "matmulnbits_model", "cuda_available", "MatMulNBitsPeer"]
