"""V:N:M masks: the exact definition, the exhaustive column choice, padding, and the reference decoder."""

import itertools

import pytest
import torch

from lowc.compress.sparsity.vnm import VNMSpec, vnm_compress, vnm_mask
from lowc.errors import UsageError
from lowc.kernels.packing import pack_2bit
from lowc.kernels.reference import vnm_to_dense


def _dense(storage, spec, shape):
    rows = shape[0]
    pos = pack_2bit(storage["positions"].reshape(rows, -1))
    return vnm_to_dense(storage["values"], storage["columns"], pos, spec.v, spec.m, shape)


@pytest.mark.parametrize("text", ["64:3:5", "0:2:5", "64:2:3", "64:2", "a:b:c", "24:2:5", "64:2:17", ""])
def test_malformed_specs_rejected(text):
    with pytest.raises(UsageError, match="--vnm"):
        VNMSpec.parse(text)


@pytest.mark.parametrize("spec_text,shape", [("16:2:5", (40, 37)), ("32:2:8", (64, 64)), ("16:2:4", (16, 24)),
                                             ("64:2:5", (130, 384))])
def test_structure_and_values(spec_text, shape):
    spec = VNMSpec.parse(spec_text)
    w = torch.randn(*shape)
    st = vnm_compress(w, spec)
    rp, kp = spec.padded_shape(*shape)
    assert st["values"].shape == (shape[0], 2 * kp // spec.m)
    assert st["columns"].shape == (rp // spec.v, kp // spec.m, 4)
    dense = _dense(st, spec, shape)
    kept = dense != 0
    # kept entries are exactly the original weights, pruned ones are zero
    assert torch.equal(dense[kept], w[kept])
    padded = torch.nn.functional.pad(kept, (0, kp - shape[1], 0, rp - shape[0]))
    blocks = padded.reshape(rp // spec.v, spec.v, kp // spec.m, spec.m)
    # each row keeps at most 2 per block, and all rows of a block use only the block's 4 columns
    assert int(blocks.sum(-1).max()) <= 2
    assert int(blocks.any(1).sum(-1).max()) <= 4
    # density is 2/M of the padded matrix (random weights are never exactly zero)
    assert int(kept.sum()) == 2 * (kp // spec.m) * shape[0] - _padded_kept(st, spec, shape)


def _padded_kept(st, spec, shape):
    """Kept slots that fall in padding columns (value 0, so not counted as kept in the dense view)."""
    from lowc.compress.sparsity.vnm import kept_column_index

    return int((kept_column_index(st["columns"], st["positions"], spec) >= shape[1]).sum())


def test_column_choice_is_exhaustive_optimum():
    spec = VNMSpec(16, 2, 6)
    imp = torch.rand(32, 12)
    columns, positions = vnm_mask(imp, spec)
    for rb in range(2):
        for kb in range(2):
            block = imp[rb * 16:(rb + 1) * 16, kb * 6:(kb + 1) * 6]
            best = max(itertools.combinations(range(6), 4),
                       key=lambda c: float(block[:, list(c)].topk(2, dim=1).values.sum()))
            score = lambda c: float(block[:, list(c)].topk(2, dim=1).values.sum())  # noqa: E731
            assert score(tuple(columns[rb, kb].tolist())) == pytest.approx(score(best))


def test_magnitude_pruning_keeps_largest_pair_within_kept_columns():
    spec = VNMSpec(16, 2, 4)  # plain 2:4: every row keeps its 2 largest of each 4
    w = torch.randn(16, 8)
    dense = _dense(vnm_compress(w, spec), spec, (16, 8))
    expected = torch.zeros_like(w)
    for r in range(16):
        for b in range(2):
            seg = w[r, 4 * b:4 * b + 4]
            idx = seg.abs().topk(2).indices + 4 * b
            expected[r, idx] = w[r, idx]
    assert torch.equal(dense, expected)
