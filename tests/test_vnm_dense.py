"""The V:N:M kernel-layout weight expanded to a dense matrix by `vnm_dense_kernel` (Triton; the interpreter on CPU):
exactly the canonical weight, for every V / M / odd shape of the layout tests, and the prefill product through it."""

import pytest
import torch
from test_vnm_layout import CASES, random_canonical

from lowc.kernels.reference import vnm_to_dense
from lowc.kernels.vnm_dense import vnm_dense_linear, vnm_dense_weight
from lowc.kernels.vnm_layout import to_vnm_kernel_layout

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("v,m,rows,cols", [c for c in CASES if c[3] <= 1000])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dense_weight_is_the_canonical_weight(v, m, rows, cols, dtype):
    values, columns, packed, _ = random_canonical(rows, cols, v, m, seed=rows + 3 * cols)
    w = to_vnm_kernel_layout(values, columns, packed, v, m, (rows, cols), dtype=dtype)
    want = vnm_to_dense(values.to(dtype).float(), columns, packed, v, m, (rows, cols))
    dense = vnm_dense_weight(w.to(DEVICE))
    assert dense.dtype == dtype and dense.shape == (rows, cols)
    assert torch.equal(dense.float().cpu(), want)


def test_dense_linear_matches_the_reference_product():
    values, columns, packed, _ = random_canonical(100, 300, 64, 5, seed=11)
    w = to_vnm_kernel_layout(values, columns, packed, 64, 5, (100, 300), dtype=torch.float16)
    x = torch.randn(7, 300, generator=torch.Generator().manual_seed(2)).half()
    bias = torch.randn(100).half()
    want = x.float() @ vnm_to_dense(values.half().float(), columns, packed, 64, 5, (100, 300)).T + bias.float()
    got = vnm_dense_linear(x.to(DEVICE), w.to(DEVICE), bias.to(DEVICE))
    torch.testing.assert_close(got.float().cpu(), want, rtol=2e-3, atol=2e-2)
