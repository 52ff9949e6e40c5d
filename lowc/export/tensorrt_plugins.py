"""TensorRT plugins for lowc's ONNX ops, written to the `tensorrt.plugin` (quickly deployable plugins) API.

TensorRT's ONNX parser imports a node as a plugin when the node carries a `plugin_namespace` attribute and a plugin
`{plugin_namespace}::{op_type}` of version `plugin_version` is registered; otherwise it inlines the node's ONNX
local function. lowc's nodes carry `plugin_namespace="lowc"`, `plugin_version="1"` (onnx_ops.py), and this module
registers `lowc::Int6Gemm`, `lowc::BTCGemm`, `lowc::VNMGemm`, `lowc::VNMQGemm` and `lowc::SageAttention` under the
same names.

What is here and testable without TensorRT: the plugin records (name, namespace, version, inputs, attributes), the
shape functions as plain Python over any dimension type (ints here, `tensorrt.plugin.ShapeExpr` in TensorRT), and
`plugin_compute`, the computation the plugins' `impl` runs. What needs TensorRT: `register_plugins()`, which
imports `tensorrt.plugin` and registers descriptors and JIT implementations (`trtp.register` + `trtp.impl`). The
JIT implementation (`trtp.impl`) runs, on TensorRT's stream, lowc's runtime kernels where they compute the node's
scheme for fp16/bf16 inputs (the Triton W4/6/8 GEMMs; the CUDA C++ V:N:M SpMM on sparse tensor cores; Triton
SageAttention), each weight converted to its kernel's layout on the plugin's first call, and the torch reference
otherwise; it needs Python in the serving process.
Every plugin also has an AOT implementation (`trtp.aot_impl`, `tensorrt_aot.py`): one Triton kernel that reads the
node's tensors as they are (the GEMMs' packed weights; SageAttention's Q, K, V and bias, quantized inside the
kernel), compiled to PTX and embedded in the engine; `build_engine` picks it (`PREFER_AOT_PYTHON_PLUGINS`) unless
asked for JIT. lowc's CUDA C++ kernels (V:N:M SpMM, BTC GEMM) need weight layouts the ONNX nodes do not carry, so
no AOT plugin runs them (the JIT plugins convert the V:N:M weights on their first call; the BTC GEMM stays unused).
"""

# No `from __future__ import annotations` here: tensorrt.plugin reads the decorated functions' annotations as real
# types (TensorDesc, int, float) to build the plugin signatures, so they must not be postponed into strings.
from typing import List, Sequence, Tuple, Union

import torch

from ..compress.sparsity.vnm import VNMSpec
from ..kernels import reference
from ..scheme import ModuleScheme
from .onnx_ops import OPS, PLUGIN_NAMESPACE, PLUGIN_VERSION, SAGE_ATTENTION, LowcOp


def plugin_records(op_names: set[str] | Sequence[str], implementation: str = "aot") -> list[dict]:
    """The TensorRT plugins an exported model needs, as JSON-ready records (name, namespace, version, id, ...,
    and which implementation an engine built with `implementation` ("aot" or "jit") runs)."""
    from .tensorrt_aot import AOT_OPS

    records = []
    for name in sorted(op_names):
        op = OPS[name]
        records.append({"name": op.name, "namespace": PLUGIN_NAMESPACE, "version": PLUGIN_VERSION,
                        "id": op.plugin_id, "inputs": list(op.inputs),
                        "attributes": {a: t.__name__ for a, t in op.attributes},
                        "implementation": "aot" if implementation == "aot" and name in AOT_OPS else "jit"})
    return records


# ------------------------------------------------------------------------------------------------ shape functions
def gemm_output_shape(x: Sequence, weight: Sequence) -> list:
    """Y of a lowc GEMM: X's shape with the last dimension replaced by the weight's rows (qweight/values dim 0)."""
    if len(x) < 2 or len(weight) != 2:
        raise ValueError(f"a lowc GEMM takes X of rank >= 2 and a 2-D weight, got ranks {len(x)} and {len(weight)}")
    return [*x[:-1], weight[0]]


