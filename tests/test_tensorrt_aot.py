"""The AOT TensorRT plugin kernels (export/tensorrt_aot.py, kernels/canonical_gemm.py, kernels/sage_single.py):
correct against the plugins' torch computation in Triton's interpreter (the GEMMs to rounding, SageAttention within
the INT8 accuracy bounds of the attention issue), compiled to PTX whose entry takes exactly TensorRT's AOT argument
list, with launch grids and scalars that are expressions of the input shapes; the engine's plugin preference flags."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("onnx")
from test_export_onnx import _op_cases  # noqa: E402

from lowc.errors import UsageError  # noqa: E402
from lowc.export.onnx_ops import OPS  # noqa: E402
from lowc.export.tensorrt_aot import (AOT_OPS, TACTICS, _strip_hidden_params, aot_launch,  # noqa: E402
                                      compile_aot, run_triton)
from lowc.kernels.sage_single import sage_single  # noqa: E402
from lowc.export.tensorrt_engine import network_flags  # noqa: E402
from lowc.export.tensorrt_plugins import (autotune_io_types, plugin_compute, plugin_records,  # noqa: E402
                                          runtime_module)
from lowc.kernels import reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: Triton's interpreter (conftest turns it on)
AOT_CASES = [c for c in _op_cases() if c[0] in AOT_OPS]
GEMM_CASES = [c for c in AOT_CASES if c[0] != "SageAttention"]


def _inputs(case):
    _, feeds, consts, _ = case
    return [t.to(DEVICE) for t in (*feeds.values(), *consts.values())]


@pytest.mark.parametrize("tactic", TACTICS)
@pytest.mark.parametrize("case", GEMM_CASES, ids=lambda c: f"{c[0]}-{c[3]}")
def test_aot_kernel_matches_plugin_compute(case, tactic):
    op, _, _, attrs = case
    inputs = _inputs(case)
    launch = aot_launch(op, [list(t.shape) for t in inputs], attrs, tactic=tactic)
    want = plugin_compute(op, inputs, attrs)
    out = torch.full_like(want, float("nan"))
    run_triton(launch, inputs, out)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-4)


def _attention_cases():
    """(Q, K, V, bias, attrs): GQA + causal decode-like rows against a longer cache at head dim 96 (padded to 128),
    a key-padding bias per batch, and the decoder's [1, 1, 1, 1] zero bias on a square causal block; K carries large
    per-channel offsets (what smoothing removes) in all of them."""
    g = torch.Generator().manual_seed(7)

    def qkv(b, hq, hkv, sq, sk, d):
        q = torch.randn(b, hq, sq, d, generator=g)
        k = torch.randn(b, hkv, sk, d, generator=g) + 8 * torch.randn(d, generator=g)
        return q, k, torch.randn(b, hkv, sk, d, generator=g)

    yield (*qkv(1, 4, 2, 5, 70, 96), torch.zeros(1, 1, 1, 1), {"causal": 1, "scale": 96 ** -0.5})
    q, k, v = qkv(2, 2, 2, 9, 40, 32)
    pad = torch.zeros(2, 1, 1, 40)
    pad[1, ..., 29:] = torch.finfo(torch.float32).min
    yield q, k, v, pad, {"causal": 0, "scale": 32 ** -0.5}
    yield (*qkv(1, 2, 1, 33, 33, 64), torch.zeros(1, 1, 1, 1), {"causal": 1, "scale": 0.125})


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])  # bf16 arithmetic is wrong in the interpreter
@pytest.mark.parametrize("tactic", TACTICS)
@pytest.mark.parametrize("index", range(3))
def test_aot_attention_matches_fp32_attention(index, tactic, dtype):
    """The one-kernel SageAttention, launched as the AOT plugin is, within the attention issue's accuracy bounds
    (cosine >= 0.9995, relative L1 <= 0.02) of the plugins' fp32 computation, and equal to `sage_single`."""
    q, k, v, bias, attrs = list(_attention_cases())[index]
    q, k, v, bias = q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype), bias.to(DEVICE)
    launch = aot_launch("SageAttention", [list(t.shape) for t in (q, k, v, bias)], attrs, tactic=tactic)
    out = torch.full_like(q, float("nan"))
    run_triton(launch, [q, k, v, bias], out)
    want = plugin_compute("SageAttention", [q.float(), k.float(), v.float(), bias], attrs)
    cosine = torch.nn.functional.cosine_similarity(out.float().flatten(), want.flatten(), 0)
    rel_l1 = (out.float() - want).abs().sum() / want.abs().sum()
    assert cosine >= 0.9995 and rel_l1 <= 0.02, (float(cosine), float(rel_l1))
    const = dict(launch.constexprs)
    direct = sage_single(q, k, v, bias, causal=bool(attrs["causal"]), sm_scale=attrs["scale"],
                         block_m=const["BLOCK_M"], block_n=const["BLOCK_N"])
    torch.testing.assert_close(direct, out, rtol=0, atol=0)


