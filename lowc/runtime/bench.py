"""`lowc bench`: prefill and decode throughput, time to first token and GPU memory of a model through the engine.

Everything runs through `Engine`, the code path `lowc serve` uses: prefill is the engine's prompt pass (keys and
values written into the cache, logits of the last position only), decode is its batched step (CUDA graphs on GPU
unless disabled). Prompts are random token ids (throughput does not depend on the text). Works on artifacts and
on plain HF checkpoints (the dense baseline), on CPU too (slowly; shapes are capped by the model's positions).
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Sequence

import torch

from ..errors import UsageError
from .engine import Engine, SamplingParams


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prompt(vocab: int, length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (length,), generator=g).tolist()


def _release() -> None:
    """Free a finished engine's KV cache and CUDA graphs (they reference each other: needs the cyclic GC)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def module_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer (weights as they sit in memory: packed ones packed), tied ones once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


@torch.inference_mode()
def bench_prefill(model: torch.nn.Module, lengths: Sequence[int], repeats: int = 3,
                  attention: str = "sdpa", cache_dtype: torch.dtype | None = None) -> list[dict]:
    """Prefill tokens/s of one prompt per length (median of `repeats` after one warm-up)."""
    max_pos = model.config.max_position_embeddings
    lengths = sorted({min(n, max_pos) for n in lengths})
    engine = Engine(model, max_batch=1, max_seq_len=max(max(lengths), 2), cuda_graphs=False, attention=attention,
                    cache_dtype=cache_dtype)
    rows = []
    for n in lengths:
        ids = torch.tensor(_prompt(model.config.vocab_size, n, n), device=engine.device)
        engine._prefill_forward(ids, 0)
        times = []
        for _ in range(repeats):
            _sync(engine.device)
            t0 = time.perf_counter()
            engine._prefill_forward(ids, 0)
            _sync(engine.device)
            times.append(time.perf_counter() - t0)
        t = sorted(times)[len(times) // 2]
        rows.append({"case": f"prefill {n} tokens", "metric": "tokens/s", "value": n / t, "ms": t * 1e3})
    del engine
    _release()
    return rows


def bench_decode(model: torch.nn.Module, batches: Sequence[int], prompt_tokens: int = 128, new_tokens: int = 64,
                 cuda_graphs: bool | None = None, attention: str = "sdpa", fuse: bool | None = None,
                 cache_dtype: torch.dtype | None = None) -> list[dict]:
    """Decode tokens/s with `batch` requests decoding together (a warm-up round first captures CUDA graphs);
    `fuse` and `cache_dtype` as in `Engine` (None: the fused decode kernels on CUDA; the model's dtype)."""
    max_pos = model.config.max_position_embeddings
    new_tokens = max(2, min(new_tokens, max_pos // 2))
    prompt_tokens = max(1, min(prompt_tokens, max_pos - new_tokens))
    rows = []
    for batch in batches:
        engine = Engine(model, max_batch=batch, max_seq_len=prompt_tokens + new_tokens, cuda_graphs=cuda_graphs,
                        attention=attention, fuse=fuse, cache_dtype=cache_dtype)
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        for round_ in range(2):  # warm-up, measured
            for i in range(batch):
                engine.submit(_prompt(model.config.vocab_size, prompt_tokens, 1000 + i), params)
            engine.step()  # admits (prefills) every request, first decode step
            _sync(engine.device)
            steps, tokens = engine.stats["decode_steps"], engine.stats["decode_tokens"]
            t0 = time.perf_counter()
            engine.run_until_idle()
            _sync(engine.device)
            elapsed = time.perf_counter() - t0
            steps, tokens = engine.stats["decode_steps"] - steps, engine.stats["decode_tokens"] - tokens
        rows.append({"case": f"decode batch {batch}", "metric": "tokens/s", "value": tokens / elapsed,
                     "ms_per_step": elapsed / max(steps, 1) * 1e3,
                     "graphs": engine.graphs is not None and not engine.graphs.failed})
        del engine
        _release()
    return rows


def bench_ttft(model: torch.nn.Module, prompt_tokens: int = 512, repeats: int = 3, attention: str = "sdpa",
               cache_dtype: torch.dtype | None = None) -> dict:
    """Time from submit to the first generated token for one request alone (median)."""
    prompt_tokens = min(prompt_tokens, model.config.max_position_embeddings - 1)
    engine = Engine(model, max_batch=1, max_seq_len=prompt_tokens + 1, cuda_graphs=False, attention=attention,
                    cache_dtype=cache_dtype)
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    times = []
    for r in range(repeats + 1):
        h = engine.submit(_prompt(model.config.vocab_size, prompt_tokens, 7), params)
        engine.run_until_idle()
        if r:
            times.append(h.first_token_at - h.submitted_at)
    t = sorted(times)[len(times) // 2]
    return {"case": f"time to first token, {prompt_tokens}-token prompt", "metric": "ms", "value": t * 1e3}


def run_bench(path: str | Path, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
              prefill: Sequence[int] = (512, 2048, 8192), batches: Sequence[int] = (1, 8, 32),
              prompt_tokens: int = 128, new_tokens: int = 64, cuda_graphs: bool | None = None,
              attention: str = "sdpa", cache_dtype: torch.dtype | None = None) -> dict:
    """Load `path` (artifact or HF checkpoint) and measure everything; one JSON-ready dict. `cache_dtype`:
    torch.int8 for the quantized KV cache (default: the model's dtype)."""
    from .load import load

    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: CUDA is not available on this machine")
        torch.cuda.reset_peak_memory_stats(dev)
    if any(b < 1 for b in batches) or any(n < 1 for n in prefill):
        raise UsageError("--batch / --prefill: expected positive numbers")
    t0 = time.perf_counter()
    model = load(path, device=dev, dtype=dtype)
    load_s = time.perf_counter() - t0
    if getattr(model, "kind", None) != "decoder":
        raise UsageError(f"{path}: lowc bench measures decoders (generation); this model is an encoder")
    weights = module_bytes(model)
    results = bench_prefill(model, prefill, attention=attention, cache_dtype=cache_dtype)
    results.append(bench_ttft(model, attention=attention, cache_dtype=cache_dtype))
    results += bench_decode(model, batches, prompt_tokens, new_tokens, cuda_graphs, attention,
                            cache_dtype=cache_dtype)
    out = {"model": str(path), "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "dtype": str(dtype).replace("torch.", ""), "attention": attention,
           "kv_cache": str(cache_dtype or dtype).replace("torch.", ""), "load_s": load_s,
           "weight_bytes": weights, "results": results}
    if dev.type == "cuda":
        out["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated(dev)
    return out
