"""Importance scores and the layer-by-layer calibration runner."""

from __future__ import annotations

import pytest
import torch

import lowc
from lowc.compress.calibration import calibration_ids, input_norms
from lowc.compress.sparsity.importance import importance_scores
from lowc.errors import UsageError


def test_scores_match_their_definitions():
    w = torch.randn(6, 10)
    norm = torch.rand(10) + 0.1
    assert torch.equal(importance_scores(w, "magnitude"), w.abs())
    assert torch.allclose(importance_scores(w, "wanda", norm), w.abs() * norm)
    a = w.abs()
    ria = (a / a.sum(1, keepdim=True) + a / a.sum(0, keepdim=True)) * norm.sqrt()
    assert torch.allclose(importance_scores(w, "ria", norm), ria)
    with pytest.raises(ValueError):
        importance_scores(w, "wanda")


def test_input_norms_match_a_plain_forward_with_hooks(tiny_llama, tiny_text):
    """The layer-by-layer runner sees exactly the activations of an ordinary full forward pass."""
    model = lowc.load(tiny_llama)
    ids = calibration_ids(model.tokenizer, tiny_text, samples=4, seqlen=16)
    assert ids.shape == (4, 16)
    norms = input_norms(model, ids, batch_size=3, progress=False)
    expected: dict[str, torch.Tensor] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            handles.append(m.register_forward_pre_hook(
                lambda mod, args, name=name: expected.__setitem__(name, args[0].reshape(-1, args[0].shape[-1]).pow(2).sum(0).sqrt())))
    with torch.inference_mode():
        model(ids)
    for h in handles:
        h.remove()
    assert norms.keys() == expected.keys() and len(norms) == 14
    for name in norms:
        assert torch.allclose(norms[name], expected[name], rtol=1e-4), name


def test_padding_and_truncation_of_a_tokenizer_json_are_ignored(tmp_path, tiny_text):
    """sentence-transformers ship tokenizer.json files that pad every text to a fixed length (all-MiniLM-L6-v2: 128);
    lowc takes raw ids, so calibration windows and embedding means hold no [PAD] tokens."""
    from tokenizers import Tokenizer

    from conftest import word_tokenizer
    from lowc.runtime.evaluate import sentence_embeddings
    from lowc.runtime.tokenizer import TextTokenizer

    word_tokenizer(tmp_path)
    plain = TextTokenizer(tmp_path, {})
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    tok.enable_padding(length=32, pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=4)
    tok.save(str(tmp_path / "tokenizer.json"))
    assert len(tok.encode("the of and to in a").ids) == 32  # what the file asks for
    padded = TextTokenizer(tmp_path, {})
    texts = ["the of and to in a", "school time"]
    assert padded.encode_batch(texts) == plain.encode_batch(texts) and [len(e) for e in plain.encode_batch(texts)] == [6, 2]
    ids = calibration_ids(padded, tiny_text, samples=4, seqlen=16)
    assert (ids != 0).all()  # no [PAD] in the windows

    class Mean(torch.nn.Module):  # an "encoder" whose embedding is the mean token id over the mask
        def embed(self, ids, mask):
            return ((ids * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True)).float()

        def parameters(self):
            return iter([torch.zeros(1)])

    got = sentence_embeddings(Mean(), padded, texts, max_length=16)
    assert got[1, 0] == sum(plain.encode("school time")) / 2


def test_calibration_text_too_short(tiny_llama, tiny_text):
    model = lowc.load(tiny_llama)
    with pytest.raises(UsageError, match="lower --calib-samples"):
        calibration_ids(model.tokenizer, tiny_text, samples=1000, seqlen=64)


def test_wanda_recipe_needs_calibration_and_vnm(tiny_llama, tmp_path):
    with pytest.raises(UsageError, match="--calib"):
        lowc.Recipe(vnm="16:2:5", importance="wanda")
    with pytest.raises(UsageError, match="--vnm"):
        lowc.Recipe(wbits=6, importance="ria", calib="x.txt")


def test_wanda_keeps_high_activation_channels(tiny_llama, tiny_text, tmp_path):
    """Wanda changes the mask toward channels with large activations, and the manifest records the calibration."""
    art = lowc.compress(tiny_llama, tmp_path / "a", vnm="16:2:5", importance="wanda", calib=str(tiny_text),
                        calib_samples=4, calib_seqlen=16, progress=False)
    mag = lowc.compress(tiny_llama, tmp_path / "m", vnm="16:2:5", progress=False)
    a, m = lowc.load(art), lowc.load(mag)
    name = "model.layers.1.mlp.down_proj"
    model = lowc.load(tiny_llama)
    ids = calibration_ids(model.tokenizer, tiny_text, samples=4, seqlen=16)
    norm = input_norms(model, ids, progress=False)[name]
    w = model.get_submodule(name).weight
    kept_w, kept_m = a.get_submodule(name).dense_weight() != 0, m.get_submodule(name).dense_weight() != 0
    score = w.abs() * norm
    assert float(score[kept_w].sum()) > float(score[kept_m].sum())
    assert a.lowc_manifest["metrics"]["calibration"]["tokens"] == 64
