"""A batched generation engine: preallocated KV cache, prefill + batched decode, continuous batching.

Requests are submitted from any thread (`Engine.submit`) and come back as a `RequestHandle`: a stream of `Delta`s
(new token ids, new text, finally a finish reason) that can be read synchronously or with `async for`. One
scheduler — `Engine.step`, called in a loop by a background thread (`Engine.start`) or by the caller — does:

1. admit waiting requests into free slots of the KV cache, one prefill each (the prompt's keys/values are written
   into the slot, the first token is sampled from the last position);
2. one decode step for every active request together: each row feeds its last token at its own position and
   attends to its own cached prefix (a boolean mask per row, so prompts of different lengths batch together);
3. retire finished requests (EOS, stop string, max tokens, cancel) and free their slots, so new requests join
   between decode steps (continuous batching).

Active requests always occupy slots 0..n-1 (a finishing request's slot is refilled by moving the last one into
it), so a decode step works on one contiguous slice of the cache. On CUDA the decode step can be captured as a
CUDA graph per (batch bucket, key-length bucket); any capture failure falls back to eager execution.

The forward pass is built from the model's own submodules (embedding, norms, projections, MLP, LM head), so
packed Linears and their kernels are used as they are; only attention and the cache layout belong to the engine.
Greedy decoding of a request gives the same tokens whatever else is in the batch (tests/test_engine.py).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator, Sequence

import torch
import torch.nn.functional as F

from ..errors import LowcError, UsageError
from ..models.llama import apply_rope
from .fused_linear import fuse_linears
from .generate import SamplingConfig, sample_next
from .kv_cache import EngineKVCache

log = logging.getLogger("lowc.runtime.engine")

FINISH_REASONS = ("stop", "length", "abort", "error")


class EngineClosed(LowcError):
    """The engine is shutting down and takes no new requests."""


@dataclass
class SamplingParams:
    """Per-request generation settings (OpenAI semantics: stop strings are not part of the output)."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    ignore_eos: bool = False

    def validate(self) -> None:
        """Raise UsageError naming the first bad field."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise UsageError(f"max_tokens: expected a positive integer, got {self.max_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)) or self.temperature < 0:
            raise UsageError(f"temperature: expected a number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise UsageError(f"top_p: expected a value in (0, 1], got {self.top_p!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise UsageError(f"stop: expected non-empty strings, got {list(self.stop)!r}")

    def sampling_config(self) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_tokens, temperature=float(self.temperature),
                              top_p=float(self.top_p), seed=self.seed)


@dataclass
class Delta:
    """What one scheduler step added to a request: new token ids and text; `finish_reason` set on the last one."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    error: str | None = None


class RequestHandle:
    """A submitted request: iterate it (sync or async) for Deltas, or call `result()` to wait for the whole text.

    Thread-safe: the engine thread pushes, one consumer reads. `cancel()` ends the request at the next step
    (finish reason "abort") and frees its slot.
    """

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 loop: asyncio.AbstractEventLoop | None = None):
        self.id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.cancelled = False
        self._loop = loop
        self._sync: queue.SimpleQueue[Delta] = queue.SimpleQueue()
        self._async: asyncio.Queue[Delta] | None = asyncio.Queue() if loop is not None else None
        self._done = threading.Event()

    # ---- engine side
    def _push(self, delta: Delta) -> None:
        if delta.token_ids and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.token_ids.extend(delta.token_ids)
        self.text += delta.text
        if delta.finish_reason is not None:
            self.finish_reason, self.error = delta.finish_reason, delta.error
            self.finished_at = time.perf_counter()
        if self._async is not None:
            try:
                self._loop.call_soon_threadsafe(self._async.put_nowait, delta)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
                pass
        else:
            self._sync.put(delta)
        if delta.finish_reason is not None:
            self._done.set()

    # ---- consumer side
    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Ask the engine to end this request (finish reason "abort"); harmless once it has finished."""
        self.cancelled = True

    def __iter__(self) -> Iterator[Delta]:
        if self._async is not None:
            raise LowcError("this request was submitted with an event loop: read it with `async for`")
        while True:
            delta = self._sync.get()
            yield delta
            if delta.finish_reason is not None:
                return

    async def __aiter__(self) -> AsyncIterator[Delta]:
        if self._async is None:
            raise LowcError("this request was submitted without an event loop: iterate it synchronously")
        while True:
            delta = await self._async.get()
            yield delta
            if delta.finish_reason is not None:
                return

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the request finished; False on timeout."""
        return self._done.wait(timeout)

    def result(self, timeout: float | None = None) -> str:
        """The whole generated text once finished (raises LowcError on timeout or engine error)."""
        if not self.wait(timeout):
            raise LowcError(f"request {self.id} did not finish within {timeout} s")
        if self.finish_reason == "error":
            raise LowcError(f"request {self.id} failed: {self.error}")
        return self.text


