"""The ONNX graphs of lowc's models, written node by node from lowc's model code and an artifact's packed tensors.

Decoder (`LlamaForCausalLM`): one graph serves prefill and decode. Inputs `input_ids` [batch, sequence] and, per
layer, `past_key_values.{i}.key` / `.value` [batch, kv_heads, past_sequence, head_dim] (past_sequence may be 0);
outputs `logits` [batch, sequence, vocab] (float32) and `present.{i}.key` / `.value` with the new tokens appended.
Positions continue after the cache (RoPE angles are computed in the graph from the constant inverse frequencies).

Encoder (`BertModel`): inputs `input_ids`, `attention_mask`, `token_type_ids` [batch, sequence]; outputs
`last_hidden_state` [batch, sequence, hidden] and `sentence_embedding` [batch, hidden] (masked mean, as
`BertModel.embed`).

Everything computes in float32, as the lowc reference runtime does; dense tensors keep their stored dtype in the
file and are cast in the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx
import torch
from onnx import TensorProto, helper

from .. import __version__
from ..artifact import Artifact
from ..models.bert import BertConfig
from ..models.llama import LlamaConfig, RotaryEmbedding
from .onnx_builder import IR_VERSION, LOWC_DOMAIN, OPSET, Builder
from .onnx_linear import dense_linear, fallback_linear, lowc_ops_for, packed_linear, unsupported_reason
from .onnx_ops import OPS, SAGE_ATTENTION, function_proto, lowc_node

FLOAT = TensorProto.FLOAT


@dataclass
class OnnxExport:
    """An exported model and what it needs: the lowc ops (TensorRT plugins) it uses and the modules dequantized."""

    model: onnx.ModelProto
    lowc_ops: set[str] = field(default_factory=set)
    fallbacks: dict[str, str] = field(default_factory=dict)  # module -> why it was dequantized


class _Weights:
    """The artifact's tensors as graph initializers (each added once) and its Linears as nodes."""

    def __init__(self, art: Artifact, b: Builder, fallback: set[str]):
        self.art, self.b, self.fallback = art, b, fallback
        self.lowc_ops: set[str] = set()
        self._float: dict[str, str] = {}

    def float_tensor(self, name: str) -> str:
        """A dense tensor of the artifact in float32 (stored in its own dtype, cast in the graph)."""
        if name not in self._float:
            init = self.b.initializer(name, self.art.get(name))
            self._float[name] = self.b.cast(init, FLOAT, f"{name}_f")
        return self._float[name]

    def linear(self, x: str, module: str) -> str:
        scheme = self.art.schemes.get(module)
        if scheme is None:
            bias = self.float_tensor(f"{module}.bias") if f"{module}.bias" in self.art.weight_map else None
            return dense_linear(self.b, x, self.float_tensor(f"{module}.weight"), bias, module)
        tensors = self.art.module_tensors(module)
        if module in self.fallback:
            return fallback_linear(self.b, x, scheme, tensors)
        self.lowc_ops.update(lowc_ops_for(scheme))
        return packed_linear(self.b, x, scheme, tensors)


def _heads(b: Builder, x: str, heads: int, head_dim: int, hint: str) -> str:
    """[B, T, H*D] -> [B, H, T, D]."""
    x = b.op("Reshape", [x, b.const([0, 0, heads, head_dim])], f"{hint}.split")
    return b.op("Transpose", [x], f"{hint}.heads", perm=[0, 2, 1, 3])


def _merge_heads(b: Builder, x: str, width: int, hint: str) -> str:
    x = b.op("Transpose", [x], f"{hint}.tokens", perm=[0, 2, 1, 3])
    return b.op("Reshape", [x, b.const([0, 0, width])], f"{hint}.merged")


def _attention(b: Builder, w: _Weights, q: str, k: str, v: str, bias: str, causal: bool, head_dim: int,
               hint: str) -> str:
    w.lowc_ops.add(SAGE_ATTENTION.name)
    return lowc_node(b, SAGE_ATTENTION, [q, k, v, bias], hint, causal=int(causal), scale=head_dim ** -0.5)


# ------------------------------------------------------------------------------------------------------- Llama
def _rms_norm(b: Builder, x: str, weight: str, eps: float, hint: str) -> str:
    ms = b.op("ReduceMean", [b.op("Mul", [x, x], f"{hint}.sq"), b.const([-1])], f"{hint}.ms", keepdims=1)
    inv = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [ms, b.const(eps, torch.float32)], f"{hint}.ms_eps")],
                                   f"{hint}.rms")], f"{hint}.inv_rms")
    return b.op("Mul", [weight, b.op("Mul", [x, inv], f"{hint}.normed")], f"{hint}.out")


def _rope(b: Builder, x: str, cos: str, sin: str, hint: str) -> str:
    x1, x2 = b.op("Split", [x], f"{hint}.half", outputs=2, axis=-1, num_outputs=2)
    rotated = b.op("Concat", [b.op("Neg", [x2], f"{hint}.neg"), x1], f"{hint}.rot", axis=-1)
    return b.op("Add", [b.op("Mul", [x, cos], f"{hint}.xcos"), b.op("Mul", [rotated, sin], f"{hint}.xsin")],
                f"{hint}.rope")


