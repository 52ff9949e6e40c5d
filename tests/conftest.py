"""Shared fixtures: a tiny random Llama checkpoint with a real tokenizer, and the ../shared reference data."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in its CPU interpreter; it must be on before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REF_MODEL = SHARED / "models" / "ref-llama-wt2"
WIKITEXT = SHARED / "data" / "wikitext-2"

WORDS = ("the of and to in a is was for on as with by he at from his an were are which this be "
         "has or had it not first one their its new after who they have her she two been other when "
         "there all during into school time may years more most only over city some world would where").split()

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "vocab_size": len(WORDS) + 3, "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "hidden_act": "silu",
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "tie_word_embeddings": True,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "bfloat16",
}


def word_tokenizer(path: Path) -> None:
    """A real `tokenizers` WordLevel tokenizer over WORDS: [PAD]=0, [UNK]=1, [SEP]=2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, "[SEP]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(["[PAD]", "[UNK]", "[SEP]"])
    tok.save(str(path / "tokenizer.json"))


def tiny_llama_tensors(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd, nh, nkv = config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.1).to(torch.bfloat16)

    t = {"model.embed_tokens.weight": w(v, h), "model.norm.weight": (1 + w(h).float() * 0.1).to(torch.bfloat16)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        t.update({
            p + "input_layernorm.weight": (1 + w(h).float()).to(torch.bfloat16),
            p + "post_attention_layernorm.weight": (1 + w(h).float()).to(torch.bfloat16),
            p + "self_attn.q_proj.weight": w(nh * hd, h), p + "self_attn.k_proj.weight": w(nkv * hd, h),
            p + "self_attn.v_proj.weight": w(nkv * hd, h), p + "self_attn.o_proj.weight": w(h, nh * hd),
            p + "mlp.gate_proj.weight": w(i, h), p + "mlp.up_proj.weight": w(i, h), p + "mlp.down_proj.weight": w(h, i),
        })
    return t


def make_tiny_llama(path: Path, config: dict | None = None, max_shard_bytes: int = 40_000) -> Path:
    from lowc.checkpoint import write_checkpoint

    config = dict(config or TINY_LLAMA)
    path.mkdir(parents=True, exist_ok=True)
    word_tokenizer(path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "bos_token_id": 1}))
    write_checkpoint(path, config, tiny_llama_tensors(config), max_shard_bytes=max_shard_bytes)
    return path


def make_tiny_bert(path: Path) -> Path:
    """A random 2-layer BERT with the word tokenizer, whose attention-output LayerNorms make channels 5 and 17
    15x larger (outliers, as trained BERTs have)."""
    from lowc.checkpoint import write_checkpoint
    from lowc.models import build_model

    config = {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": len(WORDS) + 3,
              "max_position_embeddings": 64, "type_vocab_size": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-12}
    path.mkdir()
    word_tokenizer(path)
    g = torch.Generator().manual_seed(0)
    state = {k: v.detach().clone() for k, v in build_model(config).state_dict().items()}
    for k, v in state.items():
        if v.is_floating_point():
            state[k] = torch.randn(v.shape, generator=g) * (0.2 if v.dim() > 1 else 0.05) + (1 if "LayerNorm.weight" in k else 0)
    for i in range(2):  # outlier channels in the LayerNorm outputs, as trained BERTs have
        state[f"encoder.layer.{i}.attention.output.LayerNorm.weight"][[5, 17]] *= 15
    write_checkpoint(path, config, state)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A sharded, bf16, random-weight Llama checkpoint directory with a word-level tokenizer (read-only: copy to mutate)."""
    return make_tiny_llama(tmp_path_factory.mktemp("ckpt") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory) -> Path:
    g = torch.Generator().manual_seed(1)
    lines = [" ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (int(n),), generator=g))
             for n in torch.randint(3, 20, (60,), generator=g)]
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def ref_model() -> Path:
    if not (REF_MODEL / "config.json").is_file():
        pytest.skip(f"reference model not present at {REF_MODEL} (../shared is absent in this checkout)")
    return REF_MODEL


def _wikitext(split: str) -> Path:
    path = WIKITEXT / f"{split}.txt"
    if not path.is_file():
        pytest.skip(f"WikiText-2 not present at {path} (../shared is absent in this checkout)")
    return path


@pytest.fixture(scope="session")
def wikitext_test() -> Path:
    return _wikitext("test")


@pytest.fixture(scope="session")
def wikitext_valid() -> Path:
    return _wikitext("valid")


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run the lowc CLI in-process; returns (exit code, stdout, stderr)."""
    from lowc.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


VNM_PAIRS = torch.tensor(list(itertools.combinations(range(4), 2)), dtype=torch.uint8)  # the 6 valid 2-of-4 choices


def random_vnm_pattern(rows: int, cols: int, v: int, m: int, g: torch.Generator):
    """A uniformly random canonical V:N:M pattern (not only what pruning makes): kept columns [blocks, kb, 4],
    positions [rows, kb, 2] and the mask [rows, 2 kb] of slots that fall in the K padding (they must hold 0)."""
    kb = -(-cols // m)
    subsets = torch.tensor(list(itertools.combinations(range(m), 4)), dtype=torch.uint8)
    columns = subsets[torch.randint(len(subsets), (-(-rows // v), kb), generator=g)]
    positions = VNM_PAIRS[torch.randint(6, (rows, kb), generator=g)]
    block_cols = columns.long().repeat_interleave(v, 0)[:rows]
    absolute = torch.gather(block_cols, 2, positions.long()) + (torch.arange(kb) * m).view(1, kb, 1)
    return columns, positions, absolute.reshape(rows, 2 * kb) >= cols


def randomize_weights(model: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Give a loaded tiny model larger random weights (norms kept), so continuations vary with the context."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, w in model.named_parameters():
            if "norm" not in name:
                w.copy_(torch.randn(w.shape, generator=g) * scale)
    return model


@pytest.fixture
def one_thread():
    """Tiny models: a second OpenMP thread only adds synchronisation (up to 100x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