class _IncrementalDetokenizer:
    """Text deltas from a growing id list, decoding only a short window (the offsets trick of HF/vLLM streamers).

    A piece is released once the window's text grows and does not end in U+FFFD (a byte-level token that is only
    part of a UTF-8 character), so multi-token characters and subword joins come out right.
    """

    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tok = tokenizer
        self.ids = list(prompt_ids)
        self.read = len(self.ids)
        self.prefix = max(0, self.read - 6)

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd") and after.startswith(before):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):] if after.startswith(before) else ""


@dataclass
class _Seq:
    """Engine-side state of an admitted request."""

    handle: RequestHandle
    cap: int  # tokens it may generate (max_tokens, cut by the cache length)
    length: int = 0  # tokens in the cache
    last: int = 0  # the newest generated token (fed at position `length` by the next decode step)
    generated: int = 0
    generator: torch.Generator | None = None
    detok: _IncrementalDetokenizer | None = None
    full_text: str = ""  # all text decoded so far
    emitted: int = 0  # characters of full_text already sent
    pending_ids: list[int] = field(default_factory=list)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class _DecodeGraphs:
    """CUDA graphs of the decode step, one per (batch bucket, key-length bucket), captured lazily in one pool."""

    def __init__(self, engine: "Engine"):
        self.engine = engine
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.failed = False

    def run(self, tokens: torch.Tensor, positions: torch.Tensor, batch: int, kv_len: int) -> torch.Tensor | None:
        """Logits [batch, vocab] of the first `len(tokens)` rows, or None when capture failed (use eager)."""
        key = (batch, kv_len)
        if key not in self.graphs:
            if self.failed:
                return None
            try:
                self.graphs[key] = self._capture(batch, kv_len)
            except Exception as e:  # noqa: BLE001 - any capture problem means: run eagerly
                self.failed = True
                log.warning("CUDA graph capture failed (%s: %s); decoding eagerly", type(e).__name__,
                            str(e).splitlines()[0] if str(e) else "")
                return None
        graph, static_tok, static_pos, out = self.graphs[key]
        n = tokens.shape[0]
        static_tok.zero_()
        static_pos.zero_()
        static_tok[:n].copy_(tokens)
        static_pos[:n].copy_(positions)
        graph.replay()
        return out[:n]

    def _capture(self, batch: int, kv_len: int):
        eng = self.engine
        dev = eng.device
        static_tok = torch.zeros(batch, dtype=torch.long, device=dev)
        static_pos = torch.zeros(batch, dtype=torch.long, device=dev)
        # warm-up runs really execute and write position 0 of slots 0..batch-1: keep what active rows have there
        saved = eng.cache.snapshot(batch, 0)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                eng._decode_forward(static_tok, static_pos, kv_len)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = eng._decode_forward(static_tok, static_pos, kv_len)
        eng.cache.restore(saved, 0)
        log.info("captured a CUDA graph for decode batch %d, keys %d", batch, kv_len)
        return graph, static_tok, static_pos, out