def attention_output_shape(q: Sequence, k: Sequence, v: Sequence) -> list:
    """Y of SageAttention: Q's shape [B, Hq, Sq, D]."""
    if not len(q) == len(k) == len(v) == 4:
        raise ValueError(f"SageAttention takes 4-D Q, K, V, got ranks {len(q)}, {len(k)}, {len(v)}")
    return list(q)


SHAPE_FUNCTIONS = {"Int6Gemm": lambda x, qweight, scales: gemm_output_shape(x, qweight),
                   "BTCGemm": lambda x, qweight, scales: gemm_output_shape(x, qweight),
                   "VNMGemm": lambda x, values, columns, positions: gemm_output_shape(x, values),
                   "VNMQGemm": lambda x, qweight, scales, columns, positions: gemm_output_shape(x, qweight),
                   "SageAttention": lambda q, k, v, bias: attention_output_shape(q, k, v)}


# ----------------------------------------------------------------------------------------------------- compute
def _scheme(op: str, shape: tuple[int, int], attrs: dict) -> ModuleScheme:
    """The scheme of a GEMM node's weight of `shape` (rows, input features) with attributes `attrs`."""
    if op == "Int6Gemm":
        return ModuleScheme(op, shape, None, 6, attrs["group"])
    if op == "BTCGemm":
        return ModuleScheme(op, shape, None, attrs["bits"], attrs["group"])
    vnm = VNMSpec(attrs["v"], 2, attrs["m"])
    if op == "VNMGemm":
        return ModuleScheme(op, shape, vnm, None)
    return ModuleScheme(op, shape, vnm, attrs["bits"], attrs["group"])


_RUNTIME_MODULES: dict[tuple, torch.nn.Module] = {}


def runtime_module(op: str, weights: Sequence[torch.Tensor], attrs: dict, in_features: int, dtype: torch.dtype):
    """lowc's runtime module (`PackedLinear`) for a GEMM plugin's weight tensors (of `in_features` columns), moved
    once into its fast kernel's layout for `dtype` inputs (Triton W4/6/8 GEMM, or the CUDA C++ sparse-tensor-core
    V:N:M SpMM), or None when no fast kernel computes this scheme (V:N:M without a CUDA build).

    Kept per weight addresses, shapes, attributes and dtype: an engine's weights are constants at fixed addresses
    for its lifetime, so each plugin instance converts its weight on its first call only. The converted copy lives
    beside TensorRT's (a second copy of each weight in GPU memory)."""
    from ..runtime.packed_linear import PackedLinear

    key = (op, tuple(sorted(attrs.items())), in_features, dtype,
           *((t.data_ptr(), tuple(t.shape), t.dtype) for t in weights))
    if key in _RUNTIME_MODULES:
        return _RUNTIME_MODULES[key]
    scheme = _scheme(op, (weights[0].shape[0], in_features), attrs)
    module = PackedLinear(scheme, dict(zip(OPS[op].inputs[1:], weights)))  # the node's inputs after X
    _RUNTIME_MODULES[key] = module if module.use_fast_kernel(dtype) else None
    return _RUNTIME_MODULES[key]


def plugin_compute(op: str, inputs: Sequence[torch.Tensor], attrs: dict, fast: bool | None = None) -> torch.Tensor:
    """What plugin `op` computes, in torch (the plugins' JIT implementation; the ONNX functions compute the same).

    With `fast` (default: for CUDA inputs) fp16/bf16 inputs run on lowc's runtime kernels where one computes the
    scheme (`runtime_module`; SageAttention on its Triton kernel), else on the torch reference."""
    fast = inputs[0].is_cuda if fast is None else fast
    half = inputs[0].dtype in (torch.float16, torch.bfloat16)
    if op == SAGE_ATTENTION.name:
        q, k, v, bias = inputs
        if fast and half and not bias.any():
            from ..kernels.sage_attention import sage_attention

            return sage_attention(q, k, v, causal=bool(attrs["causal"]), sm_scale=attrs["scale"])
        scores_bias = bias.float()
        group = q.shape[1] // k.shape[1]
        kr, vr = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
        scores = torch.matmul(q.float(), kr.transpose(-1, -2)) * attrs["scale"]
        if attrs["causal"]:
            sq, sk = q.shape[-2], k.shape[-2]
            visible = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
            scores = scores.masked_fill(~visible, float("-inf"))
        return torch.matmul(torch.softmax(scores + scores_bias, -1), vr).to(q.dtype)
    if op not in OPS:
        raise ValueError(f"unknown lowc op {op!r} (known: {', '.join(OPS)})")
    x, weights = inputs[0], inputs[1:]
    if fast and half:
        module = runtime_module(op, weights, attrs, x.shape[-1], x.dtype)
        if module is not None:
            return module(x)
    tensors = dict(zip(OPS[op].inputs[1:], weights))
    return reference.packed_linear(x, tensors, _scheme(op, (weights[0].shape[0], x.shape[-1]), attrs))


