"""One Linear of an artifact as ONNX nodes: standard ops where ONNX expresses the format, lowc ops elsewhere.

| scheme | ONNX |
| --- | --- |
| dense float (not compressed) | initializer in its stored dtype, Cast, MatMul |
| INT8 / INT4, dense | `DequantizeLinear(block_size=group, axis=0)` of an INT8 / INT4 initializer [K, R] (the transposed codes, same bytes count), float32 scales, MatMul |
| INT6, dense | `lowc::Int6Gemm` on the artifact's packed bytes and fp16 scales |
| INT2 / INT3, dense | `lowc::BTCGemm` on the artifact's packed bytes and fp16 scales |
| V:N:M (float values) | `lowc::VNMGemm` on the artifact's values, columns and positions |
| V:N:M + INT2/3/4/6/8 | `lowc::VNMQGemm` on the artifact's packed codes, scales, columns and positions |
| `abits` (A8/A6) | per-token symmetric quantize-dequantize of the input in standard ops (after `Div` by the module's `smooth` factors when it has them), then the above |
| `rotate` (Hadamard block b) | first, the input times the block-diagonal rotation: `Reshape` to [..., K/b, b], `MatMul` by the b×b input-side matrix (one int8 ±1 initializer per block size shared by all modules, `Cast`, `Mul` by c₁), `Reshape` back |
| `slorb_group` (SLoRB branch) | plus, in standard ops on the unquantized input: `Slice` + `Reshape` + `ReduceSum` per group of input channels (a short last group summed on its own), `Cast` of the stored `slorb` [R, G] to float32, `Transpose`, `MatMul`, `Add` |

A module whose scheme has no form here (`unsupported_reason`; every scheme lowc writes today has one) is refused, or
with `allow_fallback` stored as its dequantized float32 weight and reported.
"""

from __future__ import annotations

import torch
from onnx import TensorProto

from ..kernels import hadamard, reference
from ..kernels.packing import unpack_int
from ..scheme import ModuleScheme
from .onnx_builder import Builder, int4_tensor_proto
from .onnx_ops import BTC_GEMM, INT6_GEMM, VNM_GEMM, VNM_QGEMM, lowc_node

EXPRESSIBLE_BITS = (2, 3, 4, 6, 8)


def unsupported_reason(scheme: ModuleScheme) -> str | None:
    """Why this module cannot be exported as it is stored (None when it can)."""
    if scheme.bits is not None and scheme.bits not in EXPRESSIBLE_BITS:
        return f"INT{scheme.bits} weights have no ONNX form in lowc"
    return None


def lowc_ops_for(scheme: ModuleScheme) -> list[str]:
    """The lowc ops (TensorRT plugins) a module's export uses."""
    if scheme.vnm is not None:
        return [VNM_GEMM.name if scheme.bits is None else VNM_QGEMM.name]
    if scheme.bits in (2, 3):
        return [BTC_GEMM.name]
    return [INT6_GEMM.name] if scheme.bits == 6 else []


def dense_linear(b: Builder, x: str, weight: str, bias: str | None = None, hint: str = "linear") -> str:
    """x Wᵀ (+ bias) for a float32 weight W [R, K] and bias [R]."""
    w = b.op("Transpose", [weight], f"{hint}.weight_t", perm=[1, 0])
    y = b.op("MatMul", [x, w], f"{hint}.matmul")
    return y if bias is None else b.op("Add", [y, bias], f"{hint}.out")


