"""The CUDA tensor-core decode GEMM (`lowc.kernels.wa16_decode`): its lane/fragment mapping checked bit for bit
on CPU, the source compiled with nvcc (skipped without it), and on the GPU the kernel against the reference on
fresh random inputs and odd shapes (skipped without CUDA)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

from lowc.kernels import packing, reference, wa16_decode
from lowc.kernels.lowbit_layout import code_bias, concat_rows, from_lowbit_layout, to_lowbit_layout
from lowc.kernels.wa16_gemm import GemmConfig

HAS_CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (tensor cores, NVRTC)")


def _prmt(a: int, b: int, sel: int) -> int:
    """PTX prmt.b32 (default mode): byte i of the result is byte (sel >> 4i) & 7 of the 8 bytes {b, a}."""
    src = a | (b << 32)
    return sum(((src >> (8 * ((sel >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))


def _lane_slots(code_bytes: bytes, high_bytes: bytes, x_words: list[int], bits: int):
    """What one lane feeds the MMAs for one row and one 128-column chunk, following wa16_decode.cu's bit
    operations: per step (q, h) the codes in K slots {2t, 2t+1, 2t+8, 2t+9} and the x values in the same slots."""
    words = [int.from_bytes(code_bytes[4 * q: 4 * q + 4], "little") for q in range(4)]
    hwords = [int.from_bytes(high_bytes[4 * i: 4 * i + 4], "little") for i in range(2)] if bits == 6 else [0, 0]
    out = []
    for q in range(4):
        hp = _prmt(hwords[q // 2], 0, 0x4342 if q & 1 else 0x4140)
        for h in range(2):
            p0 = (words[q] >> (8 * h)) & 0x000F000F
            p1 = (words[q] >> (8 * h + 4)) & 0x000F000F
            if bits == 6:
                p0 |= ((hp if h else hp << 4) & 0x00300030)
                p1 |= ((hp >> 2 if h else hp << 2) & 0x00300030)
            codes = [(p & 0xFFFF) - code_bias(bits) for p in (p0, p1)] + \
                    [((p >> 16) & 0xFFFF) - code_bias(bits) for p in (p0, p1)]
            b0 = _prmt(x_words[4 * q + h], x_words[4 * q + 2 + h], 0x5410)
            b1 = _prmt(x_words[4 * q + h], x_words[4 * q + 2 + h], 0x7632)
            xs = [b0 & 0xFFFF, b1 & 0xFFFF, b0 >> 16, b1 >> 16]  # slots 2t, 2t+8, 2t+1, 2t+9 like `codes`
            out.append((codes, xs))
    return out


@pytest.mark.parametrize("bits", [4, 6])
def test_lane_mapping_pairs_each_code_with_its_activation(bits):
    """Feed column indices as the activations: every K slot must hold the code of the column whose x it holds,
    and the 4 lanes of a row must cover the chunk's 128 columns exactly once."""
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = torch.randint(lo, hi + 1, (1, 256), generator=g)
    w = to_lowbit_layout(packing.pack_int(codes, bits), torch.ones(1, 2, dtype=torch.float16), bits, 128, 256)
    for chunk in range(2):
        seen = []
        for t in range(4):
            cb = bytes(w.codes[0, chunk * 64 + 16 * t: chunk * 64 + 16 * t + 16].tolist())
            hb = bytes(w.high[0, chunk * 32 + 8 * t: chunk * 32 + 8 * t + 8].tolist()) if bits == 6 else b""
            cols = [chunk * 128 + 32 * t + j for j in range(32)]
            x_words = [cols[2 * j] | (cols[2 * j + 1] << 16) for j in range(16)]
            for step_codes, step_cols in _lane_slots(cb, hb, x_words, bits):
                for c, col in zip(step_codes, step_cols):
                    assert c == int(codes[0, col]), (t, col)
                    seen.append(col)
        assert sorted(seen) == list(range(chunk * 128, chunk * 128 + 128))


