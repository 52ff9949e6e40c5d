"""Fused decode-step kernels (lowc/kernels/decoder_ops.py) against the model code they replace (lowc.models.llama).

Without CUDA they run in Triton's CPU interpreter (TRITON_INTERPRET=1 from conftest.py), on fresh random inputs
that are column slices of a wider matrix, as the outputs of fused projections are.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not set", allow_module_level=True)

from lowc.kernels.decoder_ops import add_rms_norm, rope_to_cache, rope_to_int8_cache, silu_mul  # noqa: E402
from lowc.kernels.sage_attention import quantize_kv_cache  # noqa: E402
from lowc.models.llama import LlamaConfig, RMSNorm, RotaryEmbedding, apply_rope  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _generator() -> tuple[torch.Generator, int]:
    seed = int.from_bytes(os.urandom(4), "little")
    return torch.Generator().manual_seed(seed), seed


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("y_dtype", ["same", "fp32", None])
@pytest.mark.parametrize("h", [64, 70])
def test_add_rms_norm_matches_model(dtype, y_dtype, h):
    g, seed = _generator()
    x = torch.randn(3, 1, h, generator=g).to(dtype)
    wide = torch.randn(3, 1, 2 * h, generator=g) * 3
    y = None if y_dtype is None else wide[..., h:].to(dtype if y_dtype == "same" else torch.float32)
    norm = RMSNorm(h, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(h, generator=g) + 0.5)
    norm = norm.to(dtype)
    out, s = add_rms_norm(x.to(DEVICE), norm.weight.to(DEVICE), 1e-5, None if y is None else y.to(DEVICE))
    ref_s = x if y is None else (x.float() + y.float()).to(dtype)
    assert s.dtype == dtype and torch.equal(s.cpu(), ref_s), seed
    ref = norm(ref_s)
    assert out.shape == x.shape and out.dtype == dtype
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    assert torch.allclose(out.cpu().float(), ref.float(), rtol=tol, atol=tol), seed


@pytest.mark.parametrize("head_dim", [16, 12])
def test_rope_to_cache_matches_model(head_dim):
    g, seed = _generator()
    B, H, KV, L = 3, 4, 2, 10
    cfg = LlamaConfig(hidden_size=H * head_dim, intermediate_size=8, num_hidden_layers=1, num_attention_heads=H,
                      num_key_value_heads=KV, head_dim=head_dim, vocab_size=8, max_position_embeddings=L)
    positions = torch.tensor([5, 0, 9])
    qkv = torch.randn(B, (H + 2 * KV) * head_dim + 5, generator=g)  # a fused projection's output, one extra column
    q, k, v = qkv[:, :H * head_dim], qkv[:, H * head_dim:(H + KV) * head_dim], qkv[:, (H + KV) * head_dim:-5]
    cos, sin = RotaryEmbedding(cfg)(positions, torch.float32)
    kc_d = torch.zeros(B + 1, KV, L, head_dim, device=DEVICE)
    vc_d = torch.zeros(B + 1, KV, L, head_dim, device=DEVICE)
    q_out = rope_to_cache(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE),
                          positions.to(DEVICE), kc_d, vc_d)
    c4, s4 = cos[:, None, None, :], sin[:, None, None, :]
    ref_q = apply_rope(q.view(B, 1, H, head_dim).transpose(1, 2), c4, s4)[:, :, 0]
    ref_k = apply_rope(k.view(B, 1, KV, head_dim).transpose(1, 2), c4, s4)[:, :, 0]
    assert q_out.shape == (B, H, head_dim)
    assert torch.allclose(q_out.cpu(), ref_q, atol=1e-5), seed
    rows = torch.arange(B)
    kc, vc = kc_d.cpu(), vc_d.cpu()
    assert torch.allclose(kc[rows, :, positions], ref_k, atol=1e-5), seed
    assert torch.equal(vc[rows, :, positions], v.view(B, KV, head_dim)), seed
    written = torch.zeros(B + 1, KV, L, dtype=torch.bool)
    written[rows, :, positions] = True
    assert not kc[~written].any() and not vc[~written].any(), "wrote outside the new positions"


@pytest.mark.parametrize("dtype, head_dim", [(torch.float16, 16), (torch.bfloat16, 128), (torch.float16, 12)])
def test_rope_to_int8_cache_equals_rope_then_quantize(dtype, head_dim):
    """The fused INT8 write stores exactly what RoPE into a 16-bit row followed by `quantize_kv_cache` (with the
    slot's key mean) stores: codes and scales bit for bit, rotated queries equal, nothing written elsewhere."""
    g, seed = _generator()
    B, H, KV, L = 3, 4, 2, 10
    cfg = LlamaConfig(hidden_size=H * head_dim, intermediate_size=8, num_hidden_layers=1, num_attention_heads=H,
                      num_key_value_heads=KV, head_dim=head_dim, vocab_size=8, max_position_embeddings=L)
    positions = torch.tensor([5, 0, 9], device=DEVICE)
    qkv = (torch.randn(B, (H + 2 * KV) * head_dim + 5, generator=g) * 3).to(dtype).to(DEVICE)
    q, k, v = qkv[:, :H * head_dim], qkv[:, H * head_dim:(H + KV) * head_dim], qkv[:, (H + KV) * head_dim:-5]
    cos, sin = RotaryEmbedding(cfg)(positions.cpu(), dtype)
    cos, sin = cos.to(DEVICE), sin.to(DEVICE)
    k_mean = torch.randn(B + 1, KV, head_dim, generator=g).to(DEVICE)
    v[0, :head_dim] = 0  # an all-zero row: scale 1e-12, codes 0
    ties = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5, -3.5] * (head_dim // 8 + 1))[:head_dim]
    v[1, :head_dim] = ties.to(dtype)  # scale 1: exact halves, rounded to even as torch.round does
    codes = [torch.zeros(B + 1, KV, L, head_dim, dtype=torch.int8, device=DEVICE) for _ in range(2)]
    scales = [torch.zeros(B + 1, KV, L, device=DEVICE) for _ in range(2)]
    q_out = rope_to_int8_cache(q, k, v, cos, sin, positions, *codes, *scales, k_mean)

    staged = [torch.zeros(B, KV, 1, head_dim, dtype=dtype, device=DEVICE) for _ in range(2)]
    ref_q = rope_to_cache(q, k, v, cos, sin, torch.zeros_like(positions), *staged)
    ref = quantize_kv_cache(staged[0], staged[1], k_mean[:B])
    assert torch.equal(q_out, ref_q), seed
    rows = torch.arange(B, device=DEVICE)
    assert torch.equal(codes[0][rows, :, positions], ref.k[:, :, 0]), seed
    assert torch.equal(codes[1][rows, :, positions], ref.v[:, :, 0]), seed
    assert torch.equal(scales[0][rows, :, positions], ref.k_scale[:, :, 0]), seed
    assert torch.equal(scales[1][rows, :, positions], ref.v_scale[:, :, 0]), seed
    assert float(scales[1][0, 0, 5]) == pytest.approx(1e-12) and not codes[1][0, 0, 5].any()
    written = torch.zeros(B + 1, KV, L, dtype=torch.bool, device=DEVICE)
    written[rows, :, positions] = True
    assert not any(t[~written].any() for t in (*codes, *scales)), "wrote outside the new positions"
    with pytest.raises(ValueError, match="int8 codes"):
        rope_to_int8_cache(q, k, v, cos, sin, positions, *codes, *scales, k_mean.double())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_silu_mul_matches_model(dtype):
    g, seed = _generator()
    gu = (torch.randn(5, 2 * 1500, generator=g) * 4).to(dtype)
    gate, up = gu[:, :1500], gu[:, 1500:]
    y = silu_mul(gate.to(DEVICE), up.to(DEVICE))
    ref = F.silu(gate) * up
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    assert y.dtype == dtype and torch.allclose(y.cpu().float(), ref.float(), rtol=tol, atol=tol), seed
    with pytest.raises(ValueError, match="differ"):
        silu_mul(gate.to(DEVICE), up[:, :10].to(DEVICE))
