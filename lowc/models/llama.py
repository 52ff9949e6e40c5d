"""Llama-family decoder (Llama 2/3 and friends), numerically matching Hugging Face `LlamaForCausalLM`.

Module and attribute names follow the HF state dict (`model.layers.0.self_attn.q_proj.weight`, ...) so checkpoints
load by name. Every projection is called through its submodule, so the runtime can swap an `nn.Linear` for a
packed-weight module with the same `forward(x) -> y`.

The model holds no buffers: RoPE angles are computed in `forward` on the input's device, so a model built under
`torch.device("meta")` needs only `load_state_dict(..., assign=True)` and `tie_weights()` to be ready.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, LowcError

ROPE_TYPES = ("default", "linear", "llama3")
_NUM = (int, float)


def _get(cfg: dict, key: str, kind: type | tuple[type, ...], where: str, default=...):
    """cfg[key] checked against `kind`; a missing (or null) key gives `default`, or a CheckpointError without one."""
    value = cfg.get(key)
    if value is None:
        if default is ...:
            raise CheckpointError(f"{where}: missing '{key}'")
        return default
    if isinstance(value, bool) or not isinstance(value, kind):  # bool is an int subclass: never a size
        raise CheckpointError(f"{where}: '{key}' has an unexpected value {value!r}")
    return value


def _size(cfg: dict, key: str, where: str, default=...) -> int:
    """A size cfg[key] (or `default`): a positive int, else a CheckpointError (a 0 or negative vocabulary, width
    or layer count would only fail later, deep inside torch)."""
    value = _get(cfg, key, int, where, default)
    if value <= 0:
        raise CheckpointError(f"{where}: '{key}' must be a positive integer, got {value}")
    return value


@dataclass
class LlamaConfig:
    """The subset of an HF Llama config.json that the computation depends on."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0  # linear and llama3
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_original_max_position_embeddings: int = 8192  # llama3

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.eos_token_id
        return () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)

    @classmethod
    def from_hf(cls, cfg: dict, where: str = "config.json") -> "LlamaConfig":
        """Read an HF config dict. RoPE may be spelled `rope_parameters` (transformers 5) or top-level `rope_theta`
        plus an optional `rope_scaling` dict (older files). Unsupported settings raise CheckpointError."""
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise CheckpointError(f"{where}: unsupported hidden_act '{act}' for a Llama model (supported: silu)")
        hidden = _get(cfg, "hidden_size", int, where)
        heads = _get(cfg, "num_attention_heads", int, where)
        kv_heads = _get(cfg, "num_key_value_heads", int, where, heads)
        if min(hidden, heads, kv_heads) <= 0 or heads % kv_heads:
            raise CheckpointError(f"{where}: num_attention_heads ({heads}) must be a positive multiple of "
                                  f"num_key_value_heads ({kv_heads})")
        if cfg.get("head_dim") is None and hidden % heads:
            raise CheckpointError(f"{where}: hidden_size ({hidden}) is not divisible by num_attention_heads ({heads}) "
                                  "and no head_dim is given")
        head_dim = _get(cfg, "head_dim", int, where, hidden // heads)
        if head_dim <= 0 or head_dim % 2:
            raise CheckpointError(f"{where}: head_dim must be positive and even for RoPE, got {head_dim}")
        eos = cfg.get("eos_token_id")
        if eos is not None and not (isinstance(eos, int) or (isinstance(eos, list) and all(isinstance(e, int) for e in eos))):
            raise CheckpointError(f"{where}: 'eos_token_id' must be an int or a list of ints, got {eos!r}")

        # RoPE: the transformers-5 dict wins; otherwise top-level rope_theta plus an optional rope_scaling dict.
        rope = cfg.get("rope_parameters")
        if rope is None:
            rope = cfg.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise CheckpointError(f"{where}: 'rope_parameters' / 'rope_scaling' must be an object, got {rope!r}")
        rope = {"rope_theta": cfg.get("rope_theta"), **rope}
        rope_type = rope.get("rope_type") or rope.get("type") or "default"
        if rope_type not in ROPE_TYPES:
            raise CheckpointError(f"unsupported rope_type '{rope_type}' in {where} (supported: {', '.join(ROPE_TYPES)})")
        rwhere = f"{where}: rope parameters"
        extra = {}
        if rope_type in ("linear", "llama3"):
            extra["rope_factor"] = float(_get(rope, "factor", _NUM, rwhere))
        if rope_type == "llama3":
            extra["rope_low_freq_factor"] = float(_get(rope, "low_freq_factor", _NUM, rwhere))
            extra["rope_high_freq_factor"] = float(_get(rope, "high_freq_factor", _NUM, rwhere))
            extra["rope_original_max_position_embeddings"] = _get(rope, "original_max_position_embeddings", int, rwhere)
            if extra["rope_high_freq_factor"] <= extra["rope_low_freq_factor"]:
                raise CheckpointError(f"{rwhere}: llama3 RoPE needs high_freq_factor > low_freq_factor")
        return cls(
            hidden_size=hidden,
            intermediate_size=_size(cfg, "intermediate_size", where),
            num_hidden_layers=_size(cfg, "num_hidden_layers", where),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=_size(cfg, "vocab_size", where),
            rms_norm_eps=float(_get(cfg, "rms_norm_eps", _NUM, where, 1e-6)),
            max_position_embeddings=_size(cfg, "max_position_embeddings", where, 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=cfg.get("pad_token_id"),
            rope_theta=float(_get(rope, "rope_theta", _NUM, rwhere, 10000.0)),
            rope_type=rope_type,
            **extra,
        )


class KVCache:
    """Preallocated keys/values per layer, each `[B, n_kv_heads, max_len, head_dim]`; `length` tokens are filled.

    The model writes new tokens at `length` in every layer and advances `length` once at the end of its forward.
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.batch, self.max_len, self.length = batch, max_len, 0

    def reset(self) -> None:
        """Forget the stored tokens (the memory is reused)."""
        self.length = 0

    def check(self, batch: int, new_tokens: int) -> None:
        """Raise LowcError unless `new_tokens` more tokens for a batch of `batch` fit."""
        if batch != self.batch:
            raise LowcError(f"KV cache was made for batch {self.batch}, got an input of batch {batch}")
        if self.length + new_tokens > self.max_len:
            raise LowcError(f"KV cache overflow: {self.length} cached + {new_tokens} new tokens > max_len {self.max_len}")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new k/v `[B, n_kv, T, D]` after the cached tokens; return all keys/values so far (views)."""
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and cast back to the input dtype before the weight (as HF does)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE angles for given positions. No buffers: recomputed per call (cheap) on the positions' device."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config

    def inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        """Per-pair inverse frequencies [head_dim/2] in float32, with linear or llama3 scaling applied."""
        c = self.config
        dim = c.head_dim
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
        if c.rope_type == "linear":
            inv = inv / c.rope_factor
        elif c.rope_type == "llama3":
            # Long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated.
            old_len = c.rope_original_max_position_embeddings
            lo, hi = c.rope_low_freq_factor, c.rope_high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > old_len / lo, inv / c.rope_factor, inv)
            smooth = (old_len / wavelen - lo) / (hi - lo)
            smoothed = (1 - smooth) * scaled / c.rope_factor + smooth * scaled
            medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
            inv = torch.where(medium, smoothed, scaled)
        return inv

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [T, head_dim] for integer positions [T] (angles in float32, then cast to dtype)."""
        freqs = positions.float()[:, None] * self.inv_freq(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, D] by cos/sin [T, D], HF "half" layout: dimension i pairs with i + D/2."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with RoPE and an optional KV cache."""

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=c.attention_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        start = 0
        if cache is not None:
            start = cache.length
            k, v = cache.update(self.layer_idx, k.to(cache.k[0].dtype), v.to(cache.v[0].dtype))
            k, v = k.to(q.dtype), v.to(q.dtype)
        mask = None
        if T > 1 and start > 0:
            # Query i sits at position start + i and sees every key up to and including itself
            # (SDPA's is_causal aligns top-left, which is only right when nothing is cached).
            q_pos = torch.arange(start, start + T, device=x.device)
            mask = torch.arange(start + T, device=x.device)[None, :] <= q_pos[:, None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=T > 1 and start == 0,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=config.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=config.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Embeddings, decoder layers and the final norm (the `model.` prefix of HF names)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final-normed hidden states [B, T, hidden]; with a cache, appends the T tokens to it."""
        if input_ids.dim() != 2:
            raise LowcError(f"expected input_ids of shape [batch, tokens], got {list(input_ids.shape)}")
        B, T = input_ids.shape
        start = 0
        if cache is not None:
            cache.check(B, T)
            start = cache.length
        if start + T > self.config.max_position_embeddings:
            raise LowcError(f"positions up to {start + T} exceed the model's max_position_embeddings "
                            f"({self.config.max_position_embeddings})")
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(torch.arange(start, start + T, device=input_ids.device), x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, cache)
        if cache is not None:
            cache.length += T
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """Decoder plus LM head: `forward(input_ids, cache=None)` returns float32 logits [B, T, vocab]."""

    kind = "decoder"

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    @classmethod
    def from_hf(cls, cfg: dict) -> "LlamaForCausalLM":
        return cls(LlamaConfig.from_hf(cfg))

    def tie_weights(self) -> None:
        """Share lm_head.weight with the embedding when the config ties them. Call again after
        `load_state_dict(..., assign=True)`, which replaces the embedding Parameter. No-op for a swapped lm_head."""
        if self.config.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):
            self.lm_head.weight = self.model.embed_tokens.weight

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `max_len` tokens (default: the embedding's dtype/device)."""
        if batch < 1 or max_len < 1:
            raise LowcError(f"a KV cache needs batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}")
        if max_len > self.config.max_position_embeddings:
            raise LowcError(f"KV cache max_len {max_len} exceeds the model's max_position_embeddings "
                            f"({self.config.max_position_embeddings})")
        w = self.model.embed_tokens.weight
        c = self.config
        return KVCache(c.num_hidden_layers, batch, c.num_key_value_heads, max_len, c.head_dim,
                       dtype=dtype or w.dtype, device=device if device is not None else w.device)

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final-normed hidden states [B, T, hidden] (the LM head's input)."""
        return self.model(input_ids, cache)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        return self.lm_head(self.model(input_ids, cache)).float()