def _rotate_inputs(b: Builder, x: str, scheme: ModuleScheme) -> str:
    """x [..., K] rotated as `hadamard.rotate_inputs` does (float32), for a scheme with `rotate`."""
    block, hint = scheme.rotate, f"{scheme.name}.rotate"

    def matrix() -> str:  # the ±1 matrix as int8 (a quarter of the float bytes) times c₁, a power of two: exact
        signs = b.initializer(f"hadamard_{block}", hadamard.sylvester(block).to(torch.int8))
        return b.op("Mul", [b.cast(signs, TensorProto.FLOAT, f"hadamard_{block}.float"),
                            b.const(hadamard.input_factor(block), torch.float32)], f"hadamard_{block}.scaled")

    h = b.shared(f"hadamard_{block}", matrix)
    shape = b.op("Shape", [x], f"{hint}.shape")
    leading = b.op("Slice", [shape, b.const([0]), b.const([-1])], f"{hint}.lead")
    blocks = b.op("Reshape", [x, b.op("Concat", [leading, b.const([scheme.shape[1] // block, block])],
                                      f"{hint}.blocks_shape", axis=0)], f"{hint}.blocks")
    rotated = b.op("MatMul", [blocks, h], f"{hint}.matmul")
    return b.op("Reshape", [rotated, shape], f"{hint}.out")


def _quantize_inputs(b: Builder, x: str, scheme: ModuleScheme, tensors: dict[str, torch.Tensor]) -> str:
    """The module's A8/A6 input quantization, after its per-channel `smooth` division when it has one."""
    if scheme.smooth:
        x = b.op("Div", [x, b.initializer(f"{scheme.name}.smooth", tensors["smooth"])], f"{scheme.name}.smoothed")
    return _quantize_activations(b, x, scheme.abits, scheme.name)


def _quantize_activations(b: Builder, x: str, bits: int, hint: str) -> str:
    """Per-token symmetric fake quantization, exactly as `reference.quantize_activations` rounds (half away from 0)."""
    qmax = float(2 ** (bits - 1) - 1)
    amax = b.op("ReduceMax", [b.op("Abs", [x], f"{hint}.abs"), b.const([-1])], f"{hint}.amax", keepdims=1)
    positive = b.op("Greater", [amax, b.const(0.0, torch.float32)], f"{hint}.nonzero")
    scale = b.op("Where", [positive, b.op("Div", [amax, b.const(qmax, torch.float32)], f"{hint}.amax_q"),
                           b.const(1.0, torch.float32)], f"{hint}.a_scale")
    v = b.op("Div", [x, scale], f"{hint}.scaled")
    rounded = b.op("Floor", [b.op("Add", [b.op("Abs", [v], f"{hint}.vabs"), b.const(0.5, torch.float32)],
                                  f"{hint}.half_up")], f"{hint}.floor")
    q = b.op("Mul", [b.op("Sign", [v], f"{hint}.sign"), rounded], f"{hint}.round")
    q = b.op("Clip", [q, b.const(-qmax, torch.float32), b.const(qmax, torch.float32)], f"{hint}.codes")
    return b.op("Mul", [q, scale], f"{hint}.x_q")


def group_sums(b: Builder, x: str, in_features: int, group: int, hint: str) -> str:
    """Sums of `group` consecutive channels of x's last axis [..., K] -> [..., ceil(K / group)], as
    `reference.group_sums` computes them (any rank: the leading shape is read from x)."""
    full, rest = divmod(in_features, group)
    leading = b.op("Slice", [b.op("Shape", [x], f"{hint}.shape"), b.const([0]), b.const([-1])], f"{hint}.lead")
    parts = []
    if full:
        body = x if not rest else b.op("Slice", [x, b.const([0]), b.const([full * group]), b.const([-1])],
                                        f"{hint}.full")
        shape = b.op("Concat", [leading, b.const([full, group])], f"{hint}.grouped_shape", axis=0)
        grouped = b.op("Reshape", [body, shape], f"{hint}.grouped")
        parts.append(b.op("ReduceSum", [grouped, b.const([-1])], f"{hint}.sums", keepdims=0))
    if rest:
        tail = b.op("Slice", [x, b.const([full * group]), b.const([in_features]), b.const([-1])], f"{hint}.tail")
        parts.append(b.op("ReduceSum", [tail, b.const([-1])], f"{hint}.tail_sum", keepdims=1))
    return parts[0] if len(parts) == 1 else b.op("Concat", parts, f"{hint}.group_sums", axis=-1)


def _slorb_branch(b: Builder, x: str, y: str, scheme: ModuleScheme, tensors: dict[str, torch.Tensor]) -> str:
    """y + group_sums(x, slorb_group) Sᵀ: the module's SLoRB branch on its unquantized input x (float32)."""
    name = scheme.name
    sums = group_sums(b, x, scheme.shape[1], scheme.slorb_group, f"{name}.slorb")
    weight = b.cast(b.initializer(f"{name}.slorb", tensors["slorb"]), TensorProto.FLOAT, f"{name}.slorb_f")
    return b.op("Add", [y, dense_linear(b, sums, weight, hint=f"{name}.slorb")], f"{name}.with_slorb")


def packed_linear(b: Builder, x: str, scheme: ModuleScheme, tensors: dict[str, torch.Tensor]) -> str:
    """Emit y = x Wᵀ (+ b) (+ SLoRB) for a compressed module from its artifact tensors; returns y's name (float32)."""
    name = scheme.name
    if scheme.rotate:
        x = _rotate_inputs(b, x, scheme)
    x_in = x
    if scheme.abits is not None:
        x = _quantize_inputs(b, x, scheme, tensors)
    if scheme.vnm is not None:
        pattern = [b.initializer(f"{name}.columns", tensors["columns"]),
                   b.initializer(f"{name}.positions", tensors["positions"])]
        if scheme.bits is None:
            y = lowc_node(b, VNM_GEMM, [x, b.initializer(f"{name}.values", tensors["values"]), *pattern], name,
                          v=scheme.vnm.v, m=scheme.vnm.m)
        else:
            y = lowc_node(b, VNM_QGEMM, [x, b.initializer(f"{name}.qweight", tensors["qweight"]),
                                         b.initializer(f"{name}.scales", tensors["scales"]), *pattern], name,
                          bits=scheme.bits, group=scheme.group, v=scheme.vnm.v, m=scheme.vnm.m)
    elif scheme.bits == 6:
        y = lowc_node(b, INT6_GEMM, [x, b.initializer(f"{name}.qweight", tensors["qweight"]),
                                     b.initializer(f"{name}.scales", tensors["scales"])], name, group=scheme.group)
    elif scheme.bits in (2, 3):
        y = lowc_node(b, BTC_GEMM, [x, b.initializer(f"{name}.qweight", tensors["qweight"]),
                                    b.initializer(f"{name}.scales", tensors["scales"])], name,
                      bits=scheme.bits, group=scheme.group)
    elif scheme.bits in (4, 8):
        y = _dequantize_linear(b, x, scheme, tensors)
    else:
        raise ValueError(f"{name}: {unsupported_reason(scheme)}")
    if "bias" in tensors:
        bias = b.cast(b.initializer(f"{name}.bias", tensors["bias"]), TensorProto.FLOAT, f"{name}.bias_f")
        y = b.op("Add", [y, bias], f"{name}.out")
    if scheme.slorb_group is not None:
        y = _slorb_branch(b, x_in, y, scheme, tensors)
    return y


def _dequantize_linear(b: Builder, x: str, scheme: ModuleScheme, tensors: dict[str, torch.Tensor]) -> str:
    """INT8/INT4 as the standard weight-only QDQ pattern: DequantizeLinear(W_q [K, R], scales [G, R]) -> MatMul."""
    name, (rows, cols) = scheme.name, scheme.shape
    codes = unpack_int(tensors["qweight"], scheme.bits, cols).t().contiguous()  # [K, R]
    if scheme.bits == 8:
        w = b.initializer(f"{name}.qweight", codes.to(torch.int8))
    else:
        w = b.add_initializer(int4_tensor_proto(b.name(f"{name}.qweight"), codes))
    scales = b.initializer(f"{name}.scales", tensors["scales"].float().t().contiguous())  # fp16 -> fp32 is exact
    weight = b.op("DequantizeLinear", [w, scales], f"{name}.weight", axis=0, block_size=scheme.group)
    return b.op("MatMul", [x, weight], f"{name}.matmul")


def fallback_linear(b: Builder, x: str, scheme: ModuleScheme, tensors: dict[str, torch.Tensor]) -> str:
    """A module the target cannot express, computed from its dequantized float32 weight (exact, but larger)."""
    weight = b.initializer(f"{scheme.name}.weight", reference.dense_weight(tensors, scheme))
    if scheme.rotate:
        x = _rotate_inputs(b, x, scheme)
    x_in = x
    if scheme.abits is not None:
        x = _quantize_inputs(b, x, scheme, tensors)
    bias = None
    if "bias" in tensors:
        bias = b.cast(b.initializer(f"{scheme.name}.bias", tensors["bias"]), TensorProto.FLOAT, f"{scheme.name}.bias_f")
    y = dense_linear(b, x, weight, bias, scheme.name)
    return y if scheme.slorb_group is None else _slorb_branch(b, x_in, y, scheme, tensors)
