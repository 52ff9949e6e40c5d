"""lowc's own ONNX operators: their contract (inputs, attributes, TensorRT plugin identity) and their ONNX functions.

Every lowc op is a node in domain `lowc` carrying the string attributes `plugin_namespace` and `plugin_version`,
which is how TensorRT's ONNX parser finds a registered plugin of the same name (`tensorrt_plugins.py`). The model
also holds an ONNX local function of the same domain and name whose body is an exact decomposition into standard
ops (opset 21), so onnxruntime — or TensorRT without the plugin — runs the same file.

| op | inputs | attributes | computes |
| --- | --- | --- | --- |
| Int6Gemm | X [..., K], qweight uint8 [R, ceil(K/4)*3], scales fp16 [R, ceil(K/G)] | group | X Wᵀ, W the INT6 weight |
| BTCGemm | X [..., K], qweight uint8 [R, P] (INT2: 4 codes a byte, INT3: 8 codes in 3 bytes), scales fp16 | bits, group | X Wᵀ, W the INT2/INT3 weight (lowc's BTC GEMM) |
| VNMGemm | X, values [R, C], columns uint8 [Rp/V, Kb, 4], positions uint8 [R, ceil(C/4)] | v, m | X Wᵀ, W the V:N:M weight |
| VNMQGemm | X, qweight [R, P], scales fp16, columns, positions | bits, group, v, m | same, values INT2/3/4/6/8 |
| SageAttention | Q [B, Hq, Sq, D], K, V [B, Hkv, Sk, D], bias (additive, broadcast to [B, Hq, Sq, Sk]) | causal, scale | softmax(QKᵀ·scale + bias (+ causal mask)) V |

Tensor layouts are docs/FORMAT.md's, unchanged. The causal mask is bottom-right aligned (query i sees keys up to
i + Sk − Sq), as with a KV cache. The SageAttention function is exact attention; a TensorRT plugin implementing it
with SageAttention's INT8/FP8 arithmetic approximates it (see docs/EXPORT.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import torch
from onnx import TensorProto, helper

from .onnx_builder import LOWC_DOMAIN, OPSET, Builder

PLUGIN_NAMESPACE = "lowc"
PLUGIN_VERSION = "1"
PLUGIN_ATTRIBUTES = ("plugin_namespace", "plugin_version")


@dataclass(frozen=True)
class LowcOp:
    """The ONNX contract of one lowc op; TensorRT plugins are registered from the same record."""

    name: str
    inputs: tuple[str, ...]
    attributes: tuple[tuple[str, type], ...]  # (name, int | float), the kernel's attributes in node order
    doc: str

    @property
    def plugin_id(self) -> str:
        return f"{PLUGIN_NAMESPACE}::{self.name}"


INT6_GEMM = LowcOp("Int6Gemm", ("X", "qweight", "scales"), (("group", int),),
                   "Y = X Wᵀ with W the per-group INT6 weight (4 codes in 3 bytes, docs/FORMAT.md)")
BTC_GEMM = LowcOp("BTCGemm", ("X", "qweight", "scales"), (("bits", int), ("group", int)),
                  "Y = X Wᵀ with W a per-group INT2/INT3 weight (little-endian bit fields, docs/FORMAT.md); the "
                  "plugin's kernel is lowc's binary-tensor-core GEMM")
VNM_GEMM = LowcOp("VNMGemm", ("X", "values", "columns", "positions"), (("v", int), ("m", int)),
                  "Y = X Wᵀ with W the V:N:M sparse weight given by its kept values")
VNM_QGEMM = LowcOp("VNMQGemm", ("X", "qweight", "scales", "columns", "positions"),
                   (("bits", int), ("group", int), ("v", int), ("m", int)),
                   "Y = X Wᵀ with W the V:N:M sparse weight whose kept values are INT2..INT8 codes")
SAGE_ATTENTION = LowcOp("SageAttention", ("Q", "K", "V", "bias"), (("causal", int), ("scale", float)),
                        "softmax(Q Kᵀ·scale + bias, causal bottom-right mask if causal) V; GQA by head groups")
OPS: dict[str, LowcOp] = {op.name: op for op in (INT6_GEMM, BTC_GEMM, VNM_GEMM, VNM_QGEMM, SAGE_ATTENTION)}


def lowc_node(b: Builder, op: LowcOp, inputs: list[str], hint: str, **attrs) -> str:
    """Add a node of a lowc op with its kernel attributes and the plugin identity attributes."""
    wanted = [name for name, _ in op.attributes]
    if sorted(attrs) != sorted(wanted):
        raise ValueError(f"{op.name} takes attributes {wanted}, got {sorted(attrs)}")
    return b.op(op.name, inputs, hint, domain=LOWC_DOMAIN, plugin_namespace=PLUGIN_NAMESPACE,
                plugin_version=PLUGIN_VERSION, **attrs)


# ---------------------------------------------------------------------------------------------- function bodies
def _scalar(b: Builder, one_element: str) -> str:
    return b.op("Squeeze", [one_element, b.const([0])], "scalar")


def _unpack_codes(b: Builder, packed: str, count: str, bits: str, signed: bool) -> str:
    """Packed little-endian bit fields -> float codes [R, count].

    Code j of a row occupies bits [j*bits, (j+1)*bits) of the row's bytes read as one little-endian bit string,
    which is the layout of lowc's INT8/INT6/INT4 codes and of the 2-bit V:N:M positions. `count` is an int64
    scalar, `bits` an int64 scalar; signed codes are two's complement.
    """
    u32 = TensorProto.UINT32
    byte = b.op("BitwiseAnd", [b.cast(packed, TensorProto.INT32), b.const(255, torch.int32)], "bytes")
    byte = b.cast(b.op("Pad", [byte, b.const([0, 0, 0, 1])], "bytes_padded"), u32, "bytes_u32")
    j = b.op("Range", [b.const(0), count, b.const(1)], "code_index")
    bit = b.op("Mul", [j, bits], "bit_offset")
    first = b.op("Div", [bit, b.const(8)], "first_byte")
    shift = b.cast(b.op("Mod", [bit, b.const(8)], "bit_shift"), u32, "bit_shift_u32")
    lo = b.op("Gather", [byte, first], "lo", axis=1)
    hi = b.op("Gather", [byte, b.op("Add", [first, b.const(1)], "second_byte")], "hi", axis=1)
    word = b.op("BitwiseOr", [lo, b.op("BitShift", [hi, _u32(b, 8)], "hi8", direction="LEFT")], "word")
    one = _u32(b, 1)
    mask = b.op("Sub", [b.op("BitShift", [one, b.cast(bits, u32, "bits_u32")], "pow2", direction="LEFT"), one],
                "mask")
    code = b.op("BitwiseAnd", [b.op("BitShift", [word, shift], "shifted", direction="RIGHT"), mask], "ucode")
    code = b.cast(code, TensorProto.FLOAT, "ucode_f")
    if signed:
        full = b.op("Add", [b.cast(mask, TensorProto.FLOAT, "mask_f"), b.const(1.0, torch.float32)], "full")
        half = b.op("Div", [full, b.const(2.0, torch.float32)], "half")
        negative = b.cast(b.op("GreaterOrEqual", [code, half], "is_negative"), TensorProto.FLOAT, "negative_f")
        code = b.op("Sub", [code, b.op("Mul", [full, negative], "wrap")], "code")
    return code


def _u32(b: Builder, value: int) -> str:
    return b.cast(b.const(value, torch.int32), TensorProto.UINT32, f"u32_{value}")


def _dequantize(b: Builder, qweight: str, scales: str, count: str, count_1d: str, bits: str, group: str) -> str:
    """Codes times their group's scale: float [R, count] (fp16 scales widened exactly to float32)."""
    codes = _unpack_codes(b, qweight, count, bits, signed=True)
    s = b.op("Unsqueeze", [b.cast(scales, TensorProto.FLOAT, "scales_f"), b.const([2])], "scales_3d")
    shape = b.op("Concat", [b.op("Shape", [scales], "scales_shape"), b.op("Reshape", [group, b.const([1])], "g1")],
                 "expand_shape", axis=0)
    s = b.op("Reshape", [b.op("Expand", [s, shape], "scales_rep"), b.const([0, -1])], "scales_cols")
    s = b.op("Slice", [s, b.const([0]), count_1d, b.const([1])], "scales_exact")
    return b.op("Mul", [codes, s], "weight")