# ---------------------------------------------------------------------------------------------- registration
_REGISTERED = False


def register_plugins() -> list[str]:
    """Register every lowc plugin with TensorRT's plugin registry (idempotent); returns the plugin ids.

    Needs `tensorrt` (>= 10.9, for `tensorrt.plugin` with `aot_impl`) and torch with CUDA for the implementations.
    """
    global _REGISTERED
    from .tensorrt_engine import require_tensorrt

    require_tensorrt()
    if not _REGISTERED:
        _define_plugins()
        _REGISTERED = True
    return [op.plugin_id for op in OPS.values()]


_TRT_DTYPES = {"DataType.HALF": "float16", "DataType.BF16": "bfloat16", "DataType.FLOAT": "float32",
               "DataType.UINT8": "uint8", "DataType.INT8": "int8"}
_AUTOTUNE_TYPES = {"float16": "FP16", "bfloat16": "BF16", "float32": "FP32", "uint8": "UINT8", "int8": "INT8"}


def autotune_io_types(input_dtypes: Sequence[str]) -> str:
    """`AutoTuneCombination` io_types of an AOT plugin: its inputs' types as they are, the output taking X's."""
    return ",".join(_AUTOTUNE_TYPES[d] for d in (*input_dtypes, input_dtypes[0]))


def trt_dtype_name(dtype) -> str:
    """lowc's dtype name ("float16", "uint8", ...) of a TensorRT DataType."""
    name = _TRT_DTYPES.get(str(dtype))
    if name is None:
        raise ValueError(f"lowc's AOT plugins take {', '.join(_TRT_DTYPES.values())} tensors, got {dtype}")
    return name


