"""Triton W{4,6,8}A16 and W{4,6,8}A8/A6 GEMMs against kernels/reference.py on fresh random inputs.

Without CUDA the kernels run in Triton's CPU interpreter on small, deliberately odd shapes (K not a multiple of
the tile or the group, N not a multiple of BLOCK_N, M = 1, 3, 17). TRITON_INTERPRET must be set before the
kernels and triton's own library functions are defined, so it is set here before triton is imported (the module
is skipped with a reason if something imported triton earlier without it). With CUDA the same checks run
compiled, plus larger shapes with the default configs.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        # triton's own library functions (tl.cdiv, tl.max, ...) are defined as interpreted or compiled when triton
        # is first imported, so the interpreter cannot be switched on afterwards
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; set it in conftest.py for CPU runs",
                    allow_module_level=True)
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from lowc.kernels import lowbit_layout, packing, reference, wa8_gemm, wa16_gemm  # noqa: E402
from lowc.kernels.lowbit_layout import (dequantize_lowbit, from_lowbit_layout, lowbit_codes,  # noqa: E402
                                        to_lowbit_layout)
from lowc.kernels.wa16_gemm import GemmConfig  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"


def _generator() -> tuple[torch.Generator, int]:
    seed = int.from_bytes(os.urandom(4), "little")
    return torch.Generator().manual_seed(seed), seed


def _random_weight(n: int, k: int, bits: int, group: int, g: torch.Generator):
    """Canonical packed weight over the full code range with random fp16 scales."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = torch.randint(lo, hi + 1, (n, k), generator=g)
    scales = (torch.rand(n, -(-k // group), generator=g) * 0.02 + 1e-3).to(torch.float16)
    return packing.pack_int(codes, bits), scales


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.double().cpu(), ref.double().cpu()
    assert torch.isfinite(y).all()
    return float((y - ref).norm() / ref.norm())


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("k,group", [(1, 128), (5, 64), (130, 64), (300, 128), (300, 300), (512, 128)])
def test_layout_round_trip_and_decode(bits, k, group):
    g, seed = _generator()
    qweight, scales = _random_weight(7, k, bits, group, g)
    w = to_lowbit_layout(qweight, scales, bits, group, k)
    assert w.k_pad % lowbit_layout.K_ALIGN == 0 and w.k_pad >= k
    back_q, back_s = from_lowbit_layout(w)
    assert torch.equal(back_q, qweight) and torch.equal(back_s, scales), seed
    assert torch.equal(lowbit_codes(w), packing.unpack_int(qweight, bits, k)), seed
    assert torch.equal(dequantize_lowbit(w), reference.dequantize_int(qweight, scales, bits, group, k)), seed


def test_layout_bit_order():
    # INT6 code c -> u = c + 32; low nibble pairs like INT4, top 2 bits of column 4i+j at bits 2j of byte i
    codes = torch.tensor([[-32, -1, 0, 31, 5]])
    w = to_lowbit_layout(packing.pack_int(codes, 6), torch.ones(1, 1, dtype=torch.float16), 6, 128, 5)
    u = (codes[0] + 32).tolist()  # 0, 31, 32, 63, 37
    assert w.codes[0, :3].tolist() == [(u[0] & 15) | (u[1] & 15) << 4, (u[2] & 15) | (u[3] & 15) << 4,
                                       (u[4] & 15) | (32 & 15) << 4]
    assert w.high[0, :2].tolist() == [(u[0] >> 4) | (u[1] >> 4) << 2 | (u[2] >> 4) << 4 | (u[3] >> 4) << 6,
                                      (u[4] >> 4) | 2 << 2 | 2 << 4 | 2 << 6]


def test_layout_rejects_bad_shapes():
    qweight, scales = _random_weight(4, 64, 4, 32, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="qweight"):
        to_lowbit_layout(qweight, scales, 4, 32, 66)
    with pytest.raises(ValueError, match="scales"):
        to_lowbit_layout(qweight, scales, 4, 64, 64)
    with pytest.raises(ValueError, match="bits"):
        to_lowbit_layout(qweight, scales, 3, 32, 64)


# (M, N, K, group, split_k): odd K, odd N, per-channel (group >= K), split-K across a group boundary
SHAPES = [(1, 40, 200, 64, 1), (3, 72, 300, 300, 2), (17, 48, 256, 128, 1), (3, 33, 130, 64, 3)]


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("m,n,k,group,split", SHAPES)
def test_wa16_matches_reference(bits, dtype, m, n, k, group, split):
    g, seed = _generator()
    qweight, scales = _random_weight(n, k, bits, group, g)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    w = to_lowbit_layout(qweight, scales, bits, group, k).to(DEVICE)
    y = wa16_gemm.wa16_gemm(x.to(DEVICE), w, bias.to(DEVICE), config=GemmConfig(16, 32, 64, split))
    assert y.shape == (m, n) and y.dtype == dtype
    ref = x.float() @ reference.dequantize_int(qweight, scales, bits, group, k).t() + bias.float()
    # output rounding dominates: bf16 keeps 8 bits (the interpreter truncates), fp16 11
    assert _rel_err(y, ref) < (8e-3 if dtype == torch.bfloat16 else 1e-3), seed


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("m,n,k,group,block_k,split", [(1, 40, 200, 64, 128, 1), (1, 33, 300, 300, 64, 2),
                                                       (3, 24, 520, 128, 256, 1), (1, 48, 256, 32, 64, 3)])
def test_wa16_gemv_matches_reference(bits, m, n, k, group, block_k, split):
    """The one-token kernel: K tiles inside a group, tiles of several whole groups, per-channel, split-K."""
    g, seed = _generator()
    qweight, scales = _random_weight(n, k, bits, group, g)
    x = torch.randn(m, k, generator=g).to(torch.float16)
    bias = torch.randn(n, generator=g).to(torch.float16)
    w = to_lowbit_layout(qweight, scales, bits, group, k).to(DEVICE)
    cfg = GemmConfig(1, 16, block_k, split, gemv=True)
    assert wa16_gemm.fit_block_k(cfg, w, m).block_k == min(block_k, w.k_pad)  # whole groups are kept
    y = wa16_gemm.wa16_gemm(x.to(DEVICE), w, bias.to(DEVICE), config=cfg)
    ref = x.float() @ reference.dequantize_int(qweight, scales, bits, group, k).t() + bias.float()
    assert y.shape == (m, n) and _rel_err(y, ref) < 1e-3, seed


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("act_bits", [8, 6])
@pytest.mark.parametrize("m,n,k,group,block_k,split", [(1, 40, 200, 64, 128, 1), (1, 33, 300, 300, 64, 2),
                                                       (2, 24, 520, 128, 256, 1), (1, 48, 256, 32, 64, 3)])
def test_wa8_gemv_matches_emulation(bits, act_bits, m, n, k, group, block_k, split):
    """The A8/A6 GEMM through the one-token kernel: int8 codes as fp32, exact group sums, token scale last."""
    _check_wa8(bits, act_bits, m, n, k, group, GemmConfig(1, 16, block_k, split, gemv=True))


@pytest.mark.parametrize("bits", [4, 6])
def test_concat_rows_views_share_the_fused_weight(bits):
    """Projections fused at load time: the fused GEMM equals the parts side by side, and each part computed
    through its view (scales a strided column slice) equals the part on its own."""
    g, seed = _generator()
    k, group = 200, 64
    parts = [_random_weight(n, k, bits, group, g) for n in (40, 24, 24)]
    ws = [to_lowbit_layout(q, s, bits, group, k).to(DEVICE) for q, s in parts]
    fused, views = lowbit_layout.concat_rows(ws)
    assert fused.n == 88 and views[1].codes.data_ptr() == fused.codes[40:].data_ptr()
    assert views[2].scales.stride(0) == 88
    x = torch.randn(1, k, generator=g).to(torch.float16).to(DEVICE)
    for cfg in (GemmConfig(16, 32, 64), GemmConfig(1, 16, 128, gemv=True)):
        singles = [wa16_gemm.wa16_gemm(x, w, config=cfg) for w in ws]
        assert torch.equal(wa16_gemm.wa16_gemm(x, fused, config=cfg), torch.cat(singles, -1)), seed
        for view, single in zip(views, singles):
            assert torch.equal(wa16_gemm.wa16_gemm(x, view, config=cfg), single), seed
    y8 = wa8_gemm.wa8_gemm(x, views[2], config=GemmConfig(16, 32, 64))
    assert torch.equal(y8, wa8_gemm.wa8_gemm(x, ws[2], config=GemmConfig(16, 32, 64))), seed
    assert torch.equal(from_lowbit_layout(views[1])[0].cpu(), parts[1][0]), seed
    with pytest.raises(ValueError, match="same bits"):
        lowbit_layout.concat_rows([ws[0], to_lowbit_layout(*_random_weight(8, 300, bits, group, g), bits, group,
                                                            300).to(DEVICE)])


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("m,n,k,group", [(3, 40, 200, 64), (17, 33, 300, 300)])
def test_expand_then_gemm_paths(bits, m, n, k, group):
    """The prefill paths: weight expanded once (to bf16 with scales / to int8 codes), then a dense GEMM."""
    g, seed = _generator()
    qweight, scales = _random_weight(n, k, bits, group, g)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    w = to_lowbit_layout(qweight, scales, bits, group, k).to(DEVICE)
    dense = reference.dequantize_int(qweight, scales, bits, group, k)
    codes = wa16_gemm.expand_weight(w, torch.int8).cpu()
    assert torch.equal(codes[:, :k], packing.unpack_int(qweight, bits, k)) and not codes[:, k:].any(), seed
    assert torch.equal(wa16_gemm.expand_weight(w, torch.float32).cpu(), dense), seed
    cfg = GemmConfig(16, 32, 64, dequant=True)
    y16 = wa16_gemm.wa16_gemm(x.to(DEVICE), w, config=cfg)
    assert _rel_err(y16, x.float() @ dense.t()) < 8e-3, seed
    y8 = wa8_gemm.wa8_gemm(x.to(DEVICE), w, config=cfg)
    emulated = wa8_gemm.wa8_reference(x, qweight, scales, bits, group, k)
    assert torch.allclose(y8.cpu().float(), emulated.float(), rtol=2.0**-7, atol=1e-3), seed


@pytest.mark.parametrize("act_bits", [8, 6])
def test_quantize_rows_bit_exact(act_bits):
    g, seed = _generator()
    x = (torch.randn(5, 300, generator=g) * 3).to(torch.bfloat16)
    x[2] = 0  # an all-zero row gets scale 1
    x[3, 7] = 1e4  # an outlier row
    q, s = wa8_gemm.quantize_rows(x.to(DEVICE), act_bits)
    q_ref, s_ref = wa8_gemm.quantize_rows_reference(x, act_bits)
    assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref), seed
    qmax = (1 << (act_bits - 1)) - 1
    assert int(q.abs().max()) == qmax and float(s[2]) == 1.0


def test_quantize_rows_two_pass_long_rows():
    g, seed = _generator()
    x = torch.randn(2, 20000, generator=g).to(torch.float16)
    q, s = wa8_gemm.quantize_rows(x.to(DEVICE))
    q_ref, s_ref = wa8_gemm.quantize_rows_reference(x)
    assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref), seed


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("act_bits", [8, 6])
@pytest.mark.parametrize("m,n,k,group,split", SHAPES)
def test_wa8_matches_emulation(bits, act_bits, m, n, k, group, split):
    _check_wa8(bits, act_bits, m, n, k, group, GemmConfig(16, 32, 64, split))


def _check_wa8(bits, act_bits, m, n, k, group, config):
    g, seed = _generator()
    dtype = torch.bfloat16 if (m + bits) % 2 else torch.float16
    qweight, scales = _random_weight(n, k, bits, group, g)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    w = to_lowbit_layout(qweight, scales, bits, group, k).to(DEVICE)
    y = wa8_gemm.wa8_gemm(x.to(DEVICE), w, bias.to(DEVICE), act_bits, config=config)
    assert y.shape == (m, n) and y.dtype == dtype
    emulated = wa8_gemm.wa8_reference(x, qweight, scales, bits, group, k, act_bits, bias)
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    assert torch.allclose(y.cpu().float(), emulated.float(), rtol=ulp, atol=1e-3), seed
    exact = x.float() @ reference.dequantize_int(qweight, scales, bits, group, k).t() + bias.float()
    assert _rel_err(y, exact) < (0.02 if act_bits == 8 else 0.08), seed  # activation rounding only


def test_group_must_fit_a_tile():
    qweight, scales = _random_weight(8, 100, 4, 50, torch.Generator().manual_seed(0))
    w = to_lowbit_layout(qweight, scales, 4, 50, 100).to(DEVICE)
    x = torch.randn(1, 100, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of 16"):
        wa16_gemm.wa16_gemm(x, w)
    with pytest.raises(ValueError, match="features"):
        wa16_gemm.wa16_gemm(x[:, :99], w)
    with pytest.raises(ValueError, match="activation bits"):
        wa8_gemm.wa8_gemm(x, to_lowbit_layout(qweight, torch.ones(8, 1, dtype=torch.float16), 4, 100, 100)
                          .to(DEVICE), act_bits=4)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: compiled kernels with the default configs, large shapes")
@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("m", [1, 77, 512])
@pytest.mark.parametrize("n,k,group", [(4096, 4096, 128), (1000, 2200, 64), (768, 3000, 3000)])
def test_gpu_default_configs(bits, m, n, k, group, monkeypatch):
    monkeypatch.setenv("LOWC_AUTOTUNE", "0")  # compile only the first config of each list
    g, seed = _generator()
    qweight, scales = _random_weight(n, k, bits, group, g)
    w = to_lowbit_layout(qweight.cuda(), scales.cuda(), bits, group, k)
    dense = reference.dequantize_int(qweight, scales, bits, group, k).cuda()
    x = torch.randn(m, k, generator=g).to(torch.bfloat16).cuda()
    bias = torch.randn(n, generator=g).to(torch.bfloat16).cuda()
    ref = x.float() @ dense.t() + bias.float()
    assert _rel_err(wa16_gemm.wa16_gemm(x, w, bias), ref) < 8e-3, seed
    assert _rel_err(wa16_gemm.wa16_gemm(x.half(), w, bias.half()), ref) < 1e-3, seed
    emulated = wa8_gemm.wa8_reference(x, qweight.cuda(), scales.cuda(), bits, group, k, 8, bias)
    y = wa8_gemm.wa8_gemm(x, w, bias)
    diff = (y.float() - emulated.float()).abs().max().item()
    assert torch.allclose(y.float(), emulated.float(), rtol=2.0**-7, atol=1e-3), (seed, diff)
