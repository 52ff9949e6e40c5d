"""Refitting pruned weights to the dense layer outputs: the solvers against a least-squares reference, and the
pipeline end to end on the tiny Llama."""

from __future__ import annotations

import pytest
import torch

import lowc
from lowc.artifact import open_artifact
from lowc.compress.obs import lstsq_prune, obs_prune
from lowc.compress.sparsity.vnm import VNMSpec, vnm_keep_mask
from lowc.runtime import evaluate


def _problem(seed: int, rows: int = 48, cols: int = 80, tokens: int = 600):
    """Correlated inputs (low rank plus noise, a few outlier channels), as real activations are."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 12, generator=g) @ torch.randn(12, cols, generator=g)
    x += 0.2 * torch.randn(tokens, cols, generator=g)
    x[:, :3] *= 8
    w = torch.randn(rows, cols, generator=g)
    keep = vnm_keep_mask(w.abs(), VNMSpec(16, 2, 5))
    return x, w, keep


def _output_error(x, w, new):
    return float((x @ (w - new).T).norm() / (x @ w.T).norm())


@pytest.mark.parametrize("seed", [0, 1])
def test_lstsq_is_the_per_row_least_squares_fit(seed):
    x, w, keep = _problem(seed)
    xd = x.double()
    new = lstsq_prune(w, xd.T @ xd, keep, damp=1e-12)
    assert torch.equal(new != 0, keep)
    target = x @ w.T
    for r in range(0, w.shape[0], 7):
        cols = keep[r]
        ref = torch.linalg.lstsq(x[:, cols].double(), target[:, r].double()).solution
        torch.testing.assert_close(new[r, cols].double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_solvers_beat_plain_masking_and_lstsq_beats_obs(seed):
    x, w, keep = _problem(seed)
    h = x.T @ x
    plain = _output_error(x, w, w * keep)
    obs = obs_prune(w, h, keep)
    lstsq = lstsq_prune(w, h, keep)
    assert torch.all(obs[~keep] == 0) and torch.all(lstsq[~keep] == 0)
    assert _output_error(x, w, lstsq) <= _output_error(x, w, obs) + 1e-6
    assert _output_error(x, w, obs) < 0.9 * plain


def test_dead_input_channels_and_unpruned_rows():
    x, w, keep = _problem(3)
    x[:, 10:20] = 0  # channels that never fire
    keep[5] = True  # a row that keeps everything must come back unchanged
    for solve in (obs_prune, lstsq_prune):
        new = solve(w, x.T @ x, keep)
        assert torch.isfinite(new).all() and torch.all(new[~keep] == 0)
        assert _output_error(x[:, :], w[5:6], new[5:6]) < 1e-3


def test_compress_reconstruct_gets_closer_to_the_dense_model(tiny_llama, tiny_text, tmp_path):
    options = dict(vnm="16:2:5", importance="wanda", calib=tiny_text, calib_samples=8, calib_seqlen=32, permute=False,
                   progress=False)
    plain = lowc.compress(tiny_llama, tmp_path / "plain", **options)
    refit = lowc.compress(tiny_llama, tmp_path / "refit", reconstruct="lstsq", **options)
    metrics = open_artifact(refit).manifest["metrics"]["reconstruction"]
    assert metrics["solver"] == "lstsq" and len(metrics["output_rel_error"]) == 14 and metrics["not_refitted"] == []
    dense = lowc.load(tiny_llama)
    ids = torch.tensor(evaluate.perplexity_ids(dense.tokenizer, evaluate.read_lines(tiny_text), 256)[:256]).view(4, 64)
    with torch.no_grad():
        reference = dense(ids)
        errors = [float((lowc.load(a)(ids) - reference).norm() / reference.norm()) for a in (plain, refit)]
    assert errors[1] < 0.8 * errors[0], errors


def test_reconstruct_needs_vnm_and_calibration(tiny_llama, tmp_path):
    from lowc.errors import UsageError

    with pytest.raises(UsageError, match="--calib"):
        lowc.compress(tiny_llama, tmp_path / "a", vnm="16:2:5", reconstruct="obs", progress=False)
    with pytest.raises(UsageError, match="--vnm"):
        lowc.compress(tiny_llama, tmp_path / "b", wbits=6, reconstruct="obs", calib="x.txt", progress=False)
    with pytest.raises(UsageError, match="--reconstruct"):
        lowc.compress(tiny_llama, tmp_path / "c", vnm="16:2:5", reconstruct="gptq", calib="x.txt", progress=False)