def test_aot_attention_smoothing_is_what_keeps_it_accurate():
    """The same INT8 scheme (Q per token, K per block of 64 keys) without K's mean removed loses several times more
    accuracy on K with channel offsets: the kernel's accuracy above comes from the smoothing, not from easy inputs."""
    q, k, v, bias, attrs = (t.to(DEVICE) if torch.is_tensor(t) else t for t in next(_attention_cases()))
    want = plugin_compute("SageAttention", [q, k, v, bias], attrs, fast=False)

    def int8(x, amax):
        scale = amax / 127
        return (x / scale).round() * scale

    q8 = int8(q, q.abs().amax(-1, keepdim=True))
    k8 = torch.cat([int8(blk, blk.abs().amax((-1, -2), keepdim=True)) for blk in k.split(64, 2)], 2)
    scores = q8 @ k8.repeat_interleave(2, 1).transpose(-1, -2) * attrs["scale"]
    visible = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=DEVICE).tril(k.shape[2] - q.shape[2])
    unsmoothed = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) @ v.repeat_interleave(2, 1)
    unsmoothed_l1 = (unsmoothed - want).abs().sum() / want.abs().sum()
    launch = aot_launch("SageAttention", [list(t.shape) for t in (q, k, v, bias)], attrs)
    out = torch.empty_like(q)
    run_triton(launch, [q, k, v, bias], out)
    kernel_l1 = (out - want).abs().sum() / want.abs().sum()
    assert kernel_l1 * 3 < unsmoothed_l1, (float(kernel_l1), float(unsmoothed_l1))


@pytest.mark.parametrize("op", AOT_OPS)
def test_kernel_signature_is_inputs_scalars_output(op):
    case = next(c for c in AOT_CASES if c[0] == op)
    launch = aot_launch(op, [list(t.shape) for t in _inputs(case)], case[3])
    fn = getattr(launch.kernel, "fn", launch.kernel)  # the Python function under Triton's wrapper
    params = [p for p in inspect.signature(fn).parameters if p not in dict(launch.constexprs)]
    assert len(params) == len(OPS[op].inputs) + len(launch.scalars) + 1
    assert params[-1] == "y_ptr" and all(p.endswith("_ptr") for p in params[:len(OPS[op].inputs)])
    assert not any(p.endswith("_ptr") for p in params[len(OPS[op].inputs):-1])


@pytest.mark.parametrize("op,bits", [("Int6Gemm", 6), ("BTCGemm", 2), ("BTCGemm", 3)])
def test_jit_plugins_run_on_the_runtime_kernels(op, bits, monkeypatch):
    """With fast=True (CUDA inputs in TensorRT) a GEMM node's weight goes once into the Triton GEMM's layout (INT2 /
    INT3 codes widened to INT4) and is computed there, not by the reference, within bf16 rounding of it; the same
    weight tensors reuse that module and other tensors get their own; float32 inputs stay on the reference."""
    _, feeds, consts, attrs = next(c for c in GEMM_CASES if c[0] == op and c[3].get("bits", 6) == bits)
    x, weights = feeds["X"].to(DEVICE, torch.bfloat16), [t.to(DEVICE) for t in consts.values()]
    want = plugin_compute(op, [x, *weights], attrs, fast=False)
    with monkeypatch.context() as patch:
        patch.setattr(reference, "packed_linear", lambda *a: pytest.fail("took the reference path"))
        got = plugin_compute(op, [x, *weights], attrs, fast=True)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert float((got.float() - want.float()).norm() / want.float().norm()) < 1e-2
    module = runtime_module(op, weights, attrs, x.shape[-1], x.dtype)
    assert module.kernel == "wa16" and runtime_module(op, weights, attrs, x.shape[-1], x.dtype) is module
    assert runtime_module(op, [w.clone() for w in weights], attrs, x.shape[-1], x.dtype) is not module
    x32 = feeds["X"].to(DEVICE, torch.float32)
    torch.testing.assert_close(plugin_compute(op, [x32, *weights], attrs, fast=True),
                               plugin_compute(op, [x32, *weights], attrs, fast=False))