def _llama(art: Artifact, b: Builder, w: _Weights) -> tuple[list, list]:
    c = LlamaConfig.from_hf(art.config)
    hd, nh, nkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
    ids = b.reserve("input_ids")
    inputs = [helper.make_tensor_value_info(ids, TensorProto.INT64, ["batch", "sequence"])]
    outputs = []
    pasts = []
    for i in range(c.num_hidden_layers):
        pair = []
        for kind in ("key", "value"):
            name = b.reserve(f"past_key_values.{i}.{kind}")
            inputs.append(helper.make_tensor_value_info(name, FLOAT, ["batch", nkv, "past_sequence", hd]))
            pair.append(name)
        pasts.append(pair)

    embed = w.float_tensor("model.embed_tokens.weight")
    x = b.op("Gather", [embed, ids], "embeddings", axis=0)
    # positions start after the cached tokens
    past_len = b.op("Squeeze", [b.op("Shape", [pasts[0][0]], "past_len_1d", start=2, end=3), b.const([0])], "past_len")
    seq = b.op("Squeeze", [b.op("Shape", [ids], "seq_1d", start=1, end=2), b.const([0])], "seq_len")
    positions = b.op("Range", [past_len, b.op("Add", [past_len, seq], "end_pos"), b.const(1)], "positions")
    inv_freq = b.initializer("rope.inv_freq", RotaryEmbedding(c).inv_freq().reshape(1, -1))
    freqs = b.op("Mul", [b.op("Unsqueeze", [b.cast(positions, FLOAT, "positions_f"), b.const([1])], "pos_col"),
                         inv_freq], "freqs")
    angles = b.op("Concat", [freqs, freqs], "angles", axis=-1)
    cos, sin = b.op("Cos", [angles], "cos"), b.op("Sin", [angles], "sin")
    no_bias = b.initializer("attention.no_bias", torch.zeros(1, 1, 1, 1))

    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"
        h = _rms_norm(b, x, w.float_tensor(f"{p}.input_layernorm.weight"), c.rms_norm_eps, f"{p}.input_layernorm")
        q = _rope(b, _heads(b, w.linear(h, f"{p}.self_attn.q_proj"), nh, hd, f"{p}.q"), cos, sin, f"{p}.q")
        k = _rope(b, _heads(b, w.linear(h, f"{p}.self_attn.k_proj"), nkv, hd, f"{p}.k"), cos, sin, f"{p}.k")
        v = _heads(b, w.linear(h, f"{p}.self_attn.v_proj"), nkv, hd, f"{p}.v")
        present = []
        for kind, new, past in (("key", k, pasts[i][0]), ("value", v, pasts[i][1])):
            name = b.reserve(f"present.{i}.{kind}")
            b.op("Concat", [past, new], out_names=[name], axis=2)
            outputs.append(helper.make_tensor_value_info(name, FLOAT, ["batch", nkv, "total_sequence", hd]))
            present.append(name)
        y = _attention(b, w, q, present[0], present[1], no_bias, True, hd, f"{p}.self_attn")
        x = b.op("Add", [x, w.linear(_merge_heads(b, y, nh * hd, f"{p}.attn"), f"{p}.self_attn.o_proj")],
                 f"{p}.attn_residual")
        h = _rms_norm(b, x, w.float_tensor(f"{p}.post_attention_layernorm.weight"), c.rms_norm_eps,
                      f"{p}.post_attention_layernorm")
        gate = w.linear(h, f"{p}.mlp.gate_proj")
        act = b.op("Mul", [gate, b.op("Sigmoid", [gate], f"{p}.mlp.sigmoid")], f"{p}.mlp.silu")
        up = b.op("Mul", [act, w.linear(h, f"{p}.mlp.up_proj")], f"{p}.mlp.gated")
        x = b.op("Add", [x, w.linear(up, f"{p}.mlp.down_proj")], f"{p}.mlp_residual")

    x = _rms_norm(b, x, w.float_tensor("model.norm.weight"), c.rms_norm_eps, "model.norm")
    logits = b.reserve("logits")
    if "lm_head" in art.schemes or "lm_head.weight" in art.weight_map:
        b.op("Identity", [w.linear(x, "lm_head")], out_names=[logits])
    else:  # tied to the embedding
        b.op("MatMul", [x, b.op("Transpose", [embed], "lm_head.weight_t", perm=[1, 0])], out_names=[logits])
    outputs.insert(0, helper.make_tensor_value_info(logits, FLOAT, ["batch", "sequence", c.vocab_size]))
    return inputs, outputs


# -------------------------------------------------------------------------------------------------------- BERT
def _layer_norm(b: Builder, w: _Weights, x: str, prefix: str, eps: float) -> str:
    return b.op("LayerNormalization", [x, w.float_tensor(f"{prefix}.weight"), w.float_tensor(f"{prefix}.bias")],
                prefix, axis=-1, epsilon=eps)