def _vnm_dense(b: Builder, values: str, columns: str, positions: str, v: str, m: str, k_1d: str) -> str:
    """Canonical V:N:M storage with float values [R, C] -> the dense float weight [R, K]."""
    rows = b.op("Shape", [values], "rows", start=0, end=1)
    kb = b.op("Shape", [columns], "kb", start=1, end=2)
    count_1d = b.op("Mul", [kb, b.const([2])], "kept_1d")
    pos = _unpack_codes(b, positions, _scalar(b, count_1d), b.const(2), signed=False)
    pos = b.op("Reshape", [b.cast(pos, TensorProto.INT64, "pos_i64"), b.const([0, -1, 2])], "pos")
    cols = b.op("Unsqueeze", [b.cast(columns, TensorProto.INT64, "cols_i64"), b.const([1])], "cols_4d")
    cshape = b.op("Shape", [columns], "cols_shape")
    expand = b.op("Concat", [b.op("Slice", [cshape, b.const([0]), b.const([1])], "row_blocks"),
                             b.op("Reshape", [v, b.const([1])], "v1"),
                             b.op("Slice", [cshape, b.const([1]), b.const([3])], "kb4")], "cols_expand", axis=0)
    cols = b.op("Expand", [cols, expand], "cols_rep")
    cols = b.op("Reshape", [cols, b.op("Concat", [b.const([-1]), kb, b.const([4])], "cols_rows_shape", axis=0)],
                "cols_rows")
    cols = b.op("Slice", [cols, b.const([0]), rows, b.const([0])], "cols_r")
    within = b.op("GatherElements", [cols, pos], "within", axis=2)
    base = b.op("Mul", [b.op("Range", [b.const(0), _scalar(b, kb), b.const(1)], "blocks"), m], "block_start")
    index = b.op("Add", [within, b.op("Reshape", [base, b.const([1, -1, 1])], "block_start_3d")], "col_index")
    index = b.op("Reshape", [index, b.const([0, -1])], "index")
    width = b.op("Mul", [kb, b.op("Reshape", [m, b.const([1])], "m1")], "padded_k")
    zeros = b.op("ConstantOfShape", [b.op("Concat", [rows, width], "dense_shape", axis=0)], "zeros",
                 value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
    dense = b.op("ScatterElements", [zeros, index, values], "dense_padded", axis=1)
    return b.op("Slice", [dense, b.const([0]), k_1d, b.const([1])], "dense")


def _matmul_t(b: Builder, x: str, weight: str) -> str:
    """X Wᵀ in X's dtype."""
    w = b.op("CastLike", [b.op("Transpose", [weight], "weight_t", perm=[1, 0]), x], "weight_x")
    return b.op("MatMul", [x, w], "Y", out_names=["Y"])


def _int_gemm_body(b: Builder, bits: int | None = None) -> None:
    """X Wᵀ for a dense integer weight of `bits` (None: the op's `bits` attribute)."""
    k_1d = b.op("Shape", ["X"], "k", start=-1)
    width = b.const(bits) if bits is not None else b.const_from_attr("bits")
    w = _dequantize(b, "qweight", "scales", _scalar(b, k_1d), k_1d, width, b.const_from_attr("group"))
    _matmul_t(b, "X", w)


def _vnm_gemm_body(b: Builder) -> None:
    k_1d = b.op("Shape", ["X"], "k", start=-1)
    values = b.cast("values", TensorProto.FLOAT, "values_f")
    w = _vnm_dense(b, values, "columns", "positions", b.const_from_attr("v"), b.const_from_attr("m"), k_1d)
    _matmul_t(b, "X", w)


def _vnm_qgemm_body(b: Builder) -> None:
    k_1d = b.op("Shape", ["X"], "k", start=-1)
    kept_1d = b.op("Mul", [b.op("Shape", ["columns"], "kb", start=1, end=2), b.const([2])], "kept")
    values = _dequantize(b, "qweight", "scales", _scalar(b, kept_1d), kept_1d, b.const_from_attr("bits"),
                         b.const_from_attr("group"))
    w = _vnm_dense(b, values, "columns", "positions", b.const_from_attr("v"), b.const_from_attr("m"), k_1d)
    _matmul_t(b, "X", w)


def _sage_attention_body(b: Builder) -> None:
    hq = b.op("Shape", ["Q"], "hq", start=1, end=2)
    sq = b.op("Shape", ["Q"], "sq", start=2, end=3)
    kshape = b.op("Shape", ["K"], "kshape")
    hkv = b.op("Slice", [kshape, b.const([1]), b.const([2])], "hkv")
    sk = b.op("Slice", [kshape, b.const([2]), b.const([3])], "sk")
    group = b.op("Div", [hq, hkv], "group")
    full = b.op("Concat", [b.op("Slice", [kshape, b.const([0]), b.const([2])], "b_hkv"), group,
                           b.op("Slice", [kshape, b.const([2]), b.const([4])], "sk_d")], "rep_shape", axis=0)
    merged = b.op("Concat", [b.const([0, -1]), b.op("Slice", [kshape, b.const([2]), b.const([4])], "sk_d2")],
                  "merged_shape", axis=0)

    def repeat(x: str, hint: str) -> str:
        x = b.op("Expand", [b.op("Unsqueeze", [x, b.const([2])], f"{hint}_5d"), full], f"{hint}_rep")
        return b.op("Reshape", [x, merged], f"{hint}_heads")

    k, v = repeat("K", "k"), repeat("V", "v")
    scores = b.op("MatMul", ["Q", b.op("Transpose", [k], "k_t", perm=[0, 1, 3, 2])], "qk")
    scores = b.op("Mul", [scores, b.op("CastLike", [b.const_from_attr("scale", "float"), scores], "scale_x")],
                  "scores")
    qi = b.op("Reshape", [b.op("Range", [b.const(0), _scalar(b, sq), b.const(1)], "q_index"), b.const([-1, 1])],
              "q_col")
    kj = b.op("Range", [b.const(0), _scalar(b, sk), b.const(1)], "k_index")
    last = b.op("Add", [qi, b.op("Sub", [sk, sq], "offset")], "last_visible")
    future = b.op("And", [b.op("Greater", [kj, last], "future"),
                          b.cast(b.const_from_attr("causal"), TensorProto.BOOL, "causal_b")], "masked")
    neg_inf = b.op("CastLike", [b.const(float("-inf"), torch.float32), scores], "neg_inf")
    scores = b.op("Where", [future, neg_inf, scores], "scores_causal")
    scores = b.op("Add", [scores, b.op("CastLike", ["bias", scores], "bias_x")], "scores_biased")
    probs = b.op("Softmax", [scores], "probs", axis=-1)
    b.op("MatMul", [probs, v], "Y", out_names=["Y"])


_BODIES = {"Int6Gemm": lambda b: _int_gemm_body(b, 6), "BTCGemm": _int_gemm_body, "VNMGemm": _vnm_gemm_body,
           "VNMQGemm": _vnm_qgemm_body, "SageAttention": _sage_attention_body}


def function_proto(op: LowcOp, opset: int = OPSET) -> onnx.FunctionProto:
    """The ONNX local function (domain `lowc`, the op's name) that decomposes `op` into standard ops (opset >= 21)."""
    b = Builder(prefix="")
    for name in (*op.inputs, "Y"):
        b.reserve(name)
    _BODIES[op.name](b)
    attrs = [name for name, _ in op.attributes] + list(PLUGIN_ATTRIBUTES)
    return helper.make_function(LOWC_DOMAIN, op.name, list(op.inputs), ["Y"], b.nodes,
                                [helper.make_opsetid("", opset)], attributes=attrs, doc_string=op.doc)