def _lane_slots_a8(code_bytes: bytes, high_bytes: bytes, x_cols: list[int], bits: int):
    """The A8 variant (mma m16n8k32 s8): per code word q, the signed codes in K slots 4t..4t+3 (even columns) and
    4t+16..4t+19 (odd ones) as wa16_decode.cu's byte arithmetic makes them, and the x bytes B holds there."""
    words = [int.from_bytes(code_bytes[4 * q: 4 * q + 4], "little") for q in range(4)]
    hwords = [int.from_bytes(high_bytes[4 * i: 4 * i + 4], "little") for i in range(2)] if bits == 6 else [0, 0]
    xw = [sum(x_cols[4 * j + i] << (8 * i) for i in range(4)) for j in range(8)]  # column indices as bytes
    out = []
    for q in range(4):
        lo, hi = words[q] & 0x0F0F0F0F, (words[q] >> 4) & 0x0F0F0F0F
        if bits == 6:
            hb = _prmt(hwords[q // 2], 0, 0x3322 if q & 1 else 0x1100)
            hn = (hb & 0x000F000F) | ((hb >> 4) & 0x0F000F00)
            lo |= (hn << 4) & 0x30303030
            hi |= (hn << 2) & 0x30303030
        add = 0x60606060 if bits == 6 else 0x78787878
        even, odd = ((lo + add) ^ 0x80808080) & 0xFFFFFFFF, ((hi + add) ^ 0x80808080) & 0xFFFFFFFF
        signed = [((v >> (8 * i)) & 0xFF) - (256 if (v >> (8 * i)) & 0x80 else 0) for v in (even, odd) for i in range(4)]
        b0, b1 = _prmt(xw[2 * q], xw[2 * q + 1], 0x6420), _prmt(xw[2 * q], xw[2 * q + 1], 0x7531)
        cols = [(v >> (8 * i)) & 0xFF for v in (b0, b1) for i in range(4)]
        out.append((signed, cols))
    return out


@pytest.mark.parametrize("bits", [4, 6])
def test_lane_mapping_a8(bits):
    """As above for int8 activations: each K slot's int8 code is the code of the column whose x byte B holds."""
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = torch.randint(lo, hi + 1, (1, 128), generator=g)
    w = to_lowbit_layout(packing.pack_int(codes, bits), torch.ones(1, 1, dtype=torch.float16), bits, 128, 128)
    seen = []
    for t in range(4):
        cb = bytes(w.codes[0, 16 * t: 16 * t + 16].tolist())
        hb = bytes(w.high[0, 8 * t: 8 * t + 8].tolist()) if bits == 6 else b""
        for step_codes, step_cols in _lane_slots_a8(cb, hb, [32 * t + j for j in range(32)], bits):
            for c, col in zip(step_codes, step_cols):
                assert c == int(codes[0, col]), (t, col)
                seen.append(col)
    assert sorted(seen) == list(range(128))


def test_code_offsets():
    # the packed FMA adds -(128 + bias) (bf16) or -(1024 + bias) (fp16) to both halves
    assert wa16_decode._code_offset(4, False) == "0xC308C308u"  # -136
    assert wa16_decode._code_offset(6, False) == "0xC320C320u"  # -160
    assert wa16_decode._code_offset(4, True) == "0xE408E408u"   # -1032
    assert wa16_decode._code_offset(6, True) == "0xE420E420u"   # -1056


def _weight(n, k, bits, group, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = torch.randint(lo, hi + 1, (n, k), generator=g)
    groups = -(-k // group)
    scales = (torch.rand(n, groups, generator=g) * 0.02 + 1e-3).to(torch.float16)
    qweight = packing.pack_int(codes, bits)
    dense = reference.dequantize_int(qweight, scales, bits, group, k)
    return to_lowbit_layout(qweight.to(device), scales.to(device), bits, group, k), dense.to(device)


def test_rejects_unsupported_weights_and_configs():
    w, _ = _weight(16, 256, 4, 64, 0)
    assert not wa16_decode.supports(w, 1)
    with pytest.raises(ValueError, match="multiples of 128"):
        wa16_decode.launch_decode(torch.zeros(1, 256, dtype=torch.bfloat16), w, None,
                                  GemmConfig(8, 16, 256, 1, 4, 1, cuda=True))
    w8, _ = _weight(16, 256, 8, 128, 0)
    assert not wa16_decode.supports(w8, 1)
    w4, _ = _weight(16, 256, 4, 128, 0)
    assert wa16_decode.supports(w4, 16) and not wa16_decode.supports(w4, 17)
    with pytest.raises(ValueError, match="8 or 16 tokens"):
        wa16_decode.launch_decode(torch.zeros(9, 256, dtype=torch.bfloat16), w4, None,
                                  GemmConfig(8, 16, 256, 1, 4, 1, cuda=True))


def _all_configs(m: int, w) -> list[GemmConfig]:
    return wa16_decode.decode_configs(m, w) if HAS_CUDA else [
        GemmConfig(8 if m <= 8 else 16, 16 * r, 128 * d, 1, warps, 1, cuda=True)
        for r, warps, d in ((1, 4, 2), (1, 4, 4), (1, 8, 2), (2, 4, 2), (2, 8, 1), (1, 8, 4))
        if m <= 8 or r * d <= 2]


@pytest.mark.parametrize("bits,half,per_channel,tokens,a8", [(4, False, False, 1, False), (6, False, False, 1, False),
                                                             (4, True, True, 16, False), (6, True, False, 16, False),
                                                             (4, False, False, 1, True), (6, True, True, 16, True)])
def test_cuda_source_compiles_with_nvcc(tmp_path, bits, half, per_channel, tokens, a8):
    """CI syntax check: nvcc compiles every config `decode_configs` offers, without register spills."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found: the CUDA source is compiled only where the CUDA toolkit is installed")
    w, _ = _weight(16, 256, bits, 128, 0)
    for cfg in {c._replace(split_k=1) for c in _all_configs(tokens, w)}:
        path = tmp_path / f"k{cfg.block_m}_{cfg.block_n}_{cfg.block_k}_{cfg.num_warps}.cu"
        path.write_text(wa16_decode.kernel_source(bits, half, per_channel, cfg, a8))
        proc = subprocess.run([nvcc, "-std=c++17", "-arch=sm_90a", "-cubin", "-Xptxas", "-v", "-o",
                               str(path.with_suffix(".cubin")), str(path)], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, f"nvcc failed for {cfg}:\n{proc.stderr[-3000:]}"
        assert " 0 bytes spill stores" in proc.stderr, f"{cfg} spills registers:\n{proc.stderr[-2000:]}"


def _check(y: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    y = y.float()
    assert torch.isfinite(y).all(), what
    err = float((y - ref).norm() / ref.norm())
    assert err < 8e-3, f"{what}: relative error {err:.3g}"


@cuda_only
@pytest.mark.parametrize("bits", [4, 6])
@pytest.mark.parametrize("n,k,group", [(100, 300, 128), (256, 1024, 256), (48, 640, 640), (4096, 4096, 128)])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_reference(bits, n, k, group, m, dtype):
    """Every config the autotuner may pick, on rows not a multiple of 16, K padded to 256 (300 -> 512), group
    256 and per-channel (group = K), with and without bias."""
    seed = int.from_bytes(os.urandom(4), "little")
    w, dense = _weight(n, k, bits, group, seed, "cuda")
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
    bias = torch.randn(n, device="cuda", generator=g).to(dtype)
    for use_bias in (False, True):
        b = bias if use_bias else None
        ref = torch.nn.functional.linear(x.float(), dense, None if b is None else b.float())
        for cfg in wa16_decode.decode_configs(m, w) + [GemmConfig(8 if m <= 8 else 16, 16, 128, 3, 4, 1, cuda=True)]:
            y = wa16_decode.launch_decode(x, w, b, cfg)
            assert y.dtype == dtype and y.shape == (m, n)
            _check(y, ref, f"seed {seed} {cfg} bias={use_bias}")


@cuda_only
def test_fused_views_and_cuda_graph():
    """Views of a load-time fused weight (scales a column slice of a wider matrix) under CUDA-graph replay, with
    split-K counters reused across replays."""
    seed = int.from_bytes(os.urandom(4), "little")
    parts = [_weight(n, 512, 4, 128, seed + i, "cuda") for i, n in enumerate((128, 64, 64))]
    fused, views = concat_rows([p[0] for p in parts])
    x = torch.randn(1, 512, device="cuda", dtype=torch.bfloat16)
    cfg = GemmConfig(8, 16, 128, 2, 4, 1, cuda=True)
    for view, (_, dense) in zip(views, parts):
        _check(wa16_decode.launch_decode(x, view, None, cfg), x.float() @ dense.T, f"seed {seed} view")
    graph = torch.cuda.CUDAGraph()
    static_x = x.clone()
    wa16_decode.launch_decode(static_x, fused, None, cfg)
    with torch.cuda.graph(graph):
        y = wa16_decode.launch_decode(static_x, fused, None, cfg)
    dense = torch.cat([p[1] for p in parts])
    for _ in range(3):
        static_x.copy_(torch.randn_like(static_x))
        graph.replay()
        _check(y, static_x.float() @ dense.T, f"seed {seed} graph")


@cuda_only
def test_wa16_gemm_dispatches_to_it():
    """With autotuning, wa16_gemm may pick the CUDA kernel; a CUDA config passed explicitly is run as given."""
    from lowc.kernels.wa16_gemm import wa16_gemm

    w, dense = _weight(256, 512, 6, 128, 1, "cuda")
    x = torch.randn(2, 512, device="cuda", dtype=torch.bfloat16)
    y = wa16_gemm(x, w, config=GemmConfig(8, 32, 256, 1, 4, 1, cuda=True))
    _check(y, x.float() @ dense.T, "explicit config")


@cuda_only
@pytest.mark.parametrize("bits", [4, 6])
@pytest.mark.parametrize("n,k,group", [(100, 300, 128), (4096, 4096, 128), (48, 640, 640)])
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("act_bits", [8, 6])
def test_a8_matches_wa8_reference(bits, n, k, group, m, act_bits):
    """int8 activation codes: integer products exact per 128-column chunk, then group, token scales (+ bias)."""
    from lowc.kernels.wa8_gemm import quantize_rows, wa8_reference

    seed = int.from_bytes(os.urandom(4), "little")
    w, _ = _weight(n, k, bits, group, seed, "cuda")
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    bias = torch.randn(n, device="cuda", generator=g).to(torch.bfloat16)
    xq, xs = quantize_rows(x, act_bits)
    qweight, scales = from_lowbit_layout(w)
    ref = wa8_reference(x, qweight, scales, bits, group, k, act_bits=act_bits, bias=bias).float()
    for cfg in wa16_decode.decode_configs(m, w):
        y = wa16_decode.launch_decode(xq, w, bias, cfg, x_scale=xs, out_dtype=torch.bfloat16)
        assert y.dtype == torch.bfloat16
        _check(y, ref, f"seed {seed} {cfg} A{act_bits}")
