"""BTC GEMM (binary tensor cores): the bit-plane layout and its algebra against `wa8_gemm.wa8_reference` on fresh
random inputs (CPU), the Triton activation packer under the interpreter, the CUDA source compiled with nvcc (where
the toolkit is), and the kernel itself against the reference on the GPU."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":  # conftest.py sets it before triton is imported
    pytest.skip("no CUDA and TRITON_INTERPRET is not set", allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from lowc.kernels import btc_gemm as btc_mod  # noqa: E402
from lowc.kernels import packing  # noqa: E402
from lowc.kernels.btc_layout import (bit_planes, btc_emulate, codes_from_planes, padded_k,  # noqa: E402
                                     to_btc_layout)
from lowc.kernels.wa8_gemm import quantize_rows_reference, wa8_reference  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
PAIRS = [(6, 6), (6, 8), (4, 8), (2, 8), (3, 6), (8, 8)]  # (weight bits, activation bits)


def _generator() -> tuple[torch.Generator, int]:
    seed = int.from_bytes(os.urandom(4), "little")
    return torch.Generator().manual_seed(seed), seed


def _weight(n: int, k: int, bits: int, group: int, g: torch.Generator):
    """Canonical packed codes over the full two's-complement range, and fp16 scales [n, groups]."""
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (n, k), generator=g)
    scales = (torch.rand(n, -(-k // group), generator=g) * 0.02 + 1e-3).to(torch.float16)
    return packing.pack_int(codes, bits), scales


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("k", [1, 100, 512, 700, 1100])
def test_bit_planes_round_trip(bits, k):
    g, seed = _generator()
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (5, k), generator=g)
    planes = bit_planes(q, bits, padded_k(k))
    assert planes.shape == (bits, 5, padded_k(k) // 32) and planes.dtype == torch.int32
    assert torch.equal(codes_from_planes(planes, k), q.to(torch.int32)), seed
    q[0, 0] = 1 << (bits - 1)  # one past the largest code
    with pytest.raises(ValueError, match="range"):
        bit_planes(q, bits, padded_k(k))


@pytest.mark.parametrize("wbits,abits", PAIRS)
@pytest.mark.parametrize("n,k,group", [(37, 700, 128), (16, 1100, 256), (20, 3000, 3000), (9, 2100, 1024)])
def test_bit_plane_algebra_equals_the_a8_reference(wbits, abits, n, k, group):
    """sum_ij +-2^(i+j) popc(W_i AND X_j) per scale group, scaled in group order, is the A8/A6 GEMM bit for bit."""
    g, seed = _generator()
    qweight, scales = _weight(n, k, wbits, group, g)
    x = torch.randn(3, k, generator=g).to(torch.bfloat16)
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    w = to_btc_layout(qweight, scales, wbits, group, k)
    xq, xs = quantize_rows_reference(x, abits)
    got = btc_emulate(bit_planes(xq, abits, w.k_pad), xs, w, bias)
    want = wa8_reference(x.float(), qweight, scales, wbits, group, k, abits, bias)
    assert torch.equal(got, want), (seed, (got - want).abs().max().item())


def test_layout_rejects_groups_a_binary_mma_would_straddle():
    qweight, scales = _weight(4, 1000, 4, 64, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="scale groups of 128 or 256"):
        to_btc_layout(qweight, scales, 4, 64, 1000)
    qweight, scales = _weight(4, 1000, 4, 384, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="scale groups of 128 or 256"):
        to_btc_layout(qweight, scales, 4, 384, 1000)


@pytest.mark.parametrize("bits", [6, 8])
@pytest.mark.parametrize("t,k", [(1, 100), (3, 700), (5, 1536)])
def test_activation_packer_matches_bit_planes(bits, t, k):
    g, seed = _generator()
    qmax = (1 << (bits - 1)) - 1
    q = torch.randint(-qmax, qmax + 1, (t, k), generator=g).to(torch.int8)
    got = btc_mod.pack_activation_planes(q.to(DEVICE), bits, padded_k(k))
    assert torch.equal(got.cpu(), bit_planes(q, bits, padded_k(k))), seed


@pytest.mark.parametrize("wbits,abits", PAIRS)
def test_cuda_source_compiles_with_nvcc(tmp_path, wbits, abits):
    """CI syntax check: nvcc compiles the kernel for sm_90a in the configs `pick_config` makes and every kind of
    scale group (per row, 128, 256, multiples of 512)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found: the CUDA source is compiled only where the CUDA toolkit is installed")
    variants = [(btc_mod.pick_config(1), 1), (btc_mod.pick_config(16), 2), (btc_mod.pick_config(4096), 0),
                (btc_mod.pick_config(1), 8)]
    for i, (cfg, gsteps) in enumerate(variants):
        path = tmp_path / f"k{i}.cu"
        path.write_text(btc_mod.defines(i % 2 == 1, wbits, abits, cfg, gsteps) + btc_mod.kernel_source())
        proc = subprocess.run([nvcc, "-std=c++17", "-arch=sm_90a", "-cubin", "-o", str(path.with_suffix(".cubin")),
                               str(path)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"nvcc failed for {cfg}, gsteps {gsteps}:\n{proc.stderr[-3000:]}"


@pytest.mark.skipif(CUDA, reason="checks the message shown without CUDA")
def test_btc_gemm_needs_cuda():
    qweight, scales = _weight(16, 128, 4, 128, torch.Generator().manual_seed(0))
    w = to_btc_layout(qweight, scales, 4, 128, 128)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        btc_mod.btc_gemm(torch.randn(2, 128).to(torch.bfloat16), w)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (binary tensor cores)")
@pytest.mark.parametrize("wbits,abits", PAIRS)
@pytest.mark.parametrize("m", [1, 5, 16, 100])
@pytest.mark.parametrize("n,k,group", [(300, 1100, 128), (1024, 4096, 256), (200, 2000, 2000), (64, 3000, 1024)])
def test_btc_gemm_matches_reference(wbits, abits, m, n, k, group):
    g, seed = _generator()
    qweight, scales = _weight(n, k, wbits, group, g)
    dtype = torch.bfloat16 if (m + wbits) % 2 else torch.float16
    x = torch.randn(m, k, generator=g).to(dtype).cuda()
    bias = torch.randn(n, generator=g).to(dtype).cuda()
    w = to_btc_layout(qweight, scales, wbits, group, k).to("cuda")
    y = btc_mod.btc_gemm(x, w, bias, act_bits=abits)
    want = wa8_reference(x, qweight.cuda(), scales.cuda(), wbits, group, k, abits, bias)
    assert y.shape == (m, n) and y.dtype == dtype
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    diff = (y.float() - want.float()).abs().max().item()
    # the only difference: the order of fp32 additions of the K-split warps (then one rounding to x's dtype)
    assert torch.allclose(y.float(), want.float(), rtol=2 * ulp, atol=1e-3), (seed, diff)
