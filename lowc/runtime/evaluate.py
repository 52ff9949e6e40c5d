"""Quality metrics: perplexity for decoders, embedding cosine similarity against a reference for encoders."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..console import progress_bar
from ..errors import UsageError


def read_lines(path: str | Path) -> list[str]:
    """Non-empty stripped lines of a text file (the evaluation protocol's unit of text)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--data: no such file {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--data: cannot read {path} as UTF-8 text ({e})") from None
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise UsageError(f"--data: {path} has no text")
    return lines


def perplexity_ids(tokenizer, lines: list[str], max_tokens: int | None, chunk: int = 512) -> list[int]:
    """Each line encoded without special tokens and followed by EOS, concatenated, cut to the first max_tokens."""
    if not tokenizer.eos_ids:
        raise UsageError("perplexity needs an eos_token_id in config.json or generation_config.json")
    eos = tokenizer.eos_ids[0]
    ids: list[int] = []
    for start in range(0, len(lines), chunk):
        for encoded in tokenizer.encode_batch(lines[start:start + chunk], special_tokens=False):
            ids.extend(encoded)
            ids.append(eos)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return ids[:max_tokens] if max_tokens is not None else ids


@torch.inference_mode()
def perplexity(model: torch.nn.Module, ids: list[int], seqlen: int, batch_size: int = 8,
               progress: bool = True) -> dict:
    """exp(mean next-token NLL) over non-overlapping windows of `seqlen` tokens (a shorter last window counts too)."""
    if seqlen < 2:
        raise UsageError(f"--seqlen: expected at least 2, got {seqlen}")
    max_pos = model.config.max_position_embeddings
    if seqlen > max_pos:
        raise UsageError(f"--seqlen: {seqlen} is longer than the model's max_position_embeddings ({max_pos})")
    if len(ids) < 2:
        raise UsageError("--data: fewer than 2 tokens to evaluate")
    device = next(model.parameters()).device
    tokens = torch.tensor(ids, dtype=torch.long)
    windows = [tokens[i:i + seqlen] for i in range(0, len(ids), seqlen)]
    windows = [w for w in windows if len(w) >= 2]
    nll, count = 0.0, 0
    with progress_bar(progress) as bar:
        task = bar.add_task("perplexity", total=len(windows))
        i = 0
        while i < len(windows):
            group = [w for w in windows[i:i + batch_size] if len(w) == len(windows[i])]
            batch = torch.stack(group).to(device)
            logits = model(batch).float()
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
            nll += float(loss)
            count += batch[:, 1:].numel()
            i += len(group)
            bar.advance(task, len(group))
    return {"perplexity": math.exp(nll / count), "tokens": len(ids), "predicted_tokens": count,
            "seqlen": seqlen, "windows": len(windows)}


@torch.inference_mode()
def sentence_embeddings(model: torch.nn.Module, tokenizer, texts: list[str], max_length: int,
                        batch_size: int = 32) -> torch.Tensor:
    """Mean-pooled embeddings [N, H] of texts encoded with special tokens, truncated to max_length."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        encoded = [ids[:max_length] for ids in tokenizer.encode_batch(texts[start:start + batch_size])]
        width = max(len(e) for e in encoded)
        ids = torch.zeros(len(encoded), width, dtype=torch.long)
        mask = torch.zeros(len(encoded), width, dtype=torch.long)
        for row, e in enumerate(encoded):
            ids[row, :len(e)] = torch.tensor(e)
            mask[row, :len(e)] = 1
        out.append(model.embed(ids.to(device), mask.to(device)).float().cpu())
    return torch.cat(out)


def embedding_cosine(model: torch.nn.Module, reference: torch.nn.Module, texts: list[str],
                     max_length: int = 256) -> dict:
    """Cosine similarity between the embeddings of `model` and `reference` on the same texts."""
    tok = model.tokenizer or reference.tokenizer
    if tok is None:
        raise UsageError("encoder evaluation needs a tokenizer.json")
    a = sentence_embeddings(model, tok, texts, max_length)
    b = sentence_embeddings(reference, tok, texts, max_length)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "texts": len(texts)}


def encoder_texts(lines: list[str], tokenizer, max_tokens: int | None, max_length: int) -> list[str]:
    """Lines taken in order until max_tokens (counted after truncation to max_length) are reached."""
    if max_tokens is None:
        return lines
    texts, total = [], 0
    for line in lines:
        if total >= max_tokens:
            break
        texts.append(line)
        total += min(max_length, len(tokenizer.encode(line, special_tokens=True)))
    return texts
