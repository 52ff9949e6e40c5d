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

from lowc.kernels.decoder_ops import add_rms_norm, rope_to_cache, silu_mul  # noqa: E402
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
