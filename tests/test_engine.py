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
    with pytest.raises(UsageError, match="INT8 cache"):  # never a silent float -> int8 truncation
        Engine(model, cache_dtype=torch.int8)


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
