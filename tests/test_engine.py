"""The batched generation engine (lowc/runtime/engine.py) on a tiny random Llama, float32 on CPU.

Greedy generation of a request must not depend on what else is batched with it: ragged batches, queueing,
requests joining mid-way and slots being reused all give the tokens of single-request generation.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import randomize_weights

from lowc.errors import UsageError
from lowc.runtime.engine import Engine, EngineClosed, SamplingParams
from lowc.runtime.generate import SamplingConfig, generate, generate_ids
from lowc.runtime.load import load


@pytest.fixture(scope="module")
def model(tiny_llama):
    """The tiny checkpoint in float32 with larger random weights, so continuations vary with the context."""
    return randomize_weights(load(tiny_llama))


def prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def single(model, prompt: list[int], n: int, **kw) -> list[int]:
    return list(generate_ids(model, prompt, SamplingConfig(max_new_tokens=n, stop_at_eos=False, **kw)))


GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


def test_prefill_logits_match_the_model(model):
    engine = Engine(model, max_batch=2)
    ids = prompts(model.config.vocab_size, [21])[0]
    with torch.inference_mode():
        ours = engine._prefill_forward(torch.tensor(ids), 1)
        ref = model(torch.tensor([ids]))[0, -1]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_ragged_batch_matches_single_requests(model):
    lengths = [3, 17, 9, 30, 5, 12, 1]
    ps = prompts(model.config.vocab_size, lengths)
    # different max_tokens: requests finish at different steps, so slots are freed, moved and refilled
    params = [SamplingParams(max_tokens=6 + 3 * i, ignore_eos=True) for i in range(len(ps))]
    engine = Engine(model, max_batch=3)  # 7 requests, 3 slots: most of them wait for a slot
    handles = engine.generate(ps, params)
    for p, sp, h in zip(ps, params, handles):
        assert h.finish_reason == "length"
        assert h.token_ids == single(model, p, sp.max_tokens), f"prompt of {len(p)} tokens"
    assert engine.num_active == 0 and engine.num_waiting == 0


def test_batch_size_does_not_change_tokens(model):
    ps = prompts(model.config.vocab_size, [4, 25, 11, 2, 40], seed=1)
    one = [h.token_ids for h in Engine(model, max_batch=1).generate(ps, GREEDY)]
    many = [h.token_ids for h in Engine(model, max_batch=8).generate(ps, GREEDY)]
    assert one == many


def test_request_joining_mid_way(model):
    a, b, c = prompts(model.config.vocab_size, [10, 3, 27], seed=2)
    engine = Engine(model, max_batch=4)
    ha = engine.submit(a, SamplingParams(max_tokens=30, ignore_eos=True))
    for _ in range(5):
        engine.step()
    assert len(ha.token_ids) == 6 and not ha.done
    hb = engine.submit(b, GREEDY)
    engine.step()
    hc = engine.submit(c, GREEDY)
    engine.run_until_idle(max_steps=100)
    assert hb.first_token_at < ha.finished_at and hc.first_token_at < ha.finished_at  # joined, did not wait
    assert ha.token_ids == single(model, a, 30)
    assert hb.token_ids == single(model, b, 12)
    assert hc.token_ids == single(model, c, 12)


def test_text_matches_generate(model):
    prompt = "the city of the world"
    cfg = SamplingConfig(max_new_tokens=15, stop_at_eos=False)
    expected = generate(model, prompt, cfg)
    h = Engine(model).generate([prompt], SamplingParams(max_tokens=15, ignore_eos=True))[0]
    assert h.text == expected
    assert h.token_ids == single(model, model.tokenizer.encode_prompt(prompt), 15)


def test_streamed_deltas_add_up(model):
    engine = Engine(model, max_batch=2)
    h = engine.submit("he was the first", SamplingParams(max_tokens=10, ignore_eos=True))
    engine.run_until_idle()
    deltas = list(h)
    assert deltas[-1].finish_reason == "length" and all(d.finish_reason is None for d in deltas[:-1])
    assert "".join(d.text for d in deltas) == h.text
    assert sum((d.token_ids for d in deltas), []) == h.token_ids and len(h.token_ids) == 10


def test_stop_strings(model):
    engine = Engine(model, max_batch=2)
    full = engine.generate(["the school"], SamplingParams(max_tokens=20, ignore_eos=True))[0].text
    words = full.split()
    stop = " " + words[4]  # a word some way in: everything before its first occurrence comes back
    h = engine.generate(["the school"], SamplingParams(max_tokens=20, ignore_eos=True, stop=[stop, "zzz"]))[0]
    assert h.finish_reason == "stop"
    assert h.text == full[:full.index(stop)]
    assert stop not in h.text and len(h.token_ids) < 20
    # a stop string that never appears changes nothing
    h2 = engine.generate(["the school"], SamplingParams(max_tokens=20, ignore_eos=True, stop=["qqq"]))[0]
    assert h2.text == full and h2.finish_reason == "length"


def test_max_tokens_and_eos(model):
    ps = prompts(model.config.vocab_size, [6], seed=3)
    engine = Engine(model)
    h = engine.generate(ps, SamplingParams(max_tokens=5))[0]
    assert len(h.token_ids) == 5 and h.finish_reason == "length"
    ref = single(model, ps[0], 12)
    engine.eos_ids = {ref[3]}  # pretend the 4th token is EOS
    h = engine.generate(ps, SamplingParams(max_tokens=12))[0]
    cut = ref.index(ref[3])
    assert h.finish_reason == "stop" and h.token_ids == ref[:cut]
    h = engine.generate(ps, SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert h.token_ids == ref
    # the context ends a request too: prompt + completion never exceed max_seq_len
    short = Engine(model, max_seq_len=10)
    h = short.generate(ps, SamplingParams(max_tokens=50, ignore_eos=True))[0]
    assert len(h.token_ids) == 4 and h.finish_reason == "length"


def test_sampling_with_seed_is_reproducible(model):
    ps = prompts(model.config.vocab_size, [8, 15, 4], seed=4)
    sp = SamplingParams(max_tokens=15, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    alone = Engine(model, max_batch=1).generate([ps[0]], sp)[0].token_ids
    others = [SamplingParams(max_tokens=15, temperature=1.0, seed=7, ignore_eos=True), GREEDY]
    batched = Engine(model, max_batch=3).generate(ps, [sp, *others])[0].token_ids
    assert alone == batched
    assert alone == single(model, ps[0], 15, temperature=0.9, top_p=0.95, seed=1234)
    other_seed = Engine(model).generate([ps[0]], SamplingParams(max_tokens=15, temperature=0.9, top_p=0.95,
                                                                seed=99, ignore_eos=True))[0].token_ids
    assert other_seed != alone


def test_cancel_frees_the_slot(model):
    engine = Engine(model, max_batch=1)
    a, b = prompts(model.config.vocab_size, [5, 7], seed=5)
    ha = engine.submit(a, SamplingParams(max_tokens=100, ignore_eos=True))
    hb = engine.submit(b, GREEDY)
    for _ in range(3):
        engine.step()
    ha.cancel()
    engine.run_until_idle(max_steps=50)
    assert ha.finish_reason == "abort" and 0 < len(ha.token_ids) < 100
    assert hb.token_ids == single(model, b, 12)


def test_bad_requests(model):
    engine = Engine(model)
    with pytest.raises(UsageError, match="empty"):
        engine.submit([], GREEDY)
    with pytest.raises(UsageError, match="at most 127"):
        engine.submit(list(range(3, 60)) * 3, GREEDY)
    with pytest.raises(UsageError, match="token ids"):
        engine.submit([5, 10_000], GREEDY)
    for bad in (dict(max_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(stop=[""])):
        with pytest.raises(UsageError):
            engine.submit([5], SamplingParams(**bad))
    with pytest.raises(UsageError, match="max_seq_len"):
        Engine(model, max_seq_len=1000)
    with pytest.raises(UsageError, match="int8"):  # integer caches other than the quantized INT8 one
        Engine(model, cache_dtype=torch.int32)


def test_background_thread_async_and_shutdown(model):
    engine = Engine(model, max_batch=4)
    ps = prompts(model.config.vocab_size, [3, 9, 14], seed=6)
    engine.start()

    async def consume(prompt):
        h = engine.submit(prompt, GREEDY, loop=asyncio.get_running_loop())
        text, ids = "", []
        async for d in h:
            text += d.text
            ids += d.token_ids
        return h, ids

    async def main():
        return await asyncio.wait_for(asyncio.gather(*(consume(p) for p in ps)), timeout=30)

    try:
        results = asyncio.run(main())
        for p, (h, ids) in zip(ps, results):
            assert ids == h.token_ids == single(model, p, 12)
        long = engine.submit(ps[0], SamplingParams(max_tokens=120, ignore_eos=True))
        engine.shutdown(grace_s=0.0, timeout=10)
        assert long.wait(10) and long.finish_reason in ("abort", "length")
        assert not engine.running
        with pytest.raises(EngineClosed):
            engine.submit(ps[0], GREEDY)
    finally:
        engine.shutdown(timeout=10)


def test_compressed_artifact_batched_matches_single(tiny_llama, tmp_path):
    """Packed Linears (V:N:M + INT6 through the reference kernels) run through the engine unchanged."""
    import lowc

    path = lowc.compress(tiny_llama, tmp_path / "art", lowc.Recipe(vnm="16:2:5", wbits=6, permute=False),
                         progress=False)
    packed = load(path)
    assert any(type(m).__name__ == "PackedLinear" for m in packed.modules())
    ps = prompts(packed.config.vocab_size, [2, 19, 7, 11], seed=8)
    handles = Engine(packed, max_batch=2).generate(ps, GREEDY)
    for p, h in zip(ps, handles):
        assert h.token_ids == single(packed, p, 12)


def test_fused_decode_path_matches_single_requests(tiny_llama):
    """The fused decode kernels and q/k/v, gate/up projections (on by default for 16-bit models on CUDA; here
    forced on; in Triton's CPU interpreter without a GPU) give the tokens of unfused single-request generation."""
    device = "cuda" if torch.cuda.is_available() else "cpu"  # compiled Triton kernels take only CUDA tensors
    fused_model = randomize_weights(load(tiny_llama)).to(device)
    lengths = [3, 17, 9]
    ps = prompts(fused_model.config.vocab_size, lengths, seed=3)
    want = [single(fused_model, p, 8) for p in ps]
    engine = Engine(fused_model, max_batch=2, fuse=True)
    assert all(f is not None for f in engine._qkv + engine._gate_up)
    with torch.inference_mode():
        ids = torch.tensor(ps[1], device=device)
        ref = fused_model(ids[None])[0, -1]
        torch.testing.assert_close(engine._prefill_forward(ids, 0), ref, rtol=1e-5, atol=1e-5)
    handles = engine.generate(ps, SamplingParams(max_tokens=8, ignore_eos=True))
    assert [h.token_ids for h in handles] == want


# ------------------------------------------------------------------------------------------- INT8 KV cache
def test_int8_cache_stores_what_it_reads_back():
    from lowc.runtime.kv_cache import EngineKVCache, bytes_per_token

    g = torch.Generator().manual_seed(0)
    cache = EngineKVCache(2, 3, 2, 16, 128, torch.int8, torch.device("cpu"))
    k, v = torch.randn(2, 9, 128, generator=g) + 3.0, torch.randn(2, 9, 128, generator=g)  # keys off-centre
    cache.write_prompt(1, 2, k, v)
    new_k, new_v = torch.randn(3, 2, 128, generator=g) + 3.0, torch.randn(3, 2, 128, generator=g)
    cache.write_tokens(1, torch.tensor([0, 4, 9]), new_k, new_v)
    keys, values = cache.read(1, 2, 10, torch.float32)
    mean = k.mean(1, keepdim=True)
    want_k, want_v = torch.cat([k, new_k[2, :, None]], 1) - mean, torch.cat([v, new_v[2, :, None]], 1)
    # per-token absmax / 127 steps: half a step at most, and the keys are stored less their prompt mean
    assert (keys - want_k).abs().max() <= 0.51 * want_k.abs().amax(-1).max() / 127
    assert (values - want_v).abs().max() <= 0.51 * want_v.abs().amax(-1).max() / 127
    torch.testing.assert_close(cache.k_mean[1][2], mean[:, 0])
    saved = cache.snapshot(3, 0)
    cache.write_tokens(1, torch.tensor([0, 0, 0]), torch.zeros(3, 2, 128), torch.zeros(3, 2, 128))
    cache.restore(saved, 0)
    assert torch.equal(cache.read(1, 2, 10, torch.float32)[0], keys)
    cache.move_slot(2, 0, 10)
    assert torch.equal(cache.read(1, 0, 10, torch.float32)[1], values)
    assert torch.equal(cache.k_mean[1][0], mean[:, 0])
    sizes = [EngineKVCache(2, 3, 2, 512, 128, dtype, torch.device("cpu")).nbytes
             for dtype in (torch.int8, torch.bfloat16)]
    assert sizes[0] / sizes[1] < 0.53 and bytes_per_token(2, 2, 128, torch.bfloat16) * 3 * 512 == sizes[1]
    assert 0 < sizes[0] - bytes_per_token(2, 2, 128, torch.int8) * 3 * 512 <= 2 * 3 * 2 * 128 * 4  # + the key means


def _teacher_forced_logits(engine, ids):
    """Prefill all but the last token in slot 0, then decode the last one: logits of the final position."""
    dev = engine.device
    with torch.inference_mode():
        engine._prefill_forward(torch.tensor(ids[:-1], device=dev), 0)
        return engine._decode_forward(torch.tensor(ids[-1:], device=dev), torch.tensor([len(ids) - 1], device=dev),
                                      32)[0]


def test_int8_cache_logits_stay_close_to_the_model(model):
    ids = prompts(model.config.vocab_size, [23], seed=11)[0]
    with torch.inference_mode():
        ref = model(torch.tensor([ids]))[0, -1]
    got = _teacher_forced_logits(Engine(model, max_batch=1, cache_dtype=torch.int8), ids)
    error = float((got - ref).norm() / ref.norm())
    # quantized, but close: 1.5e-2 with these sharp random weights, 1.3e-3 on the trained ref-llama-wt2
    assert 0 < error < 3e-2, error
    exact = _teacher_forced_logits(Engine(model, max_batch=1), ids)
    torch.testing.assert_close(exact, ref, rtol=1e-4, atol=1e-4)


def test_int8_cache_generation_does_not_depend_on_batching(model):
    ps = prompts(model.config.vocab_size, [3, 17, 9, 30, 5], seed=12)
    params = [SamplingParams(max_tokens=5 + 2 * i, ignore_eos=True) for i in range(len(ps))]
    one = [h.token_ids for h in Engine(model, max_batch=1, cache_dtype=torch.int8).generate(ps, params)]
    many = [h.token_ids for h in Engine(model, max_batch=3, cache_dtype=torch.int8).generate(ps, params)]
    assert one == many
    float_tokens = [h.token_ids for h in Engine(model, max_batch=3).generate(ps, params)]
    agree = sum(a == b for x, y in zip(many, float_tokens) for a, b in zip(x, y)) / sum(map(len, many))
    assert agree >= 0.8, agree


def test_int8_cache_on_the_fused_decode_path(tiny_llama):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fused_model = randomize_weights(load(tiny_llama)).to(device)
    ps = prompts(fused_model.config.vocab_size, [3, 17, 9], seed=13)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    unfused = Engine(fused_model, max_batch=2, cache_dtype=torch.int8, fuse=False)
    want = [h.token_ids for h in unfused.generate(ps, params)]
    engine = Engine(fused_model, max_batch=2, cache_dtype=torch.int8, fuse=True)
    assert [h.token_ids for h in engine.generate(ps, params)] == want


def test_bench_command_with_an_int8_cache(tiny_llama, capsys):
    import json

    from conftest import run_cli

    code, out, err = run_cli(["bench", tiny_llama, "--device", "cpu", "--prefill", "8", "--batch", "1,2",
                              "--prompt-tokens", "4", "--new-tokens", "3", "--kv-cache", "int8", "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["kv_cache"] == "int8"
    cases = [r["case"] for r in report["results"]]
    assert cases[0] == "prefill 8 tokens" and "decode batch 2" in cases
    assert all(r["value"] > 0 for r in report["results"])


@pytest.mark.parametrize("cache_dtype", [None, torch.int8])
def test_sage_decode_matches_sdpa_decode(model, cache_dtype):
    """attention="sage" decodes through SageAttention's split-KV kernel with per-row key counts (here, float32 on
    CPU, through its reference fallback): the tokens of SDPA decoding with the per-row mask, ragged batches and
    slot reuse included, with the float and the INT8 cache."""
    ps = prompts(model.config.vocab_size, [3, 17, 9, 30, 5], seed=14)
    params = [SamplingParams(max_tokens=4 + 2 * i, ignore_eos=True) for i in range(len(ps))]
    sdpa = Engine(model, max_batch=3, cache_dtype=cache_dtype).generate(ps, params)
    sage = Engine(model, max_batch=3, cache_dtype=cache_dtype, attention="sage").generate(ps, params)
    assert [h.token_ids for h in sage] == [h.token_ids for h in sdpa]


def test_sage_decode_kernel_in_the_engine(tiny_llama):
    """The same with the Triton kernel itself (fp16; compiled on a GPU, Triton's interpreter on CPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    half = randomize_weights(load(tiny_llama)).to(device, torch.float16)
    ps = prompts(half.config.vocab_size, [3, 17, 9], seed=15)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    for cache_dtype in (None, torch.int8):
        engines = [Engine(half, max_batch=2, cache_dtype=cache_dtype, attention=a, fuse=False, cuda_graphs=False)
                   for a in ("sdpa", "sage")]
        with torch.inference_mode():  # one teacher-forced decode step: logits of the two attention paths
            logits = [_teacher_forced_logits(e, ps[1]).float() for e in engines]
        assert float((logits[1] - logits[0]).norm() / logits[0].norm()) < 2e-2
        if cache_dtype is None:  # (the INT8 cache's kernel also quantizes q: greedy paths part on these sharp weights)
            tokens = [[h.token_ids for h in e.generate(ps, params)] for e in engines]
            agree = sum(a == b for x, y in zip(*tokens) for a, b in zip(x, y)) / sum(map(len, tokens[0]))
            assert agree >= 0.8, agree