class Sym:
    """A stand-in for TensorRT's shape expressions: records the arithmetic as text."""

    def __init__(self, text):
        self.text = str(text)

    def __mul__(self, other):
        return Sym(f"({self.text}*{getattr(other, 'text', other)})")

    def __repr__(self):
        return self.text


def test_launch_is_built_from_shape_expressions():
    x, q, s = [Sym("B"), Sym("S"), Sym("K")], [Sym("N"), Sym("P")], [Sym("N"), Sym("G")]
    launch = aot_launch("Int6Gemm", [x, q, s], {"group": 128}, cdiv=lambda a, b: Sym(f"cdiv({a},{b})"))
    assert [repr(g) for g in launch.grid[:2]] == ["cdiv((B*S),64)", "cdiv(N,64)"]  # the default, prefill tiles
    assert [repr(v) for v in launch.scalars] == ["(B*S)", "N", "K", "P", "G"]  # M, N, K, row bytes, groups
    assert dict(launch.constexprs)["BITS"] == 6
    with pytest.raises(ValueError, match="no AOT kernel"):
        aot_launch("Softmax", [x], {})
    decode = aot_launch("Int6Gemm", [x, q, s], {"group": 128}, cdiv=lambda a, b: Sym(f"cdiv({a},{b})"), tactic=1)
    assert [repr(g) for g in decode.grid[:2]] == ["cdiv((B*S),16)", "cdiv(N,16)"]
    with pytest.raises(ValueError, match="unknown AOT tactic"):
        aot_launch("Int6Gemm", [x, q, s], {"group": 128}, tactic=0)
    with pytest.raises(ValueError, match="multiple of 16"):
        aot_launch("VNMGemm", [[4, 64], [8, 26], [1, 13, 4], [8, 7]], {"v": 8, "m": 5})


class Dim(Sym):
    """A stand-in for a TensorRT shape expression that is a build-time constant."""

    def __init__(self, value):
        super().__init__(value)
        self.is_constant, self.value = True, value

    def constant_value(self):
        return self.value


def test_attention_launch_is_built_from_shape_expressions():
    """Grid and scalars from Q's and K's dims; a broadcast bias dim gives stride 0, a per-key bias stride 1 and a
    per-batch one the key count; the head dim must be a build-time constant."""
    b, h, hkv, sq, sk = Sym("B"), Sym("H"), Sym("G"), Sym("S"), Sym("T")
    q, kv = [b, h, sq, Dim(128)], [b, hkv, sk, Dim(128)]
    cdiv = lambda a, n: Sym(f"cdiv({a},{n})")  # noqa: E731
    launch = aot_launch("SageAttention", [q, kv, kv, [1, 1, 1, 1]], {"causal": 1, "scale": 0.1}, cdiv=cdiv)
    assert [repr(g) for g in launch.grid[:2]] == ["cdiv(S,64)", "(B*H)"]
    assert [repr(v) for v in launch.scalars] == ["S", "T", "H", "G", "0", "0"]
    const = dict(launch.constexprs)
    assert (const["HEAD_DIM"], const["BLOCK_D"], const["CAUSAL"], const["SCALE"]) == (128, 128, True, 0.1)
    padded = aot_launch("SageAttention", [q, kv, kv, [b, Dim(1), 1, sk]], {"causal": 0, "scale": 0.1}, cdiv=cdiv,
                        tactic=1)
    assert [repr(v) for v in padded.scalars[4:]] == ["T", "1"] and dict(padded.constexprs)["BLOCK_M"] == 16
    per_batch = aot_launch("SageAttention", [q, kv, kv, [b, 1, 1, Dim(1)]], {"causal": 0, "scale": 0.1}, cdiv=cdiv)
    assert [repr(v) for v in per_batch.scalars[4:]] == ["1", "0"]
    with pytest.raises(ValueError, match="head dim must be known"):
        aot_launch("SageAttention", [[b, h, sq, Sym("D")], kv, kv, [1, 1, 1, 1]], {"causal": 0, "scale": 0.1})
    with pytest.raises(ValueError, match=r"bias of shape \[B or 1, 1, 1, Sk or 1\]"):
        aot_launch("SageAttention", [q, kv, kv, [b, h, sq, sk]], {"causal": 0, "scale": 0.1})
    with pytest.raises(ValueError, match="up to 256"):
        aot_launch("SageAttention", [[1, 1, 1, 512]] * 3 + [[1, 1, 1, 1]], {"causal": 0, "scale": 0.1})


