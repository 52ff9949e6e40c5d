"""V:N:M kernel-layout weights expanded to dense matrices (lowc/kernels/vnm_dense.py; Triton, the interpreter on
CPU): 16-bit values exactly the canonical weight for every V / M / odd shape of the layout tests, and the prefill
product through it; INT8 codes and their scales exactly the dense INT8 weight the W8A8 GEMM reads."""

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


@pytest.mark.parametrize("meta_mode", ["rows", "cols"])
@pytest.mark.parametrize("v,m,rows,cols,group", [(64, 5, 100, 300, 128), (32, 4, 70, 133, None),
                                                  (16, 8, 40, 257, 64), (128, 6, 130, 1000, 32),
                                                  (64, 5, 60, 200, 32)])
def test_int8_expansion_is_the_canonical_weight(meta_mode, v, m, rows, cols, group):
    """INT8 codes land on their dense columns under either metadata reading, zeros elsewhere; row scales stay row
    scales and a group of g kept values becomes the dense group of g*M/2 columns with the same scale."""
    from lowc.kernels.lowbit_layout import dequantize_lowbit
    from lowc.kernels.vnm_dense import dense_int8_group, vnm_int8_lowbit
    from lowc.kernels.vnm_layout import to_vnm_int8_layout

    values, columns, packed, _ = random_canonical(rows, cols, v, m, seed=rows + cols)
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(-31, 32, values.shape, generator=g).masked_fill(values == 0, 0).to(torch.int8)
    n_scales = 1 if group is None else -(-codes.shape[1] // group)
    scales = (torch.rand(rows, n_scales, generator=g) * 0.02 + 1e-3).half()
    w = to_vnm_int8_layout(codes, scales.float(), columns, packed, v, m, (rows, cols), meta_mode=meta_mode,
                           group=group)
    if group is not None and group * m // 2 % 32:
        assert dense_int8_group(w) is None and vnm_int8_lowbit(w) is None  # the GEMM's K tiles cannot fit it
        return
    lw = vnm_int8_lowbit(w.to(DEVICE))
    dense_codes = vnm_to_dense(codes.float(), columns, packed, v, m, (rows, cols))
    assert torch.equal(lw.codes[:, :cols].float().cpu(), dense_codes) and not lw.codes[:, cols:].any()
    per_value = scales.float().repeat_interleave(group or codes.shape[1], 1)[:, :codes.shape[1]]
    want = vnm_to_dense(codes.float() * per_value, columns, packed, v, m, (rows, cols))
    torch.testing.assert_close(dequantize_lowbit(lw)[:, :cols].float().cpu(), want, rtol=0, atol=0)


@pytest.mark.parametrize("kernel,signature,const", [
    ("vnm_dense_kernel", ("*bf16", "*i32", "*i32", "*bf16") + ("i32",) * 4, (("V", 64),)),
    ("vnm_int8_dense_kernel", ("*i8", "*i32", "*i32", "*i8") + ("i32",) * 5, (("V", 32), ("ROWS_META", True))),
    ("vnm_int8_dense_kernel", ("*i8", "*i32", "*i32", "*i8") + ("i32",) * 5, (("V", 128), ("ROWS_META", False)))])
def test_kernels_compile_for_hopper(kernel, signature, const):
    """The expansion kernels lower to PTX for sm_90 (compiled in a process without the interpreter), so a GPU run
    does not meet a compile error the interpreter cannot show."""
    from lowc.export.tensorrt_aot import _compile

    compiled = _compile("vnm_dense", kernel, const, signature, 90, 4)
    assert f".entry {compiled.name}(" in compiled.ptx and ".target sm_90" in compiled.ptx
