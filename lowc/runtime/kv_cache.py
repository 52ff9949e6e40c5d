"""The generation engine's preallocated KV cache: floats as they are, or INT8 with per-token scales.

The INT8 form is SageAttention's cache format (`kernels.sage_attention.QuantizedKVCache`): per layer, codes
k = round((K − k_mean) / k_scale) and v = round(V / v_scale) [slots, Hkv, L, D] with fp32 scales per token
[slots, Hkv, L] and the keys' mean over the prompt per slot and head [slots, Hkv, D], set at prefill and used for
every token appended after it. Per-token scales let tokens be appended without touching the old ones; subtracting
a per-(slot, head) mean from every key shifts all of a query's scores by the same amount, which softmax ignores,
so the cache is read without adding it back. At head_dim 128 it takes 0.52x the bytes of a bf16 cache.
"""

from __future__ import annotations

import torch

from ..errors import UsageError
from ..kernels.sage_attention import QuantizedKVCache, quantize_kv_cache

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def bytes_per_token(n_layers: int, n_kv: int, head_dim: int, dtype: torch.dtype) -> int:
    """Cache bytes one token of one slot takes over all layers (keys and values, with INT8 scales)."""
    per_head = head_dim + 4 if dtype == torch.int8 else head_dim * dtype.itemsize
    return 2 * n_layers * n_kv * per_head


class EngineKVCache:
    """Keys and values of `slots` sequences of up to `length` tokens for every layer, in `dtype` (a float dtype,
    or torch.int8 for the quantized form). Rows are written at prefill (`write_prompt`) and one token per decode
    step (`write_tokens`) and read back in the compute dtype (`read`)."""

    def __init__(self, n_layers: int, slots: int, n_kv: int, length: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        if dtype not in (*FLOAT_DTYPES, torch.int8):
            raise UsageError(f"cache_dtype: the KV cache holds float32, float16, bfloat16 or int8 (quantized, with "
                             f"scales) values, got {dtype}")
        self.dtype, self.int8 = dtype, dtype == torch.int8
        self._slots = torch.arange(slots, device=device)  # row indices for one-token writes, sliced per batch
        shape = (slots, n_kv, length, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        if self.int8:
            self.k_scale = [torch.zeros(shape[:3], dtype=torch.float32, device=device) for _ in range(n_layers)]
            self.v_scale = [torch.zeros(shape[:3], dtype=torch.float32, device=device) for _ in range(n_layers)]
            self.k_mean = [torch.zeros(slots, n_kv, head_dim, dtype=torch.float32, device=device)
                           for _ in range(n_layers)]

    def _per_token(self) -> list[list[torch.Tensor]]:
        """Every per-layer tensor with a token axis (at dim 2), in a fixed order."""
        return [self.k, self.v, *((self.k_scale, self.v_scale) if self.int8 else ())]

    @property
    def nbytes(self) -> int:
        tensors = [t for group in self._per_token() for t in group] + (self.k_mean if self.int8 else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def write_prompt(self, layer: int, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a prompt's keys and values [Hkv, T, D] in `slot` (INT8: the key mean is taken over these T)."""
        t = k.shape[1]
        if not self.int8:
            self.k[layer][slot, :, :t] = k
            self.v[layer][slot, :, :t] = v
            return
        q = quantize_kv_cache(k[None], v[None])
        self.k[layer][slot, :, :t], self.v[layer][slot, :, :t] = q.k[0], q.v[0]
        self.k_scale[layer][slot, :, :t], self.v_scale[layer][slot, :, :t] = q.k_scale[0], q.v_scale[0]
        self.k_mean[layer][slot] = q.k_mean[0]

    def write_tokens(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one token per slot 0..B-1: keys and values [B, Hkv, D] at `positions` [B]."""
        rows = self._slots[: k.shape[0]]
        if not self.int8:
            self.k[layer][rows, :, positions] = k.to(self.dtype)
            self.v[layer][rows, :, positions] = v.to(self.dtype)
            return
        q = quantize_kv_cache(k[:, :, None], v[:, :, None], self.k_mean[layer][: k.shape[0]])
        self.k[layer][rows, :, positions], self.v[layer][rows, :, positions] = q.k[:, :, 0], q.v[:, :, 0]
        self.k_scale[layer][rows, :, positions] = q.k_scale[:, :, 0]
        self.v_scale[layer][rows, :, positions] = q.v_scale[:, :, 0]

    def read(self, layer: int, slots: slice | int, length: int,
             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `slots` (a slice of slots, or one slot), first `length` tokens, in `dtype` (INT8:
        dequantized; keys less their mean, which attention does not see)."""
        k, v = self.k[layer][slots, ..., :length, :], self.v[layer][slots, ..., :length, :]
        if not self.int8:
            return k.to(dtype), v.to(dtype)
        ks, vs = self.k_scale[layer][slots, ..., :length], self.v_scale[layer][slots, ..., :length]
        return (k.float() * ks[..., None]).to(dtype), (v.float() * vs[..., None]).to(dtype)

    def sage_view(self, layer: int, batch: int, length: int):
        """Slots 0..batch-1, first `length` tokens, as `sage_decode` takes them: (keys, values) views of a float
        cache, or a `QuantizedKVCache` over the INT8 codes, scales and key means (no copy of the codes)."""
        k, v = self.k[layer][:batch, :, :length], self.v[layer][:batch, :, :length]
        if not self.int8:
            return k, v
        return QuantizedKVCache(k, self.k_scale[layer][:batch, :, :length], v, self.v_scale[layer][:batch, :, :length],
                                self.k_mean[layer][:batch])

    def snapshot(self, slots: int, position: int) -> list[torch.Tensor]:
        """Copies of what slots 0..slots-1 hold at `position` (a CUDA-graph warm-up writes there)."""
        return [t[:slots, :, position].clone() for group in self._per_token() for t in group]

    def restore(self, saved: list[torch.Tensor], position: int) -> None:
        it = iter(saved)
        for group in self._per_token():
            for t in group:
                s = next(it)
                t[: s.shape[0], :, position] = s

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy slot `src`'s first `length` tokens (and INT8 key mean) to slot `dst`."""
        for group in self._per_token():
            for t in group:
                t[dst, :, :length] = t[src, :, :length]
        if self.int8:
            for m in self.k_mean:
                m[dst] = m[src]


__all__ = ["EngineKVCache", "bytes_per_token"]
