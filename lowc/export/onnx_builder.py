"""A small builder for ONNX graphs and function bodies: unique names, nodes, initializers and constants.

lowc writes its graphs node by node with `onnx.helper` (no tracing), so the opset, IR version, initializer dtypes
and every node are exactly what this package decides. Tensors are converted without going through float copies:
bfloat16 and float16 keep their raw bytes, INT4 codes are packed two per byte as ONNX specifies.
"""

from __future__ import annotations

from typing import Callable

import onnx
import torch
from onnx import TensorProto, helper

OPSET = 21  # DequantizeLinear with block_size; onnxruntime >= 1.20 and TensorRT 10 read it
IR_VERSION = 10  # onnxruntime >= 1.16 loads IR 10 (functions with overloads, INT4)
LOWC_DOMAIN = "lowc"

TORCH_TO_ONNX = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
                 torch.bfloat16: TensorProto.BFLOAT16, torch.int8: TensorProto.INT8, torch.uint8: TensorProto.UINT8,
                 torch.int32: TensorProto.INT32, torch.int64: TensorProto.INT64, torch.bool: TensorProto.BOOL,
                 torch.float64: TensorProto.DOUBLE}


def tensor_proto(name: str, t: torch.Tensor) -> TensorProto:
    """A TensorProto holding `t` bit for bit (raw little-endian bytes; bf16 and fp16 are not widened)."""
    t = t.detach().cpu().contiguous()
    if t.dtype not in TORCH_TO_ONNX:
        raise ValueError(f"no ONNX type for torch dtype {t.dtype}")
    proto = TensorProto()
    proto.name = name
    proto.data_type = TORCH_TO_ONNX[t.dtype]
    proto.dims.extend(t.shape)
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    proto.raw_data = raw.numpy().tobytes()
    return proto


def int4_tensor_proto(name: str, codes: torch.Tensor) -> TensorProto:
    """Signed 4-bit codes (any integer dtype, values in [-8, 7]) as an ONNX INT4 tensor of the same shape.

    ONNX packs INT4 over the flattened tensor, element 2i in the low nibble of byte i, element 2i+1 in the high one.
    """
    flat = codes.detach().cpu().reshape(-1).to(torch.int32) & 0xF
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    packed = (flat[0::2] | (flat[1::2] << 4)).to(torch.uint8)
    proto = TensorProto()
    proto.name = name
    proto.data_type = TensorProto.INT4
    proto.dims.extend(codes.shape)
    proto.raw_data = packed.numpy().tobytes()
    return proto


class Builder:
    """Collects nodes (and, for a graph, initializers) under unique tensor names."""

    def __init__(self, prefix: str = ""):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._names: set[str] = set()
        self._consts: dict[tuple, str] = {}
        self._shared: dict[str, str] = {}
        self.prefix = prefix

    def name(self, hint: str) -> str:
        """A tensor name not used before, derived from `hint`."""
        base = f"{self.prefix}{hint}"
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def reserve(self, name: str) -> str:
        """Claim an exact name (graph inputs and outputs)."""
        if name in self._names:
            raise ValueError(f"tensor name {name} used twice")
        self._names.add(name)
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, outputs: int = 1,
           domain: str = "", out_names: list[str] | None = None, **attrs) -> str | list[str]:
        """Add one node; returns its output name (or the list of names when `outputs` > 1)."""
        names = out_names or [self.name(f"{hint or op_type}") for _ in range(outputs)]
        node = helper.make_node(op_type, inputs, names, name=self.name(f"n_{hint or op_type}"), domain=domain,
                                **attrs)
        self.nodes.append(node)
        return names[0] if outputs == 1 and out_names is None else names

    def initializer(self, hint: str, t: torch.Tensor) -> str:
        name = self.name(hint)
        self.initializers.append(tensor_proto(name, t))
        return name

    def shared(self, key: str, make: Callable[[], str]) -> str:
        """A tensor built once per `key` by `make` (which adds its initializers and nodes) and reused after: a
        constant many modules share. The first use must come before the others in the graph, as built."""
        if key not in self._shared:
            self._shared[key] = make()
        return self._shared[key]

    def add_initializer(self, proto: TensorProto) -> str:
        """Add a ready TensorProto whose name was taken with `name()`."""
        if proto.name not in self._names:
            raise ValueError(f"initializer {proto.name}: take its name with Builder.name() first")
        self.initializers.append(proto)
        return proto.name

    def const(self, value, dtype: torch.dtype = torch.int64) -> str:
        """A small constant (a Constant node, reused by value) of the given dtype; lists give 1-D tensors."""
        key = (repr(value), str(dtype))
        if key not in self._consts:
            t = torch.tensor(value, dtype=dtype)
            name = self.name("const")
            self.nodes.append(helper.make_node("Constant", [], [name], name=self.name("n_const"),
                                               value=tensor_proto(name + "_value", t)))
            self._consts[key] = name
        return self._consts[key]

    def const_from_attr(self, attr: str, kind: str = "int") -> str:
        """Inside a function body: a scalar Constant whose value is the calling node's attribute `attr`."""
        key = ("attr", attr, kind)
        if key not in self._consts:
            name = self.name(attr)
            node = helper.make_node("Constant", [], [name], name=self.name(f"n_{attr}"))
            ref = helper.make_attribute_ref("value_int" if kind == "int" else "value_float",
                                            onnx.AttributeProto.INT if kind == "int" else onnx.AttributeProto.FLOAT)
            ref.ref_attr_name = attr
            node.attribute.append(ref)
            self.nodes.append(node)
            self._consts[key] = name
        return self._consts[key]

    # -- helpers ---------------------------------------------------------------------------------------------------
    def cast(self, x: str, to: int, hint: str = "cast") -> str:
        return self.op("Cast", [x], hint, to=to)

