"""The V:N:M sparse-tensor-core GEMM against the reference, on the GPU (skipped without CUDA); plus the nvcc syntax
check of the CUDA source (skipped without nvcc) and the CPU error path."""

import shutil
import subprocess

import pytest
import torch
from conftest import random_vnm_pattern

from lowc.kernels import vnm_spmm as vnm_mod
from lowc.kernels.reference import quantize_activations, vnm_to_dense
from lowc.kernels.vnm_layout import to_vnm_int8_layout, to_vnm_kernel_layout
from lowc.kernels.vnm_spmm import VNMConfig, vnm_spmm, vnm_spmm_int8

HAS_CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (sparse tensor cores)")


def random_vnm(rows, cols, v, m, dtype, seed, device="cuda"):
    """Random canonical V:N:M storage (random kept columns, positions and values) and its fp32 dense matrix."""
    g = torch.Generator().manual_seed(seed)
    columns, positions, padding = random_vnm_pattern(rows, cols, v, m, g)
    values = torch.randn(rows, 2 * (-(-cols // m)), generator=g).to(dtype).masked_fill(padding, 0)
    dense = vnm_to_dense(values.float(), columns, positions, v, m, (rows, cols))
    w = to_vnm_kernel_layout(values, columns, positions, v, m, (rows, cols)).to(device)
    return w, dense.to(device)


def check(y, ref, what):
    assert y.shape == ref.shape, what
    y = y.float()
    assert torch.isfinite(y).all(), what
    err = (y - ref).abs()
    tol = 1e-2 * ref.abs() + 1e-2 * (ref.abs().max() + 1) * 2 ** -6
    bad = err > tol
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} outputs off, max error "
                           f"{float(err.max()):.4g} (max |ref| {float(ref.abs().max()):.4g})")


def test_cpu_raises_clear_error():
    if HAS_CUDA:
        pytest.skip("CUDA is available: the CPU error path is not reachable")
    w, _ = random_vnm(64, 50, 64, 5, torch.bfloat16, 0, device="cpu")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        vnm_spmm(torch.randn(3, 50).to(torch.bfloat16), w)


@pytest.mark.parametrize("half,ordered,int8,group_pairs", [(False, True, False, 0), (True, True, False, 0),
                                                           (False, False, False, 0), (False, True, True, 0),
                                                           (False, True, True, 4)])
def test_cuda_source_compiles_with_nvcc(tmp_path, half, ordered, int8, group_pairs):
    """CI syntax check: nvcc compiles the kernel source for sm_90a for the configs the runtime picks."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found: the CUDA source is compiled only where the CUDA toolkit is installed")
    src = vnm_mod.kernel_source()
    configs = [VNMConfig(4, 1, 1, 4), VNMConfig(4, 2, 8, 2, xt=True)]
    if int8:
        configs = [VNMConfig(4, 1, 1, 2), VNMConfig(4, 1, 2, 2), VNMConfig(4, 2, 8, 1)]
    elif not half and ordered:  # every tile shape once; the dtype / mma spelling variants on two of them
        configs += [VNMConfig(4, 1, 2, 4), VNMConfig(2, 1, 4, 2), VNMConfig(4, 2, 8, 2), VNMConfig(1, 1, 8, 2),
                    VNMConfig(1, 1, 2, 4, xt=True)]
    for cfg in configs:
        path = tmp_path / f"k{cfg.wr}{cfg.wt}{cfg.nt}{cfg.kcp}{int(cfg.xt)}{int(int8)}{group_pairs}.cu"
        path.write_text(vnm_mod._defines(half, cfg, ordered, int8, group_pairs) + src)
        proc = subprocess.run([nvcc, "-std=c++17", "-arch=sm_90a", "-cubin", "-o", str(path.with_suffix(".cubin")),
                               str(path)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"nvcc failed for {cfg}:\n{proc.stderr[-3000:]}"


@cuda_only
@pytest.mark.parametrize("v", [32, 64, 128])
@pytest.mark.parametrize("m", [4, 5, 8, 16])
@pytest.mark.parametrize("tokens", [1, 7, 16, 128, 300])
def test_matches_reference(v, m, tokens):
    rows = 2 * v + 16 * (m % 3) + 5  # not a multiple of V (padding rows) nor of 16
    cols = 37 * m + 3  # not a multiple of M (padding columns)
    seed = v * 1000 + m * 10 + tokens
    w, dense = random_vnm(rows, cols, v, m, torch.bfloat16, seed)
    torch.manual_seed(seed)
    x = torch.randn(tokens, cols, device="cuda").to(torch.bfloat16)
    ref = x.float() @ dense.t()
    check(vnm_spmm(x, w), ref, f"V={v} M={m} T={tokens}")


@cuda_only
@pytest.mark.parametrize("tokens", [1, 16, 200])
def test_fp16_bias_and_batch_dims(tokens):
    w, dense = random_vnm(200, 333, 64, 5, torch.float16, tokens)
    x = torch.randn(tokens, 2, 333, device="cuda").to(torch.float16)
    bias = torch.randn(200, device="cuda").to(torch.float16)
    y = vnm_spmm(x, w, bias)
    assert y.dtype == torch.float16 and y.shape == (tokens, 2, 200)
    check(y, x.float() @ dense.t() + bias.float(), f"fp16 bias T={tokens}")


@cuda_only
@pytest.mark.parametrize("cfg", [VNMConfig(4, 1, 1, 4, 1), VNMConfig(4, 1, 2, 4, 3), VNMConfig(2, 2, 4, 2, 5),
                                 VNMConfig(4, 2, 8, 2, 1), VNMConfig(1, 1, 8, 1, 2), VNMConfig(4, 1, 8, 4, 7),
                                 VNMConfig(4, 2, 8, 2, 1, True), VNMConfig(2, 1, 4, 4, 3, True),
                                 VNMConfig(1, 2, 2, 1, 2, True)])
def test_explicit_configs_and_split_k(cfg):
    w, dense = random_vnm(192, 1000, 64, 8, torch.bfloat16, 7)
    x = torch.randn(37, 1000, device="cuda").to(torch.bfloat16)
    bias = torch.randn(192, device="cuda").to(torch.bfloat16)
    check(vnm_spmm(x, w, bias, config=cfg), x.float() @ dense.t() + bias.float(), f"config {cfg}")


@cuda_only
def test_non_contiguous_input_and_pruned_weight():
    from lowc.compress.sparsity.vnm import VNMSpec, vnm_compress

    spec = VNMSpec.parse("64:2:5")
    weight = torch.randn(300, 512).to(torch.bfloat16)
    st = vnm_compress(weight, spec)
    w = to_vnm_kernel_layout(st["values"], st["columns"], st["positions"], 64, 5, (300, 512)).to("cuda")
    dense = vnm_to_dense(st["values"].float(), st["columns"], st["positions"], 64, 5, (300, 512)).cuda()
    x = torch.randn(512, 24, device="cuda").to(torch.bfloat16).t()  # stride(-1) != 1
    check(vnm_spmm(x, w), x.float() @ dense.t(), "non-contiguous x")


@cuda_only
def test_shape_errors():
    w, _ = random_vnm(64, 50, 64, 5, torch.bfloat16, 0)
    with pytest.raises(ValueError, match="features"):
        vnm_spmm(torch.randn(3, 51, device="cuda").to(torch.bfloat16), w)
    with pytest.raises(ValueError, match="float16"):
        vnm_spmm(torch.randn(3, 50, device="cuda"), w)
    with pytest.raises(ValueError, match="bias"):
        vnm_spmm(torch.randn(3, 50, device="cuda").to(torch.bfloat16), w, torch.zeros(63, device="cuda"))


def random_int8_vnm(rows, cols, v, m, seed, meta_mode=None):
    g = torch.Generator().manual_seed(seed)
    columns, positions, padding = random_vnm_pattern(rows, cols, v, m, g)
    codes = torch.randint(-127, 128, (rows, 2 * (-(-cols // m))), generator=g).to(torch.int8).masked_fill(padding, 0)
    scales = torch.rand(rows, generator=g) * 1e-3 + 1e-4
    kwargs = {} if meta_mode is None else {"meta_mode": meta_mode}
    w = to_vnm_int8_layout(codes, scales, columns, positions, v, m, (rows, cols), **kwargs).to("cuda")
    dense = vnm_to_dense(codes.double(), columns, positions, v, m, (rows, cols)).cuda()
    return w, dense, scales.cuda()


@cuda_only
@pytest.mark.parametrize("v,m", [(64, 5), (32, 8), (128, 4), (64, 16)])
@pytest.mark.parametrize("tokens", [1, 7, 16, 100])
def test_int8_matches_reference(v, m, tokens):
    """INT8 values x per-token A8: exact integer products, scaled once; the default metadata reading
    (vnm_layout.DEFAULT_META_MODE) must be the hardware's."""
    rows, cols = 2 * v + 21, 41 * m + 1
    w, dense, scales = random_int8_vnm(rows, cols, v, m, v + m + tokens)
    x = torch.randn(tokens, cols, device="cuda").to(torch.bfloat16)
    bias = torch.randn(rows, device="cuda").to(torch.bfloat16)
    q, s = quantize_activations(x, 8)
    ref = (q.double() @ dense.t()).float() * s[:, None] * scales + bias.float()
    check(vnm_spmm_int8(x, w, bias), ref, f"int8 V={v} M={m} T={tokens}")


@cuda_only
@pytest.mark.parametrize("v,m,group", [(64, 5, 128), (32, 8, 64), (64, 16, 32)])
@pytest.mark.parametrize("tokens", [1, 16, 100])
def test_int8_group_scales_match_reference(v, m, group, tokens):
    """Group-wise scales (INT6 g128 kept values as an artifact stores them), with every split-K factor: a group
    cut between two CTAs is scaled by both."""
    rows, cols = 2 * v + 21, 97 * m + 1
    g = torch.Generator().manual_seed(v + m + tokens)
    columns, positions, padding = random_vnm_pattern(rows, cols, v, m, g)
    codes = torch.randint(-31, 32, (rows, 2 * (-(-cols // m))), generator=g).to(torch.int8).masked_fill(padding, 0)
    scales = torch.rand(rows, -(-codes.shape[1] // group), generator=g) * 1e-3 + 1e-4
    w = to_vnm_int8_layout(codes, scales, columns, positions, v, m, (rows, cols), group=group).to("cuda")
    values = codes.double() * scales.double().repeat_interleave(group, dim=1)[:, :codes.shape[1]]
    dense = vnm_to_dense(values, columns, positions, v, m, (rows, cols)).cuda()
    x = torch.randn(tokens, cols, device="cuda").to(torch.bfloat16)
    q, s = quantize_activations(x, 8)
    ref = (q.double() @ dense.t()).float() * s[:, None]
    for split in (1, 3, 0):
        cfg = vnm_mod.pick_config_int8(tokens, w)._replace(split_k=split)
        check(vnm_spmm_int8(x, w, config=cfg), ref, f"int8 groups V={v} M={m} g={group} T={tokens} split={split}")
