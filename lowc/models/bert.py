"""BERT encoder (HF `BertModel` without the pooler), e.g. sentence-transformers all-MiniLM-L6-v2.

Absolute position and token-type embeddings, post-LayerNorm residual blocks, exact (erf) GELU. Module names follow
the HF state dict so checkpoints load by name; projections are called through their submodules so the runtime can
swap them for packed-weight modules. No buffers (position ids are made in `forward`), so meta construction followed
by `load_state_dict(..., assign=True)` is enough.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, LowcError
from .llama import _get, _size


@dataclass
class BertConfig:
    """The subset of an HF BERT config.json that the computation depends on."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, cfg: dict, where: str = "config.json") -> "BertConfig":
        act = cfg.get("hidden_act", "gelu")
        if act != "gelu":
            raise CheckpointError(f"{where}: unsupported hidden_act '{act}' for a BERT model (supported: gelu)")
        pos = cfg.get("position_embedding_type", "absolute")
        if pos not in (None, "absolute"):
            raise CheckpointError(f"{where}: unsupported position_embedding_type '{pos}' (supported: absolute)")
        hidden = _get(cfg, "hidden_size", int, where)
        heads = _get(cfg, "num_attention_heads", int, where)
        if hidden <= 0 or heads <= 0 or hidden % heads:
            raise CheckpointError(f"{where}: hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads})")
        return cls(
            vocab_size=_size(cfg, "vocab_size", where),
            hidden_size=hidden,
            num_hidden_layers=_size(cfg, "num_hidden_layers", where),
            num_attention_heads=heads,
            intermediate_size=_size(cfg, "intermediate_size", where),
            max_position_embeddings=_size(cfg, "max_position_embeddings", where, 512),
            type_vocab_size=_size(cfg, "type_vocab_size", where, 2),
            layer_norm_eps=float(_get(cfg, "layer_norm_eps", (int, float), where, 1e-12)),
            pad_token_id=cfg.get("pad_token_id", 0),
        )


class BertEmbeddings(nn.Module):
    """word + absolute position + token type embeddings, then LayerNorm."""

    def __init__(self, config: BertConfig):
        super().__init__()
        h = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, h)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, h)
        self.LayerNorm = nn.LayerNorm(h, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x + self.position_embeddings(positions)[None])


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        h = config.hidden_size
        self.n_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.value = nn.Linear(h, h)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, H = x.shape
        q, k, v = (p(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for p in (self.query, self.key, self.value))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return y.transpose(1, 2).reshape(B, T, H)


class BertSelfOutput(nn.Module):
    """Attention output projection, then LayerNorm(proj + residual)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, y: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(y) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact erf GELU, as HF "gelu"


class BertOutput(nn.Module):
    """FFN output projection, then LayerNorm(proj + residual)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, mask)
        return x


class BertModel(nn.Module):
    """`forward(ids, attention_mask, token_type_ids)` -> last hidden state [B, T, H]; `embed` -> mean-pooled [B, H]."""

    kind = "encoder"

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    @classmethod
    def from_hf(cls, cfg: dict) -> "BertModel":
        return cls(BertConfig.from_hf(cfg))

    def tie_weights(self) -> None:
        """Nothing is tied in BERT without its MLM head; present so loaders can treat every model alike."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise LowcError(f"expected input_ids of shape [batch, tokens], got {list(input_ids.shape)}")
        T = input_ids.shape[1]
        if T > self.config.max_position_embeddings:
            raise LowcError(f"{T} tokens exceed the model's max_position_embeddings ({self.config.max_position_embeddings})")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        mask = None
        if attention_mask is not None:
            # Additive mask over keys [B, 1, 1, T]: 0 where attended, dtype-min where padded (as HF does, so a row
            # of all padding stays finite instead of NaN).
            keep = attention_mask.to(torch.bool)[:, None, None, :]
            mask = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill(~keep, torch.finfo(x.dtype).min)
        return self.encoder(x, mask)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Sentence embeddings [B, H]: mean of the last hidden states over non-padded tokens (not normalised)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self(input_ids, attention_mask)
        m = attention_mask.to(h.dtype)[:, :, None]
        return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