class Engine:
    """Batched, continuously batching generation for a Llama-family model loaded by `lowc.load`.

    max_batch: cache slots (requests decoded together); max_seq_len: prompt + generated tokens per request
    (default: the model's max_position_embeddings); cache_dtype: the model's dtype by default, another float dtype,
    or torch.int8 for a quantized cache (per-token scales, smoothed keys: about half the memory; `kv_cache.py`);
    cuda_graphs: None means "on when the model is on CUDA"; attention: "sdpa" or "sage" (SageAttention on CUDA:
    prefill, and decode steps through its split-KV kernel reading the cache as stored);
    fuse: the fused decode kernels of `kernels/decoder_ops.py` and q/k/v and gate/up projections fused into one
    GEMM each (`fused_linear.py`); None means "on for a 16-bit model on CUDA".
    """

    def __init__(self, model: torch.nn.Module, *, max_batch: int = 8, max_seq_len: int | None = None,
                 cache_dtype: torch.dtype | None = None, cuda_graphs: bool | None = None, attention: str = "sdpa",
                 fuse: bool | None = None, tokenizer=None):
        if getattr(model, "kind", None) != "decoder" or not hasattr(model, "model") or not hasattr(model, "lm_head"):
            raise UsageError("the generation engine runs Llama-family decoders (this model is not one)")
        if attention not in ("sdpa", "sage"):
            raise UsageError(f"attention: expected 'sdpa' or 'sage', got {attention!r}")
        c = model.config
        self.model, self.config = model, c
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        self.max_batch = int(max_batch)
        self.max_seq_len = int(max_seq_len or c.max_position_embeddings)
        if self.max_batch < 1:
            raise UsageError(f"max_batch: expected a positive number, got {max_batch}")
        if not 2 <= self.max_seq_len <= c.max_position_embeddings:
            raise UsageError(f"max_seq_len: expected 2..{c.max_position_embeddings} (the model's "
                             f"max_position_embeddings), got {self.max_seq_len}")
        emb = model.model.embed_tokens.weight
        self.device, self.dtype = emb.device, emb.dtype
        self.cache_dtype = cache_dtype or self.dtype
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.cache = EngineKVCache(c.num_hidden_layers, self.max_batch, self.n_kv, self.max_seq_len, self.head_dim,
                                   self.cache_dtype, self.device)
        self.attention = attention
        if fuse is None:
            fuse = self.device.type == "cuda" and self.dtype in (torch.float16, torch.bfloat16)
        self.fuse = bool(fuse)
        layers = model.model.layers
        self._qkv = [fuse_linears([l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj]) if self.fuse
                     else None for l in layers]
        self._gate_up = [fuse_linears([l.mlp.gate_proj, l.mlp.up_proj]) if self.fuse else None for l in layers]
        eos = getattr(self.tokenizer, "eos_ids", None)
        if eos is None:
            e = c.eos_token_id
            eos = [] if e is None else ([e] if isinstance(e, int) else list(e))
        self.eos_ids = set(eos)
        use_graphs = self.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        if use_graphs and self.device.type != "cuda":
            log.warning("CUDA graphs need a CUDA model; decoding eagerly")
            use_graphs = False
        self.graphs = _DecodeGraphs(self) if use_graphs else None
        self._active: list[_Seq] = []
        self._waiting: deque[RequestHandle] = deque()
        self._cv = threading.Condition()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._draining_until: float | None = None
        self.stats = {"prefill_tokens": 0, "prefill_s": 0.0, "decode_steps": 0, "decode_tokens": 0, "decode_s": 0.0}

    # ------------------------------------------------------------------------------------------- submission
    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Prompt ids: text through the tokenizer (BOS added where its config asks), ids as given."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise UsageError("this model has no tokenizer.json: give the prompt as token ids")
            return self.tokenizer.encode_prompt(prompt)
        ids = [int(t) for t in prompt]
        if any(t < 0 or t >= self.config.vocab_size for t in ids):
            raise UsageError(f"prompt: token ids must be in [0, {self.config.vocab_size})")
        return ids

    def submit(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
               loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queue a request (thread-safe). With `loop` the handle is read with `async for` on that loop."""
        params = params or SamplingParams()
        params.validate()
        ids = self.encode(prompt)
        if not ids:
            raise UsageError("prompt: empty after tokenization")
        if len(ids) >= self.max_seq_len:
            raise UsageError(f"prompt: {len(ids)} tokens, at most {self.max_seq_len - 1} fit with room to generate")
        handle = RequestHandle(f"req-{next(self._ids)}", ids, params, loop)
        with self._cv:
            if self._stop or self._draining_until is not None:
                raise EngineClosed("the engine is shutting down")
            self._waiting.append(handle)
            self._cv.notify_all()
        return handle

    @property
    def num_active(self) -> int:
        return len(self._active)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_work(self) -> bool:
        return bool(self._active or self._waiting)

    # ------------------------------------------------------------------------------------------- scheduling
    @torch.inference_mode()
    def step(self) -> bool:
        """One scheduler iteration (admit + prefill, one decode step, retire); True while work remains."""
        draining = self._draining_until is not None
        expired = draining and time.monotonic() >= self._draining_until
        for seq in list(self._active):
            if seq.handle.cancelled or expired:
                self._finish(seq, "abort")
        while True:
            with self._cv:
                if not self._waiting or len(self._active) >= self.max_batch:
                    break
                handle = self._waiting.popleft()
            if handle.cancelled or draining:
                handle._push(Delta([], "", "abort"))
                continue
            self._admit(handle)
        if self._active:
            self._decode_step()
        return self.has_work()

    def run_until_idle(self, max_steps: int | None = None) -> None:
        """Step in the calling thread until no request is left (for scripts, tests and benchmarks)."""
        if self._thread is not None:
            raise LowcError("the engine runs in its background thread; wait on the handles instead")
        steps = 0
        while self.step():
            steps += 1
            if max_steps is not None and steps >= max_steps:
                raise LowcError(f"requests still running after {max_steps} steps")

    def generate(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
                 | None = None) -> list[RequestHandle]:
        """Submit all prompts, run them to the end, return their finished handles (in prompt order)."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        handles = [self.submit(p, sp) for p, sp in zip(prompts, params)]
        if self._thread is None:
            self.run_until_idle()
        for h in handles:
            h.wait()
        return handles

    # ------------------------------------------------------------------------------------------- background thread
    def start(self) -> None:
        """Run the scheduler in a daemon thread (idempotent)."""
        with self._cv:
            if self._thread is not None:
                return
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="lowc-engine", daemon=True)
            self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self.has_work():
                    self._cv.wait(timeout=0.5)
                if self._stop and not self.has_work():
                    return
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - never let one bad step kill the server's engine
                log.exception("engine step failed")
                for seq in list(self._active):
                    self._finish(seq, "error", error=f"{type(e).__name__}: {e}")

    def drain(self, grace_s: float = 0.0) -> None:
        """Stop taking requests (non-blocking): queued ones are aborted at the next step, running ones go on for
        `grace_s` seconds and are then ended with finish reason "abort", so every stream closes cleanly."""
        with self._cv:
            deadline = time.monotonic() + max(0.0, grace_s)
            if self._draining_until is None or deadline < self._draining_until:
                self._draining_until = deadline
            self._cv.notify_all()

    def shutdown(self, grace_s: float = 0.0, timeout: float | None = 30.0) -> None:
        """`drain(grace_s)`, then wait for the scheduler thread to end (at most `timeout` seconds)."""
        self.drain(grace_s)
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("engine thread still running after %s s", timeout)
            else:
                self._thread = None
        else:
            while self.step():
                pass

    # ------------------------------------------------------------------------------------------- model math
    def _attention_prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.attention == "sage" and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            from ..kernels.sage_attention import sage_attention

            return sage_attention(q, k, v, causal=True)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_heads)

    def _key_limits(self, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """What each decode row may attend to, computed once per step: the boolean mask over the first kv_len keys
        [B, 1, 1, kv_len] for SDPA, or each row's key count [B] (int32) for SageAttention's decode kernel."""
        if self.attention == "sage":
            return (positions + 1).to(torch.int32)
        return (torch.arange(kv_len, device=positions.device)[None, :] <= positions[:, None])[:, None, None, :]

    def _attention_decode(self, i: int, q: torch.Tensor, limits: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Layer i's attention for one new token per row (rows = slots 0..B-1): queries [B, Hq, (1,) D] against
        each row's cached keys up to its position (`limits` from `_key_limits`); [B, Hq * D]. SDPA on the first
        kv_len keys with the per-row mask, or with attention="sage" SageAttention's split-KV decode kernel, which
        reads the cache as it is (16-bit, or the INT8 codes: half the bytes) and stops at each row's own length."""
        B = q.shape[0]
        if self.attention == "sage":
            from ..kernels.sage_attention import sage_decode

            y = sage_decode(q.reshape(B, self.n_heads, 1, self.head_dim), self.cache.sage_view(i, B, kv_len),
                            kv_lens=limits)
        else:
            keys, values = self.cache.read(i, slice(0, B), kv_len, q.dtype)
            y = F.scaled_dot_product_attention(q.reshape(B, self.n_kv, self.n_heads // self.n_kv, self.head_dim),
                                               keys, values, attn_mask=limits)
        return y.reshape(B, self.n_heads * self.head_dim)

    def _project_qkv(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer i's queries, keys and values [..., heads * head_dim] (one fused GEMM when the layer has one)."""
        attn = self.model.model.layers[i].self_attn
        if self._qkv[i] is None:
            return attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        kv = self.n_kv * self.head_dim
        return self._qkv[i](h).split([self.n_heads * self.head_dim, kv, kv], dim=-1)

    def _mlp(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Layer i's SwiGLU MLP (gate and up in one fused GEMM, SiLU·gate in one kernel when fused)."""
        mlp = self.model.model.layers[i].mlp
        if self.fuse:
            from ..kernels.decoder_ops import silu_mul
        if self._gate_up[i] is None:
            g, u = mlp.gate_proj(h), mlp.up_proj(h)
        else:
            g, u = self._gate_up[i](h).chunk(2, dim=-1)
        return mlp.down_proj(silu_mul(g, u) if self.fuse else F.silu(g) * u)

    def _prefill_forward(self, ids: torch.Tensor, slot: int) -> torch.Tensor:
        """Run a prompt [T] through the model, writing its keys/values into `slot`; last-position logits [vocab]."""
        m = self.model.model
        T = ids.shape[0]
        x = m.embed_tokens(ids[None])
        cos, sin = m.rotary_emb(torch.arange(T, device=ids.device), x.dtype)
        for i, layer in enumerate(m.layers):
            attn = layer.self_attn
            q, k, v = self._project_qkv(i, layer.input_layernorm(x))
            q = q.view(1, T, self.n_heads, self.head_dim).transpose(1, 2)
            k = k.view(1, T, self.n_kv, self.head_dim).transpose(1, 2)
            v = v.view(1, T, self.n_kv, self.head_dim).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            self.cache.write_prompt(i, slot, k[0], v[0])
            k, v = (t[None] for t in self.cache.read(i, slot, T, q.dtype))  # attention sees what decode will
            y = self._attention_prefill(q, k, v)
            x = x + attn.o_proj(y.transpose(1, 2).reshape(1, T, self.n_heads * self.head_dim))
            x = x + self._mlp(i, layer.post_attention_layernorm(x))
        return self.model.lm_head(m.norm(x[:, -1:]))[0, 0].float()

    def _decode_forward(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """One token per row: rows 0..B-1 (= slots) feed `tokens` [B] at `positions` [B]; logits [B, vocab].

        Keys beyond a row's own position are masked, so rows of different lengths share one attention call.
        Query heads are grouped per KV head ([B, n_kv, group, D] against [B, n_kv, L, D]) for SDPA: GQA without
        repeating the cache and without needing a backend that supports `enable_gqa` with a mask.
        """
        if self.fuse:
            return self._decode_forward_fused(tokens, positions, kv_len)
        m = self.model.model
        B = tokens.shape[0]
        x = m.embed_tokens(tokens[:, None])
        cos, sin = m.rotary_emb(positions, x.dtype)
        cos, sin = cos[:, None, None, :], sin[:, None, None, :]
        limits = self._key_limits(positions, kv_len)
        for i, layer in enumerate(m.layers):
            attn = layer.self_attn
            q, k, v = self._project_qkv(i, layer.input_layernorm(x))
            q = q.view(B, 1, self.n_heads, self.head_dim).transpose(1, 2)
            k = k.view(B, 1, self.n_kv, self.head_dim).transpose(1, 2)
            v = v.view(B, 1, self.n_kv, self.head_dim).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            self.cache.write_tokens(i, positions, k[:, :, 0], v[:, :, 0])
            y = self._attention_decode(i, q, limits, kv_len)
            x = x + attn.o_proj(y[:, None])
            x = x + self._mlp(i, layer.post_attention_layernorm(x))
        return self.model.lm_head(m.norm(x))[:, 0].float()

    def _decode_forward_fused(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """`_decode_forward` on the fused kernels: per layer one launch each for the q/k/v GEMM, RoPE + cache write,
        attention, the o GEMM, residual add + norm, the gate/up GEMM, SiLU·gate, the down GEMM, add + norm."""
        from ..kernels.decoder_ops import add_rms_norm, rope_to_cache, rope_to_int8_cache
        m = self.model.model
        x = m.embed_tokens(tokens)
        cos, sin = m.rotary_emb(positions, x.dtype)
        limits = self._key_limits(positions, kv_len)
        norms = [layer.input_layernorm for layer in m.layers] + [m.norm]
        h, x = add_rms_norm(x, norms[0].weight, norms[0].eps)
        c = self.cache
        for i, layer in enumerate(m.layers):
            q, k, v = self._project_qkv(i, h)
            if c.int8:  # rotate, quantize and write in one launch
                q = rope_to_int8_cache(q, k, v, cos, sin, positions, c.k[i], c.v[i], c.k_scale[i], c.v_scale[i],
                                       c.k_mean[i])
            else:
                q = rope_to_cache(q, k, v, cos, sin, positions, c.k[i], c.v[i])
            o = layer.self_attn.o_proj(self._attention_decode(i, q, limits, kv_len))
            post = layer.post_attention_layernorm
            h, x = add_rms_norm(x, post.weight, post.eps, o)
            h, x = add_rms_norm(x, norms[i + 1].weight, norms[i + 1].eps, self._mlp(i, h))
        return self.model.lm_head(h).float()

    # ------------------------------------------------------------------------------------------- request lifecycle
    def _admit(self, handle: RequestHandle) -> None:
        slot = len(self._active)
        p = handle.params
        seq = _Seq(handle=handle, cap=min(p.max_tokens, self.max_seq_len - len(handle.prompt_ids)))
        if p.seed is not None and p.temperature > 0:
            seq.generator = torch.Generator(device=self.device).manual_seed(p.seed)
        if self.tokenizer is not None:
            seq.detok = _IncrementalDetokenizer(self.tokenizer, handle.prompt_ids)
        self._active.append(seq)
        try:
            t0 = time.perf_counter()
            ids = torch.tensor(handle.prompt_ids, dtype=torch.long, device=self.device)
            logits = self._prefill_forward(ids, slot)
            token = int(self._sample(logits[None], [seq])[0])
            self.stats["prefill_tokens"] += len(handle.prompt_ids)
            self.stats["prefill_s"] += time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - a failing request must not take the others down
            log.exception("prefill failed for %s", handle.id)
            self._finish(seq, "error", error=f"{type(e).__name__}: {e}")
            return
        seq.length = len(handle.prompt_ids)
        self._accept(seq, token)

    def _decode_step(self) -> None:
        t0 = time.perf_counter()
        n = len(self._active)
        tokens = torch.tensor([s.last for s in self._active], dtype=torch.long, device=self.device)
        positions = torch.tensor([s.length for s in self._active], dtype=torch.long, device=self.device)
        needed = max(s.length for s in self._active) + 1
        logits = None
        if self.graphs is not None:
            batch = min(_next_pow2(n), self.max_batch)
            kv_len = min(max(_next_pow2(needed), 128), self.max_seq_len)
            logits = self.graphs.run(tokens, positions, batch, kv_len)
        if logits is None:
            logits = self._decode_forward(tokens, positions, needed)
        chosen = self._sample(logits, self._active)
        for seq in self._active:
            seq.length += 1
        self.stats["decode_steps"] += 1
        self.stats["decode_tokens"] += n
        self.stats["decode_s"] += time.perf_counter() - t0
        for seq, token in zip(list(self._active), chosen):
            self._accept(seq, token)

    def _sample(self, logits: torch.Tensor, seqs: Sequence[_Seq]) -> list[int]:
        """Next token per row: one batched argmax for greedy rows, each sampled row with its own generator."""
        out = logits.argmax(-1).tolist()
        for row, seq in enumerate(seqs):
            p = seq.handle.params
            if p.temperature > 0:
                out[row] = int(sample_next(logits[row:row + 1], p.sampling_config(), seq.generator)[0])
        return out

    def _accept(self, seq: _Seq, token: int) -> None:
        """Record a sampled token: EOS, stop strings and the token cap end the request; else stream its text."""
        p = seq.handle.params
        if not p.ignore_eos and token in self.eos_ids:
            self._finish(seq, "stop")
            return
        seq.last = token
        seq.generated += 1
        seq.pending_ids.append(token)
        if seq.detok is not None:
            seq.full_text += seq.detok.add(token)
        if p.stop:
            start = max(0, seq.emitted - max(len(s) for s in p.stop))
            hits = [i for i in (seq.full_text.find(s, start) for s in p.stop) if i >= 0]
            if hits:
                seq.full_text = seq.full_text[:min(hits)]
                self._finish(seq, "stop", flush=False)
                return
        if seq.generated >= seq.cap:
            self._finish(seq, "length")
            return
        hold = max((len(s) for s in p.stop), default=1) - 1  # a stop string may still be completing
        upto = len(seq.full_text) - hold
        if upto > seq.emitted or seq.pending_ids:
            text = seq.full_text[seq.emitted:upto] if upto > seq.emitted else ""
            seq.emitted = max(seq.emitted, upto)
            seq.handle._push(Delta(seq.pending_ids, text))
            seq.pending_ids = []

    def _finish(self, seq: _Seq, reason: str, error: str | None = None, flush: bool = True) -> None:
        """Send the last delta and free the slot (the last active request moves into it)."""
        if flush and seq.detok is not None and reason != "error":
            seq.full_text += seq.detok.flush()
        seq.handle._push(Delta(seq.pending_ids, seq.full_text[seq.emitted:], reason, error))
        seq.pending_ids = []
        seq.emitted = len(seq.full_text)
        slot = self._active.index(seq)
        last = self._active.pop()
        if last is not seq:
            self._move_slot(len(self._active), slot, last.length)
            self._active[slot] = last

    def _move_slot(self, src: int, dst: int, length: int) -> None:
        self.cache.move_slot(src, dst, length)
