"""The onnxruntime MatMulNBits peer of benchmarks/kernels_gemm.py computes lowc's INT4 weights exactly."""

import sys
from pathlib import Path

import pytest
import torch

from lowc.kernels import packing, reference

pytest.importorskip("onnxruntime")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import ort_matmulnbits  # noqa: E402


@pytest.mark.parametrize("n, k, block, m", [(64, 256, 128, 1), (48, 200, 32, 3), (16, 128, 128, 16)])
def test_same_product_as_the_reference(n, k, block, m):
    codes = torch.randint(-8, 8, (n, k))
    scales = (torch.rand(n, -(-k // block)) * 0.02 + 1e-3).half()
    dense = reference.dequantize_int(packing.pack_int(codes, 4), scales, 4, block, k)
    x = torch.randn(m, k)
    peer = ort_matmulnbits.MatMulNBitsPeer(codes, scales, block, m, copies=2)
    torch.testing.assert_close(peer(x), x @ dense.T, rtol=1e-5, atol=1e-5)
    peer.run()
    torch.testing.assert_close(peer.ys[1], peer.ys[0])  # every copy holds the same weight


def test_nibbles_and_range():
    codes = torch.tensor([[-8, 7, 0, -1]])
    assert ort_matmulnbits.pack_matmulnbits(codes, 4).tolist() == [[[0xF0, 0x78]]]
    with pytest.raises(ValueError, match="lie in"):
        ort_matmulnbits.pack_matmulnbits(torch.tensor([[9, 0]]), 2)
