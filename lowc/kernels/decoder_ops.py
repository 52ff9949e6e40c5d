"""Fused Triton kernels for the glue of a Llama decode step: residual add + RMSNorm, RoPE + KV-cache write, SiLU·gate.

Between its GEMMs a decoder layer in plain torch runs some 60 tiny elementwise kernels per token (dtype casts, the
norm's pow/mean/rsqrt/mul, RoPE's chunk/neg/cat/mul/add, the cache scatter, SiLU and the gate product). In a
memory-bound decode step each costs a launch and a round trip through memory, together as much as the layer's
weight reads. These kernels do the same math in three launches per layer. They follow the model code in
`lowc.models.llama` (the reference they are tested against): the residual sum is rounded to the stream's dtype,
the norm runs in float32 and is rounded before the weight multiplies it; RoPE is computed in float32 from the
same cos/sin tables and rounded once (the reference rounds after each of its three bf16 operations, so the two
differ by at most an ulp or two).

Inputs may be column slices of a wider matrix (the outputs of a fused q/k/v or gate/up projection): the kernels
take row strides and need only the last dimension contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as [rows, features] with a contiguous last dimension (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


@triton.jit
def _add_rms_norm_kernel(x_ptr, y_ptr, w_ptr, sum_ptr, out_ptr, H, eps, stride_x, stride_y, stride_sum, stride_out,
                         HAS_Y: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_Y:
        x = (x.to(tl.float32) + tl.load(y_ptr + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32))
        x = x.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_sum + cols, x, mask=mask)
    h = x.to(tl.float32)
    h = h * tl.rsqrt(tl.sum(h * h, axis=0) / H + eps)
    h = h.to(out_ptr.dtype.element_ty).to(tl.float32) * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, h.to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(s), s) with s = x + y (just x without y), rounded to x's dtype: the residual stream after a block
    and the next RMSNorm of it, in one pass. y may be float32 (a split-K GEMM's accumulator) or x's dtype."""
    shape = x.shape
    x2 = _rows(x)
    rows, h = x2.shape
    out = torch.empty(rows, h, device=x.device, dtype=x.dtype)
    y2 = x2 if y is None else _rows(y)
    if y2.shape != x2.shape:
        raise ValueError(f"add_rms_norm: x {list(shape)} and y {list(y.shape)} differ")
    s = out if y is None else torch.empty(rows, h, device=x.device, dtype=x.dtype)  # not written without y
    block = triton.next_power_of_2(h)
    _add_rms_norm_kernel[(rows,)](x2, y2, weight, s, out, h, eps, x2.stride(0), y2.stride(0), s.stride(0),
                                  out.stride(0), HAS_Y=y is not None, BLOCK=block,
                                  num_warps=min(16, max(1, block // 512)))
    return out.view(shape), (x if y is None else s.view(shape))


@triton.jit
def _round_half_even(x):
    """x (|x| < 2^22, fp32) to the nearest integer, ties to even, as torch.round does: adding and taking away
    1.5 * 2^23 leaves no fraction bits for the sum to keep."""
    return (x + 12582912.0) - 12582912.0


@triton.jit
def _int8_row(x1, x2, mask, scale_ptr):
    """One token's row (halves x1, x2, fp32) as int8 codes round(x / s), s = absmax / 127 (at least 1e-12), stored
    at scale_ptr: `quantize_kv_cache` bit for bit."""
    amax = tl.maximum(tl.max(tl.where(mask, tl.abs(x1), 0.0), axis=0), tl.max(tl.where(mask, tl.abs(x2), 0.0), axis=0))
    scale = tl.maximum(tl.div_rn(amax, 127.0), 1e-12)
    tl.store(scale_ptr, scale)
    c1 = tl.clamp(_round_half_even(tl.div_rn(x1, scale)), -127.0, 127.0).to(tl.int8)
    c2 = tl.clamp(_round_half_even(tl.div_rn(x2, scale)), -127.0, 127.0).to(tl.int8)
    return c1, c2


@triton.jit
def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, q_out_ptr, kc_ptr, vc_ptr,
                       ks_ptr, vs_ptr, mean_ptr,
                       stride_q, stride_k, stride_v, stride_cs, stride_qo_b, stride_c_b, stride_c_h, stride_c_t,
                       stride_s_b, stride_s_h, stride_m_b, stride_m_h,
                       N_HEADS: tl.constexpr, N_KV: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr,
                       INT8: tl.constexpr):
    b = tl.program_id(0)
    head = tl.program_id(1)  # query heads, then key heads, then value heads
    offs = tl.arange(0, BLOCK)
    mask = offs < HALF
    pos = tl.load(pos_ptr + b)
    if head < N_HEADS + N_KV:
        if head < N_HEADS:
            src = q_ptr + b * stride_q + head * (2 * HALF)
        else:
            src = k_ptr + b * stride_k + (head - N_HEADS) * (2 * HALF)
        x1 = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + b * stride_cs + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + b * stride_cs + offs, mask=mask, other=0.0).to(tl.float32)
        r1 = x1 * c - x2 * s
        r2 = x2 * c + x1 * s
        if head < N_HEADS:
            dst = q_out_ptr + b * stride_qo_b + head * (2 * HALF)
            tl.store(dst + offs, r1.to(q_out_ptr.dtype.element_ty), mask=mask)
            tl.store(dst + HALF + offs, r2.to(q_out_ptr.dtype.element_ty), mask=mask)
        else:
            kv = head - N_HEADS
            dst = kc_ptr + b * stride_c_b + kv * stride_c_h + pos * stride_c_t
            if INT8:  # the key as the 16-bit model holds it, less the slot's prompt mean, quantized per token
                mean = mean_ptr + b * stride_m_b + kv * stride_m_h
                r1 = r1.to(q_out_ptr.dtype.element_ty).to(tl.float32) - tl.load(mean + offs, mask=mask, other=0.0)
                r2 = r2.to(q_out_ptr.dtype.element_ty).to(tl.float32) - tl.load(mean + HALF + offs, mask=mask,
                                                                                 other=0.0)
                c1, c2 = _int8_row(r1, r2, mask, ks_ptr + b * stride_s_b + kv * stride_s_h + pos)
                tl.store(dst + offs, c1, mask=mask)
                tl.store(dst + HALF + offs, c2, mask=mask)
            else:
                tl.store(dst + offs, r1.to(kc_ptr.dtype.element_ty), mask=mask)
                tl.store(dst + HALF + offs, r2.to(kc_ptr.dtype.element_ty), mask=mask)
    else:
        kv = head - N_HEADS - N_KV
        src = v_ptr + b * stride_v + kv * (2 * HALF)
        dst = vc_ptr + b * stride_c_b + kv * stride_c_h + pos * stride_c_t
        x1 = tl.load(src + offs, mask=mask, other=0.0)
        x2 = tl.load(src + HALF + offs, mask=mask, other=0.0)
        if INT8:
            scale_at = vs_ptr + b * stride_s_b + kv * stride_s_h + pos
            c1, c2 = _int8_row(x1.to(tl.float32), x2.to(tl.float32), mask, scale_at)
            tl.store(dst + offs, c1, mask=mask)
            tl.store(dst + HALF + offs, c2, mask=mask)
        else:
            tl.store(dst + offs, x1.to(vc_ptr.dtype.element_ty), mask=mask)
            tl.store(dst + HALF + offs, x2.to(vc_ptr.dtype.element_ty), mask=mask)


def _check_rope_inputs(name, k, v, cos, k_cache, v_cache):
    n_kv, head_dim = k_cache.shape[1], k_cache.shape[3]
    if k.shape[-1] != n_kv * head_dim or v.shape[-1] != n_kv * head_dim or cos.shape[-1] != head_dim:
        raise ValueError(f"{name}: q/k/v/cos widths do not match the cache's heads and head_dim")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError(f"{name}: the key and value caches need the same layout, head_dim contiguous")


def _launch_rope(q, k, v, cos, sin, positions, k_cache, v_cache, scales=None, k_mean=None) -> torch.Tensor:
    B = q.shape[0]
    n_kv, head_dim = k_cache.shape[1], k_cache.shape[3]
    n_heads = q.shape[-1] // head_dim
    q, k, v, cos, sin = (_rows(t) for t in (q, k, v, cos, sin))
    q_out = torch.empty(B, n_heads, head_dim, device=q.device, dtype=q.dtype)
    half = head_dim // 2
    int8 = scales is not None
    ks, vs = scales if int8 else (k_cache, v_cache)  # the cache itself as unused pointers when not INT8
    mean = k_mean if int8 else k_cache
    _rope_cache_kernel[(B, n_heads + 2 * n_kv)](
        q, k, v, cos, sin, positions, q_out, k_cache, v_cache, ks, vs, mean,
        q.stride(0), k.stride(0), v.stride(0), cos.stride(0), q_out.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        ks.stride(0), ks.stride(1), mean.stride(0), mean.stride(1),
        N_HEADS=n_heads, N_KV=n_kv, HALF=half, BLOCK=triton.next_power_of_2(half), INT8=int8, num_warps=1)
    return q_out


def rope_to_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """One new token per row: rotate q [B, H*D] and k [B, Hkv*D] by RoPE (HF half layout; cos/sin [B, D] as the
    model's rotary embedding gives them), write the rotated keys and the values v [B, Hkv*D] into the caches
    [>=B, Hkv, L, D] at each row's position, and return the rotated queries [B, H, D] in q's dtype."""
    _check_rope_inputs("rope_to_cache", k, v, cos, k_cache, v_cache)
    return _launch_rope(q, k, v, cos, sin, positions, k_cache, v_cache)


def rope_to_int8_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       positions: torch.Tensor, k_codes: torch.Tensor, v_codes: torch.Tensor,
                       k_scale: torch.Tensor, v_scale: torch.Tensor, k_mean: torch.Tensor) -> torch.Tensor:
    """`rope_to_cache` into an INT8 cache (SageAttention's format, `kv_cache.EngineKVCache`): the rotated key,
    rounded to q's dtype, less its slot's key mean `k_mean` [>=B, Hkv, D] (fp32), and the value are quantized per
    token as `quantize_kv_cache` does, bit for bit; codes go to k_codes / v_codes [>=B, Hkv, L, D] (int8) and the
    fp32 scales to k_scale / v_scale [>=B, Hkv, L] at each row's position. One launch instead of RoPE into a
    staging row followed by a dozen torch ops and four scatters."""
    _check_rope_inputs("rope_to_int8_cache", k, v, cos, k_codes, v_codes)
    if k_codes.dtype != torch.int8 or k_scale.stride() != v_scale.stride() or k_scale.stride(-1) != 1 \
            or k_mean.stride(-1) != 1 or k_mean.dtype != torch.float32:
        raise ValueError("rope_to_int8_cache: int8 codes, equal-layout fp32 scales and a contiguous fp32 key mean")
    return _launch_rope(q, k, v, cos, sin, positions, k_codes, v_codes, (k_scale, v_scale), k_mean)


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, N, stride_g, stride_u, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    # the reference rounds silu(g) to the activation dtype before the product
    a = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (a * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """silu(gate) * up, both [..., I] (float32 accumulators or 16-bit); returns out_dtype (default gate's)."""
    shape = gate.shape
    g, u = _rows(gate), _rows(up)
    if g.shape != u.shape:
        raise ValueError(f"silu_mul: gate {list(gate.shape)} and up {list(up.shape)} differ")
    rows, n = g.shape
    out = torch.empty(rows, n, device=gate.device, dtype=out_dtype or gate.dtype)
    block = min(1024, triton.next_power_of_2(n))
    _silu_mul_kernel[(rows, triton.cdiv(n, block))](g, u, out, n, g.stride(0), u.stride(0), out.stride(0),
                                                     BLOCK=block, num_warps=4)
    return out.view(shape)