def _bert(art: Artifact, b: Builder, w: _Weights) -> tuple[list, list]:
    c = BertConfig.from_hf(art.config)
    names = [b.reserve(n) for n in ("input_ids", "attention_mask", "token_type_ids")]
    ids, mask, types = names
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"]) for n in names]
    seq = b.op("Squeeze", [b.op("Shape", [ids], "seq_1d", start=1, end=2), b.const([0])], "seq_len")
    positions = b.op("Range", [b.const(0), seq, b.const(1)], "positions")
    x = b.op("Add", [b.op("Gather", [w.float_tensor("embeddings.word_embeddings.weight"), ids], "word"),
                     b.op("Gather", [w.float_tensor("embeddings.token_type_embeddings.weight"), types], "type")],
             "word_type")
    x = b.op("Add", [x, b.op("Gather", [w.float_tensor("embeddings.position_embeddings.weight"), positions], "pos")],
             "embedded")
    x = _layer_norm(b, w, x, "embeddings.LayerNorm", c.layer_norm_eps)
    padded = b.op("Equal", [mask, b.const(0)], "padded")
    bias = b.op("Where", [padded, b.const(torch.finfo(torch.float32).min, torch.float32),
                          b.const(0.0, torch.float32)], "mask_bias_2d")
    bias = b.op("Unsqueeze", [bias, b.const([1, 2])], "mask_bias")
    hd, nh, hidden = c.head_dim, c.num_attention_heads, c.hidden_size
    for i in range(c.num_hidden_layers):
        p = f"encoder.layer.{i}"
        a = f"{p}.attention.self"
        q, k, v = (_heads(b, w.linear(x, f"{a}.{n}"), nh, hd, f"{a}.{n}") for n in ("query", "key", "value"))
        y = _merge_heads(b, _attention(b, w, q, k, v, bias, False, hd, a), hidden, a)
        y = b.op("Add", [w.linear(y, f"{p}.attention.output.dense"), x], f"{p}.attention.residual")
        x = _layer_norm(b, w, y, f"{p}.attention.output.LayerNorm", c.layer_norm_eps)
        h = b.op("Gelu", [w.linear(x, f"{p}.intermediate.dense")], f"{p}.intermediate.gelu")
        y = b.op("Add", [w.linear(h, f"{p}.output.dense"), x], f"{p}.output.residual")
        x = _layer_norm(b, w, y, f"{p}.output.LayerNorm", c.layer_norm_eps)
    hidden_out = b.reserve("last_hidden_state")
    b.op("Identity", [x], out_names=[hidden_out])
    m = b.op("Unsqueeze", [b.cast(mask, FLOAT, "mask_f"), b.const([-1])], "mask_3d")
    total = b.op("ReduceSum", [b.op("Mul", [x, m], "masked"), b.const([1])], "sum_hidden", keepdims=0)
    count = b.op("Max", [b.op("ReduceSum", [m, b.const([1])], "count", keepdims=0), b.const(1e-9, torch.float32)],
                 "count_clamped")
    pooled = b.reserve("sentence_embedding")
    b.op("Div", [total, count], out_names=[pooled])
    outputs = [helper.make_tensor_value_info(hidden_out, FLOAT, ["batch", "sequence", hidden]),
               helper.make_tensor_value_info(pooled, FLOAT, ["batch", hidden])]
    return inputs, outputs


GRAPHS = {"LlamaForCausalLM": _llama, "BertModel": _bert}


def unsupported_modules(art: Artifact) -> dict[str, str]:
    """Module -> why the ONNX export cannot express it as stored."""
    return {name: reason for name, s in art.schemes.items() if (reason := unsupported_reason(s)) is not None}


def build_onnx(art: Artifact, fallback: set[str] = frozenset(), opset: int = OPSET) -> OnnxExport:
    """The ONNX model of an artifact; modules named in `fallback` are stored as dequantized float32 weights."""
    if art.architecture.name not in GRAPHS:
        raise ValueError(f"no ONNX graph for {art.architecture.name}")
    b = Builder()
    w = _Weights(art, b, set(fallback))
    inputs, outputs = GRAPHS[art.architecture.name](art, b, w)
    graph = helper.make_graph(b.nodes, f"lowc_{art.architecture.name}", inputs, outputs, b.initializers)
    functions = [function_proto(OPS[name], opset) for name in sorted(w.lowc_ops)]
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid(LOWC_DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets, functions=functions, ir_version=IR_VERSION,
                              producer_name="lowc", producer_version=__version__,
                              doc_string=f"lowc export of {art.path.name} ({art.architecture.name})")
    helper.set_model_props(model, {"lowc.architecture": art.architecture.name, "lowc.kind": art.kind,
                                   "lowc.artifact_format_version": str(art.manifest.get("format_version")),
                                   "lowc.lowc_ops": ",".join(sorted(w.lowc_ops)),
                                   "lowc.fallback_modules": ",".join(sorted(fallback))})
    return OnnxExport(model, set(w.lowc_ops), {m: unsupported_reason(art.schemes[m]) or "" for m in fallback})
