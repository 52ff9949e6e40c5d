"""PackedLinear on the Triton GEMMs: the same products as the reference kernels (Triton's CPU interpreter without
CUDA), with the weight kept only in the kernel layout."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lowc.kernels import packing, reference
from lowc.runtime.packed_linear import PackedLinear, fast_kernel_name
from lowc.scheme import ModuleScheme

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: Triton's interpreter (conftest turns it on)


def _module(n: int, k: int, bits: int, group: int, abits: int | None = None, smooth: bool = False,
            bias: bool = False, seed: int = 0, rotate: int | None = None) -> PackedLinear:
    g = torch.Generator().manual_seed(seed)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    tensors = {"qweight": packing.pack_int(torch.randint(lo, hi + 1, (n, k), generator=g), bits),
               "scales": (torch.rand(n, -(-k // group), generator=g) * 0.02 + 1e-3).to(torch.float16)}
    if bias:
        tensors["bias"] = torch.randn(n, generator=g).to(torch.bfloat16)
    if smooth:
        tensors["smooth"] = torch.rand(k, generator=g) * 4 + 0.25
    scheme = ModuleScheme("m", (n, k), None, bits, group, bias=bias, abits=abits, smooth=smooth, rotate=rotate)
    return PackedLinear(scheme, {name: t.to(DEVICE) for name, t in tensors.items()})


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize("bits,group,abits,smooth,bias,rotate", [
    (4, 32, None, False, False, None), (6, 64, None, False, True, None), (8, 32, None, False, False, None),
    (6, 32, 8, False, True, None), (4, 32, 8, False, False, None), (6, 64, 6, True, False, None),
    (4, 32, None, False, True, 32), (6, 32, 6, False, False, 32),
    (3, 32, None, False, True, None), (2, 64, 8, False, False, None), (3, 32, 6, True, False, 32)])
def test_fast_kernel_matches_the_reference(bits, group, abits, smooth, bias, rotate, monkeypatch):
    m = _module(48, 96, bits, group, abits, smooth, bias, rotate=rotate)
    canonical = {k: v.clone() for k, v in m.packed().items()}
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.bfloat16)
    want = reference.packed_linear(x, canonical, m.scheme)
    assert m.use_fast_kernel() and m.kernel == ("wa16" if abits is None else "wa8")
    assert not hasattr(m, "qweight")  # one copy of the weight: the kernel layout
    for suffix, t in m.packed().items():  # the canonical tensors come back exactly
        assert torch.equal(t, canonical[suffix]), suffix
    with monkeypatch.context() as patch:  # the Triton kernel must do the work, not a silent fallback
        patch.setattr(reference, "packed_linear", lambda *a: pytest.fail("took the reference path"))
        got = m(x)
    assert got.dtype == torch.bfloat16 and got.shape == (5, 48)
    # bf16 output rounding; A6/A8 codes can differ by one step where x/smooth rounds to bf16 first
    assert _rel(got, want) < (2e-2 if smooth else 1e-2)
    # the buffers are what module_bytes / .to() see
    names = {n for n, _ in m.named_buffers()}
    assert {"lowbit_codes", "lowbit_scales"} <= names


def test_float32_inputs_and_unsupported_schemes_take_the_reference_path():
    m = _module(16, 64, 6, 32)
    x = torch.randn(3, 64, device=DEVICE)
    want = reference.packed_linear(x, m.packed(), m.scheme)
    m.use_fast_kernel()
    assert torch.allclose(m(x), want, rtol=1e-6, atol=1e-6)  # float32 x: reference, exact
    assert fast_kernel_name(dataclasses.replace(m.scheme, bits=3)) == "wa16"  # INT3 codes in the INT4 layout
    assert fast_kernel_name(dataclasses.replace(m.scheme, slorb_group=16)) is None
    assert fast_kernel_name(dataclasses.replace(m.scheme, abits=8)) == "wa8"


@pytest.mark.parametrize("bits,abits,smooth,bias", [(6, None, False, False), (6, 8, False, True), (6, 6, True, False),
                                                    (3, None, False, True)])
def test_fused_projections_equal_their_parts(bits, abits, smooth, bias):
    """q/k/v-style fusion: one GEMM over the stacked rows gives the parts side by side, the parts keep computing
    the same through views of the fused weight (no second copy), and unfusable sets are refused."""
    from lowc.runtime.fused_linear import fuse_linears

    parts = [_module(n, 96, bits, 32, abits, smooth, bias, seed=s) for s, n in enumerate((48, 16, 16))]
    if smooth:  # fusable only with the same input smoothing
        for p in parts[1:]:
            p.smooth = parts[0].smooth
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(2)).to(DEVICE, torch.bfloat16)
    assert fuse_linears(parts) is None  # reference-path modules have no kernel layout to share
    for p in parts:
        p.use_fast_kernel()
    before = [p(x) for p in parts]
    fused = fuse_linears(parts)
    assert fused is not None and fused.out_features == 80 and fused.kernel == parts[0].kernel
    assert parts[2].lowbit_codes.data_ptr() == fused.lowbit_codes[64:].data_ptr()
    assert torch.equal(fused(x), torch.cat(before, -1))
    for p, y in zip(parts, before):
        assert torch.equal(p(x), y)
    assert fused.packed()["qweight"].shape == packing.pack_int(torch.zeros(80, 96, dtype=torch.int8), bits).shape
    other = _module(16, 96, 8, 32, abits, smooth, bias)
    other.use_fast_kernel()
    assert fuse_linears([parts[0], other]) is None  # different bits


def test_fused_plain_linears_share_memory():
    from lowc.runtime.fused_linear import fuse_linears

    torch.manual_seed(0)
    parts = [torch.nn.Linear(32, n, bias=True) for n in (8, 24)]
    x = torch.randn(2, 32)
    before = [p(x) for p in parts]
    fused = fuse_linears(parts)
    assert torch.allclose(fused(x), torch.cat(before, -1), atol=1e-6)
    assert parts[1].weight.data_ptr() == fused.weight[8:].data_ptr()
    assert parts[1].bias.data_ptr() == fused.bias[8:].data_ptr()
    assert all(torch.allclose(p(x), y, atol=1e-6) for p, y in zip(parts, before))
    assert fuse_linears([parts[0], torch.nn.Linear(32, 8, bias=False)]) is None


def _vnm_module(bits: int | None, group: int, abits: int | None, smooth: bool = False, bias: bool = True,
                seed: int = 0) -> PackedLinear:
    """A random 64:2:5 module [150, 203] (rows and columns not multiples of V or M), canonical artifact tensors."""
    from conftest import random_vnm_pattern

    from lowc.compress.sparsity.vnm import VNMSpec

    rows, cols, spec = 150, 203, VNMSpec(64, 2, 5)
    g = torch.Generator().manual_seed(seed)
    columns, positions, padding = random_vnm_pattern(rows, cols, spec.v, spec.m, g)
    kb = columns.shape[1]
    tensors = {"columns": columns, "positions": packing.pack_2bit(positions.reshape(rows, 2 * kb))}
    if bits is None:
        tensors["values"] = torch.randn(rows, 2 * kb, generator=g).masked_fill(padding, 0).to(torch.bfloat16)
    else:
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        codes = torch.randint(lo, hi + 1, (rows, 2 * kb), generator=g).masked_fill(padding, 0)
        tensors["qweight"] = packing.pack_int(codes, bits)
        tensors["scales"] = (torch.rand(rows, -(-2 * kb // group), generator=g) * 0.02 + 1e-3).to(torch.float16)
    if bias:
        tensors["bias"] = torch.randn(rows, generator=g).to(torch.bfloat16)
    if smooth:
        tensors["smooth"] = torch.rand(cols, generator=g) * 4 + 0.25
    scheme = ModuleScheme("m", (rows, cols), spec, bits, group, bias=bias, abits=abits, smooth=smooth)
    assert set(tensors) == set(scheme.expected_tensors())
    return PackedLinear(scheme, {name: t.to(DEVICE) for name, t in tensors.items()})


@pytest.mark.skipif(DEVICE != "cuda", reason="the V:N:M kernels need a CUDA GPU (sparse tensor cores)")
@pytest.mark.parametrize("bits,group,abits,smooth,kernel", [
    (None, 128, None, False, "vnm"), (6, 32, None, False, "vnm"), (6, 32, 8, False, "vnm_int8"),
    (6, 1000, 8, True, "vnm_int8"), (4, 64, 6, False, "vnm_int8"), (8, 128, 8, False, "vnm_int8")])
@pytest.mark.parametrize("tokens", [1, 9, 100])
def test_vnm_modules_run_on_the_sparse_kernels(bits, group, abits, smooth, kernel, tokens, monkeypatch):
    """V:N:M modules (16-bit values, integer values with 16-bit inputs, integer values with A8/A6 inputs, per-row
    and group-wise scales) compute what the reference computes, through vnm_spmm / vnm_spmm_int8."""
    m = _vnm_module(bits, group, abits, smooth)
    canonical = {k: v.clone() for k, v in m.packed().items()}
    x = torch.randn(tokens, 203, generator=torch.Generator().manual_seed(tokens)).to(DEVICE, torch.bfloat16)
    want = reference.packed_linear(x, canonical, m.scheme)
    assert fast_kernel_name(m.scheme) == kernel
    assert m.use_fast_kernel(torch.bfloat16) and m.kernel == kernel
    assert not any(hasattr(m, s) for s in ("values", "qweight"))  # on the GPU only the kernel layout
    for suffix, t in m.packed().items():  # the canonical tensors come back exactly (from host memory)
        assert torch.equal(t, canonical[suffix]), suffix
    with monkeypatch.context() as patch:
        patch.setattr(reference, "packed_linear", lambda *a: pytest.fail("took the reference path"))
        got = m(x)
    assert got.dtype == torch.bfloat16 and got.shape == (tokens, 150)
    assert _rel(got, want) < (2e-2 if smooth else 1e-2)


@pytest.mark.parametrize("bits,group,abits,smooth", [(None, 32, None, False), (6, 32, None, False),
                                                     (6, 128, 8, False), (4, 1000, 6, True)])
def test_vnm_prefill_expands_the_weight(bits, group, abits, smooth, monkeypatch):
    """From DENSE_PREFILL_TOKENS tokens on, a V:N:M module expands its kernel-layout weight (Triton; the
    interpreter on CPU, where the layout is built as on the GPU) and multiplies densely, not on the SpMM: 16-bit
    inputs through cuBLAS, A8/A6 inputs through the W8A8 GEMM (group-wise and per-row scales)."""
    from lowc.kernels import cuda_build, vnm_spmm
    from lowc.kernels.vnm_dense import DENSE_PREFILL_TOKENS

    monkeypatch.setattr(cuda_build, "available", lambda: True)  # the layout conversion itself is plain torch
    m = _vnm_module(bits, group, abits, smooth)
    canonical = {k: v.clone() for k, v in m.packed().items()}
    x = torch.randn(DENSE_PREFILL_TOKENS, 203, generator=torch.Generator().manual_seed(5)).to(DEVICE, torch.bfloat16)
    want = reference.packed_linear(x, canonical, m.scheme)
    assert m.use_fast_kernel(torch.bfloat16) and m.kernel == ("vnm" if abits is None else "vnm_int8")
    with monkeypatch.context() as patch:
        patch.setattr(reference, "packed_linear", lambda *a: pytest.fail("took the reference path"))
        patch.setattr(vnm_spmm, "vnm_spmm", lambda *a, **k: pytest.fail("took the SpMM"))
        patch.setattr(vnm_spmm, "vnm_spmm_int8", lambda *a, **k: pytest.fail("took the INT8 SpMM"))
        got = m(x)
    assert got.dtype == torch.bfloat16 and got.shape == (DENSE_PREFILL_TOKENS, 150)
    assert _rel(got, want) < (2e-2 if smooth else 1e-2)


def test_vnm_kernel_names():
    m = _vnm_module(6, 32, 8)
    assert fast_kernel_name(m.scheme) == "vnm_int8"
    assert fast_kernel_name(dataclasses.replace(m.scheme, group=48)) is None  # groups must be whole k32 pairs
    assert fast_kernel_name(dataclasses.replace(m.scheme, abits=None)) == "vnm"
    assert fast_kernel_name(dataclasses.replace(m.scheme, slorb_group=16)) is None
    if DEVICE == "cpu":
        assert not m.use_fast_kernel(torch.bfloat16) and m.kernel == "reference"  # no GPU: stays on the reference
