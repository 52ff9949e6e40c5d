"""Text generation with a KV cache: greedy or temperature / top-p sampling, streaming tokens as they come."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..errors import LowcError, UsageError


@dataclass
class SamplingConfig:
    """How the next token is picked: temperature 0 is greedy; top_p < 1 keeps the smallest nucleus of mass top_p."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_at_eos: bool = True

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens: expected a positive number, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UsageError(f"--temperature: expected >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"--top-p: expected a value in (0, 1], got {self.top_p}")


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Pick next tokens [B] from last-position logits [B, V]."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= cfg.top_p  # mass before this token already >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_ids(model: torch.nn.Module, prompt_ids: list[int], cfg: SamplingConfig) -> Iterator[int]:
    """Yield generated token ids one by one (prefill once, then one cached decode step per token)."""
    cfg.validate()
    if not prompt_ids:
        raise UsageError("--prompt: the prompt is empty after tokenization")
    if getattr(model, "kind", "decoder") != "decoder":
        raise UsageError("generation needs a decoder model; this one is an encoder (use `lowc eval`)")
    max_pos = model.config.max_position_embeddings
    if len(prompt_ids) >= max_pos:
        raise UsageError(f"--prompt: {len(prompt_ids)} tokens, the model handles at most {max_pos - 1} before generating")
    total = min(max_pos, len(prompt_ids) + cfg.max_new_tokens)
    device = next(model.buffers(), next(model.parameters())).device
    cache = model.new_cache(batch=1, max_len=total, device=device)
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    eos = set(getattr(getattr(model, "tokenizer", None), "eos_ids", []) or [])
    ids = torch.tensor([prompt_ids], device=device)
    logits = model(ids, cache=cache)
    for _ in range(total - len(prompt_ids)):
        nxt = sample_next(logits[:, -1], cfg, generator)
        token = int(nxt.item())
        if cfg.stop_at_eos and token in eos:
            return
        yield token
        if cache.length >= total:
            return
        logits = model(nxt.view(1, 1), cache=cache)


def generate(model: torch.nn.Module, prompt: str, cfg: SamplingConfig | None = None,
             on_text: Callable[[str], None] | None = None) -> str:
    """Generate a continuation of `prompt` and return it.

    `on_text` receives each new piece of the continuation as soon as it decodes, spaced exactly as the tokenizer
    joins it to what came before (pieces are diffs of the decoded prompt + continuation, so subwords attach).
    """
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise LowcError("this model has no tokenizer.json; generation needs one")
    cfg = cfg or SamplingConfig()
    prompt_ids = tok.encode_prompt(prompt)
    prefix = tok.decode(prompt_ids)
    out: list[int] = []
    shown = prefix
    for token in generate_ids(model, prompt_ids, cfg):
        out.append(token)
        text = tok.decode(prompt_ids + out)
        if text.startswith(shown) and len(text) > len(shown):
            if on_text is not None:
                on_text(text[len(shown):])
            shown = text
    text = tok.decode(prompt_ids + out)
    if on_text is not None and text.startswith(shown) and text != shown:
        on_text(text[len(shown):])
    return text[len(prefix):] if text.startswith(prefix) else tok.decode(out)