@pytest.mark.parametrize("op", ["Int6Gemm", "VNMGemm", "VNMQGemm", "SageAttention"])
def test_ptx_entry_takes_tensorrt_arguments(op):
    """Compiled for sm_90 (in a process without the interpreter): Triton's hidden scratch pointers are gone and the
    entry declares 64-bit pointers for the inputs and the output and 32-bit scalars in between."""
    case = next(c for c in AOT_CASES if c[0] == op)
    inputs = _inputs(case)
    launch = aot_launch(op, [list(t.shape) for t in inputs], case[3])
    half = 3 if op == "SageAttention" else 1  # Q, K, V (the bias stays float32) or X in fp16
    kernel = compile_aot(launch, ["float16"] * half + [str(t.dtype) for t in inputs[half:]], arch=90)
    n_in = len(OPS[op].inputs)
    assert kernel.params == (".u64",) * n_in + (".u32",) * len(launch.scalars) + (".u64",)
    assert f".entry {kernel.name}(" in kernel.ptx and ".target sm_90" in kernel.ptx
    assert kernel.block == launch.num_warps * 32 and kernel.shared >= 0


def test_hidden_parameters_are_only_dropped_when_unused():
    ptx = (".visible .entry k(\n\t.param .u64 k_param_0,\n\t.param .u32 k_param_1,\n\t.param .u64 k_param_2\n)\n"
           "{\n\tld.param.u64 %rd1, [k_param_0];\n\tret;\n}\n")
    stripped, types = _strip_hidden_params(ptx, "k", 2)
    assert types == (".u64", ".u32") and "k_param_2" not in stripped and "k_param_1" in stripped
    with pytest.raises(RuntimeError, match="hidden parameter k_param_0"):
        _strip_hidden_params(ptx, "k", 0)
    with pytest.raises(RuntimeError, match="no .entry"):
        _strip_hidden_params(ptx, "other", 2)


def test_engine_plugin_preference_and_records():
    trt = SimpleNamespace(NetworkDefinitionCreationFlag=SimpleNamespace(PREFER_AOT_PYTHON_PLUGINS=4,
                                                                       PREFER_JIT_PYTHON_PLUGINS=5))
    assert network_flags(trt, "aot") == 1 << 4 and network_flags(trt, "jit") == 1 << 5
    with pytest.raises(UsageError, match="--trt-plugins"):
        network_flags(trt, "cuda")
    records = {r["name"]: r["implementation"] for r in plugin_records({"Int6Gemm", "SageAttention"})}
    assert records == {"Int6Gemm": "aot", "SageAttention": "aot"}
    assert {r["implementation"] for r in plugin_records({"Int6Gemm", "VNMGemm"}, "jit")} == {"jit"}
    assert autotune_io_types(["bfloat16", "uint8", "float16"]) == "BF16,UINT8,FP16,BF16"


