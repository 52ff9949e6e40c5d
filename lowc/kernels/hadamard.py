"""Block Hadamard rotation of a Linear's input channels (QuaRot-style incoherence processing).

A module stored with `rotate = b` holds W R instead of W, where R is block-diagonal with K / b copies of a
Hadamard matrix of order b (a power of two); its inputs are rotated the same way before they are quantized, so
(x R)(W R)ᵀ = x Wᵀ. Rotating spreads the few large activation channels (and weight outliers) over a whole block,
which is what makes per-token A6/A8 and W4 rounding lose less.

R is applied as H·c₁ to the inputs and H·c₂ to the weight, with H the ±1 Sylvester matrix, c₁ = 2^-ceil(log2(b)/2)
and c₁·c₂ = 1/b: the input side's entries (±c₁, a power of two) are exact in fp16/bf16, so a GPU computes the
input rotation with one rounding (of its output), and the inputs keep about their size (|x R| ≈ |x|).
"""

from __future__ import annotations

import functools

import torch

MAX_BLOCK = 128  # the block lowc chooses at most: big enough to spread outliers, small enough to cost ~b/N of the GEMM
MIN_BLOCK = 16  # smaller blocks hardly spread anything; such modules stay unrotated


def rotation_block(in_features: int, limit: int = MAX_BLOCK) -> int | None:
    """The largest power of two <= `limit` dividing `in_features`, or None when it is below MIN_BLOCK."""
    block = 1
    while block * 2 <= limit and in_features % (block * 2) == 0:
        block *= 2
    return block if block >= MIN_BLOCK else None


def check_block(block: int, in_features: int) -> None:
    """Raise ValueError unless `block` is a power of two >= 2 dividing `in_features`."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 2 or block & (block - 1) or in_features % block:
        raise ValueError(f"a Hadamard block must be a power of two >= 2 dividing the {in_features} input features, "
                         f"got {block!r}")


def input_factor(block: int) -> float:
    """c₁ = 2^-ceil(log2(b)/2): the scale of the input side's ±1 Hadamard matrix."""
    return 2.0 ** -((block.bit_length() - 1 + 1) // 2)


@functools.lru_cache(maxsize=None)
def sylvester(block: int) -> torch.Tensor:
    """The ±1 Hadamard matrix of order `block` (a power of two), Sylvester's construction, float64 (symmetric)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.lru_cache(maxsize=32)
def _matrix(block: int, factor: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # an ordinary tensor even when first asked for under inference_mode: the cached matrix is shared with code that
    # trains through the rotation afterwards (autograd cannot save inference tensors)
    with torch.inference_mode(False):
        return (sylvester(block) * factor).to(dtype=dtype, device=device)


def _apply(x: torch.Tensor, block: int, factor: float, dtype: torch.dtype) -> torch.Tensor:
    h = _matrix(block, factor, dtype, x.device)
    return (x.to(dtype).unflatten(-1, (-1, block)) @ h).flatten(-2)


def rotate_inputs(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [..., K] times R's input-side form, in x's dtype (fp16/bf16 on a GPU: exact matrix entries, fp32 sums)."""
    return _apply(x, block, input_factor(block), x.dtype)


def rotate_weight(weight: torch.Tensor, block: int) -> torch.Tensor:
    """W [R, K] times R's weight-side form (float32), the matrix a rotated module stores and quantizes."""
    return _apply(weight.float(), block, 1.0 / (block * input_factor(block)), torch.float32)


def unrotate_weight(weight: torch.Tensor, block: int) -> torch.Tensor:
    """The weight of the unrotated inputs from a stored W R (float32): W R Hᵀ c₁ = W, since H is symmetric."""
    return _apply(weight.float(), block, input_factor(block), torch.float32)


__all__ = ["rotation_block", "check_block", "sylvester", "input_factor", "rotate_inputs", "rotate_weight",
           "unrotate_weight", "MAX_BLOCK"]