def _define_plugins() -> None:
    import tensorrt.plugin as trtp

    from .tensorrt_aot import DEFAULT_TACTIC, TACTICS, aot_launch, compile_aot

    def aot(op: LowcOp, tensors, attrs, tactic: int):
        """kernel name, PTX, launch parameters and scalar arguments of `op`'s AOT kernel for these inputs."""
        shapes = [[t.shape_expr[i] for i in range(len(t.shape_expr))] for t in tensors]
        plan = aot_launch(op.name, shapes, attrs, cdiv=trtp.cdiv,
                          tactic=tactic if tactic in TACTICS else DEFAULT_TACTIC)
        kernel = compile_aot(plan, [trt_dtype_name(t.dtype) for t in tensors], _arch())
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y = plan.grid[:2]  # grid_z stays 1
        params.block_x = kernel.block
        params.shared_mem = kernel.shared
        scalars = trtp.SymIntExprs(len(plan.scalars))
        for i, s in enumerate(plan.scalars):  # shape expressions, or constant ints (a broadcast bias's 0 stride)
            scalars[i] = trtp.SymInt32(trtp.ShapeExpr(s) if isinstance(s, int) else s)
        return kernel.name, kernel.ptx, params, scalars

    def tune(*tensors):
        """The inputs' types as given, linear layouts, and the AOT kernels' tile tactics for TensorRT to time."""
        types = autotune_io_types([trt_dtype_name(t.dtype) for t in tensors])
        return [trtp.AutoTuneCombination(types, ",".join(["LINEAR"] * (len(tensors) + 1)), list(TACTICS))]

    def desc(op: LowcOp, *tensors):
        shape = SHAPE_FUNCTIONS[op.name](*(list(t.shape_expr) for t in tensors))
        return trtp.from_shape_expr(trtp.ShapeExprs.from_tuple(tuple(shape)), dtype=tensors[0].dtype)

    def run(op: LowcOp, tensors, attrs, outputs, stream) -> None:
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            args = [torch.as_tensor(t, device="cuda") for t in tensors]
            out = torch.as_tensor(outputs[0], device="cuda")
            out.copy_(plugin_compute(op.name, args, attrs).to(out.dtype))

    op = OPS["Int6Gemm"]

    @trtp.register(op.plugin_id)
    def _int6_desc(X: trtp.TensorDesc, qweight: trtp.TensorDesc, scales: trtp.TensorDesc,
                   group: int) -> trtp.TensorDesc:
        return desc(OPS["Int6Gemm"], X, qweight, scales)

    @trtp.impl(op.plugin_id)
    def _int6_impl(X: trtp.Tensor, qweight: trtp.Tensor, scales: trtp.Tensor, group: int,
                   outputs: tuple[trtp.Tensor], stream: int) -> None:
        run(OPS["Int6Gemm"], (X, qweight, scales), {"group": group}, outputs, stream)

    @trtp.aot_impl(op.plugin_id)
    def _int6_aot(X: trtp.TensorDesc, qweight: trtp.TensorDesc, scales: trtp.TensorDesc, group: int,
                  outputs: Tuple[trtp.TensorDesc], tactic: int) -> Tuple[
                      Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        return aot(OPS["Int6Gemm"], (X, qweight, scales), {"group": group}, tactic)

    @trtp.autotune(op.plugin_id)
    def _int6_tune(X: trtp.TensorDesc, qweight: trtp.TensorDesc, scales: trtp.TensorDesc,
                   outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return tune(X, qweight, scales)

    op = OPS["BTCGemm"]

    @trtp.register(op.plugin_id)
    def _btc_desc(X: trtp.TensorDesc, qweight: trtp.TensorDesc, scales: trtp.TensorDesc, bits: int,
                  group: int) -> trtp.TensorDesc:
        return desc(OPS["BTCGemm"], X, qweight, scales)

    @trtp.impl(op.plugin_id)
    def _btc_impl(X: trtp.Tensor, qweight: trtp.Tensor, scales: trtp.Tensor, bits: int, group: int,
                  outputs: tuple[trtp.Tensor], stream: int) -> None:
        run(OPS["BTCGemm"], (X, qweight, scales), {"bits": bits, "group": group}, outputs, stream)

    @trtp.aot_impl(op.plugin_id)
    def _btc_aot(X: trtp.TensorDesc, qweight: trtp.TensorDesc, scales: trtp.TensorDesc, bits: int, group: int,
                 outputs: Tuple[trtp.TensorDesc], tactic: int) -> Tuple[
                     Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        return aot(OPS["BTCGemm"], (X, qweight, scales), {"bits": bits, "group": group}, tactic)

    @trtp.autotune(op.plugin_id)
    def _btc_tune(X: trtp.TensorDesc, qweight: trtp.TensorDesc, scales: trtp.TensorDesc,
                  outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return tune(X, qweight, scales)

    op = OPS["VNMGemm"]

    @trtp.register(op.plugin_id)
    def _vnm_desc(X: trtp.TensorDesc, values: trtp.TensorDesc, columns: trtp.TensorDesc,
                  positions: trtp.TensorDesc, v: int, m: int) -> trtp.TensorDesc:
        return desc(OPS["VNMGemm"], X, values, columns, positions)

    @trtp.impl(op.plugin_id)
    def _vnm_impl(X: trtp.Tensor, values: trtp.Tensor, columns: trtp.Tensor, positions: trtp.Tensor, v: int,
                  m: int, outputs: tuple[trtp.Tensor], stream: int) -> None:
        run(OPS["VNMGemm"], (X, values, columns, positions), {"v": v, "m": m}, outputs, stream)

    @trtp.aot_impl(op.plugin_id)
    def _vnm_aot(X: trtp.TensorDesc, values: trtp.TensorDesc, columns: trtp.TensorDesc, positions: trtp.TensorDesc,
                 v: int, m: int, outputs: Tuple[trtp.TensorDesc], tactic: int) -> Tuple[
                     Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        return aot(OPS["VNMGemm"], (X, values, columns, positions), {"v": v, "m": m}, tactic)

    @trtp.autotune(op.plugin_id)
    def _vnm_tune(X: trtp.TensorDesc, values: trtp.TensorDesc, columns: trtp.TensorDesc,
                  positions: trtp.TensorDesc,
                  outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return tune(X, values, columns, positions)

    op = OPS["VNMQGemm"]

    @trtp.register(op.plugin_id)
    def _vnmq_desc(X: trtp.TensorDesc, qweight: trtp.TensorDesc, scales: trtp.TensorDesc,
                   columns: trtp.TensorDesc, positions: trtp.TensorDesc, bits: int, group: int, v: int,
                   m: int) -> trtp.TensorDesc:
        return desc(OPS["VNMQGemm"], X, qweight, scales, columns, positions)

    @trtp.impl(op.plugin_id)
    def _vnmq_impl(X: trtp.Tensor, qweight: trtp.Tensor, scales: trtp.Tensor, columns: trtp.Tensor,
                   positions: trtp.Tensor, bits: int, group: int, v: int, m: int, outputs: tuple[trtp.Tensor],
                   stream: int) -> None:
        run(OPS["VNMQGemm"], (X, qweight, scales, columns, positions),
            {"bits": bits, "group": group, "v": v, "m": m}, outputs, stream)

    @trtp.aot_impl(op.plugin_id)
    def _vnmq_aot(X: trtp.TensorDesc, qweight: trtp.TensorDesc, scales: trtp.TensorDesc, columns: trtp.TensorDesc,
                  positions: trtp.TensorDesc, bits: int, group: int, v: int, m: int,
                  outputs: Tuple[trtp.TensorDesc], tactic: int) -> Tuple[
                      Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        return aot(OPS["VNMQGemm"], (X, qweight, scales, columns, positions),
                   {"bits": bits, "group": group, "v": v, "m": m}, tactic)

    @trtp.autotune(op.plugin_id)
    def _vnmq_tune(X: trtp.TensorDesc, qweight: trtp.TensorDesc, scales: trtp.TensorDesc,
                   columns: trtp.TensorDesc, positions: trtp.TensorDesc,
                   outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return tune(X, qweight, scales, columns, positions)

    op = OPS["SageAttention"]

    @trtp.register(op.plugin_id)
    def _attn_desc(Q: trtp.TensorDesc, K: trtp.TensorDesc, V: trtp.TensorDesc, bias: trtp.TensorDesc,
                   causal: int, scale: float) -> trtp.TensorDesc:
        return desc(OPS["SageAttention"], Q, K, V, bias)

    @trtp.impl(op.plugin_id)
    def _attn_impl(Q: trtp.Tensor, K: trtp.Tensor, V: trtp.Tensor, bias: trtp.Tensor, causal: int, scale: float,
                   outputs: tuple[trtp.Tensor], stream: int) -> None:
        run(OPS["SageAttention"], (Q, K, V, bias), {"causal": causal, "scale": scale}, outputs, stream)

    @trtp.aot_impl(op.plugin_id)
    def _attn_aot(Q: trtp.TensorDesc, K: trtp.TensorDesc, V: trtp.TensorDesc, bias: trtp.TensorDesc, causal: int,
                  scale: float, outputs: Tuple[trtp.TensorDesc], tactic: int) -> Tuple[
                      Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        return aot(OPS["SageAttention"], (Q, K, V, bias), {"causal": causal, "scale": scale}, tactic)

    @trtp.autotune(op.plugin_id)
    def _attn_tune(Q: trtp.TensorDesc, K: trtp.TensorDesc, V: trtp.TensorDesc, bias: trtp.TensorDesc,
                   outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return tune(Q, K, V, bias)


def _arch() -> int:
    """The compute capability to compile AOT kernels for: the current GPU's, else sm_90."""
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return 10 * major + minor
    return 90