# ------------------------------------------------------------------------------------------- the engine runner
class _FakeEngine:
    """A stand-in TensorRT engine of a one-layer decoder: input_ids [B, T], past [B, 2, P, 4] -> logits, present."""

    io = {"input_ids": ((-1, -1), "INT64", "in"), "past_key_values.0.key": ((-1, 2, -1, 4), "FLOAT", "in"),
          "logits": ((-1, -1, 10), "FLOAT", "out"), "present.0.key": ((-1, 2, -1, 4), "FLOAT", "out")}
    num_io_tensors = 4

    def __init__(self, accept_shapes=True, enqueue=True):
        self.accept_shapes, self.enqueue = accept_shapes, enqueue

    def get_tensor_name(self, i):
        return list(self.io)[i]

    def get_tensor_shape(self, name):
        return self.io[name][0]

    def get_tensor_dtype(self, name):
        return SimpleNamespace(name=self.io[name][1])

    def get_tensor_mode(self, name):
        return self.io[name][2]

    def create_execution_context(self):
        engine = self

        class Context:
            shapes, addresses, launched = {}, {}, []

            def set_input_shape(self, name, shape):
                self.shapes[name] = shape
                return engine.accept_shapes

            def get_tensor_shape(self, name):
                b, t = self.shapes["input_ids"]
                past = self.shapes["past_key_values.0.key"][2]
                return (b, t, 10) if name == "logits" else (b, 2, past + t, 4)

            def set_tensor_address(self, name, address):
                self.addresses[name] = address

            def execute_async_v3(self, stream):
                self.launched.append(stream)
                return engine.enqueue

        return Context()


def _fake_trt(engine):
    runtime = SimpleNamespace(deserialize_cuda_engine=lambda data: engine)
    logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    return SimpleNamespace(Runtime=lambda log: runtime, Logger=logger,
                           TensorIOMode=SimpleNamespace(INPUT="in", OUTPUT="out"))


def test_engine_session_binds_every_tensor_and_drives_decoder_steps(tmp_path, monkeypatch):
    import numpy as np

    from lowc.errors import LowcError
    from lowc.export import onnx_run, tensorrt_runner

    monkeypatch.setattr(tensorrt_runner, "register_plugins", lambda: [])
    (tmp_path / "model.engine").write_bytes(b"engine")
    engine = _FakeEngine()
    sess = tensorrt_runner.EngineSession(tmp_path, device="cpu", trt=_fake_trt(engine))
    assert [t.name for t in sess.get_inputs()] == ["input_ids", "past_key_values.0.key"]
    past = onnx_run.empty_cache(sess, batch=2)
    assert past["past_key_values.0.key"].shape == (2, 2, 0, 4)
    logits, present = onnx_run.decoder_step(sess, np.zeros((2, 3), dtype=np.int64), past)
    assert logits.shape == (2, 3, 10) and present["past_key_values.0.key"].shape == (2, 2, 3, 4)
    ctx = sess.context
    assert ctx.shapes == {"input_ids": (2, 3), "past_key_values.0.key": (2, 2, 0, 4)}
    assert set(ctx.addresses) == set(engine.io) and len(ctx.launched) == 1
    logits, present = onnx_run.decoder_step(sess, np.zeros((2, 1), dtype=np.int64), present)  # one decode step
    assert ctx.shapes["past_key_values.0.key"] == (2, 2, 3, 4) and present["past_key_values.0.key"].shape[2] == 4
    with pytest.raises(LowcError, match="missing"):
        sess.run(None, {"input_ids": np.zeros((1, 1), dtype=np.int64)})
    outside = tensorrt_runner.EngineSession(tmp_path, device="cpu", trt=_fake_trt(_FakeEngine(accept_shapes=False)))
    with pytest.raises(LowcError, match="optimization profile"):
        outside.run(None, {"input_ids": np.zeros((1, 1), dtype=np.int64), **onnx_run.empty_cache(outside, 1)})
    failing = tensorrt_runner.EngineSession(tmp_path, device="cpu", trt=_fake_trt(_FakeEngine(enqueue=False)))
    with pytest.raises(LowcError, match="enqueue"):
        failing.run(None, {"input_ids": np.zeros((1, 1), dtype=np.int64), **onnx_run.empty_cache(failing, 1)})
    with pytest.raises(LowcError, match="no TensorRT engine"):
        tensorrt_runner.EngineSession(tmp_path / "nowhere", device="cpu", trt=_fake_trt(engine))
