"""Bit-plane layout of the BTC (binary tensor core) GEMM, and its exact emulation on any device.

A signed B-bit code q is its two's-complement bits: q = -2^(B-1) p_(B-1) + sum_(b < B-1) 2^b p_b. A product of a
B_w-bit weight and a B_a-bit activation row is then a weighted sum of B_w * B_a binary dot products, each one
AND + popcount, which binary tensor cores compute 128 columns per instruction:

    Wq . Xq = sum_(i, j) c_i c_j popc(W_i AND X_j),  c_b = 2^b (negated for the top, sign, plane)

This is the FlexQ / ABQ-LLM way to run any W/A bit pair (W6A6, W4A8, W2A8, ...) on one kernel.

Layout (`BTCWeight.planes`, and the activations' planes): int32 [bits, rows, k_pad / 32], k_pad a multiple of
512, bit k % 32 of word k / 32 (zero past K). Within each 512-column chunk the 16 words are stored transposed 4 x 4
(storage word 4*w + s = word w of the chunk's 128-column sub-group s), so that one 16-byte load per lane feeds the
MMAs of four sub-groups and each MMA covers exactly one 128-column sub-group (see cuda/btc_gemm.cu). Weight rows
are padded to a multiple of 16 with zero planes. Scale groups must be 128 or 256 columns, a multiple of 512, or the
whole row; scales are float32 [ceil(k_pad / G), N] (one row when per channel), 1 past the last group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .packing import unpack_int

CHUNK = 512  # columns per 16-word chunk (one uint4 load per lane per plane)
SUB = 128  # columns per binary MMA


@dataclass
class BTCWeight:
    """A quantized weight W [n, k] as bit planes (see the module docstring)."""

    bits: int
    group: int  # columns per scale; k_pad or more means one scale per row
    n: int
    k: int
    k_pad: int
    planes: torch.Tensor  # int32 [bits, n_pad, k_pad / 32]
    scales: torch.Tensor  # float32 [groups, n]

    @property
    def per_channel(self) -> bool:
        return self.scales.shape[0] == 1

    @property
    def n_pad(self) -> int:
        return self.planes.shape[1]

    @property
    def nbytes(self) -> int:
        return self.planes.numel() * 4 + self.scales.numel() * 4

    def to(self, device: torch.device | str) -> "BTCWeight":
        return BTCWeight(self.bits, self.group, self.n, self.k, self.k_pad, self.planes.to(device),
                         self.scales.to(device))


def padded_k(k: int) -> int:
    return -(-k // CHUNK) * CHUNK


def bit_planes(q: torch.Tensor, bits: int, k_pad: int) -> torch.Tensor:
    """Signed codes [R, K] (|q| within `bits` two's complement) -> int32 bit planes [bits, R, k_pad / 32] in the
    chunk-transposed word order."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        raise ValueError(f"codes outside the {bits}-bit range [{lo}, {hi}]")
    r, k = q.shape
    qp = F.pad(q.to(torch.int32), (0, k_pad - k))
    shifts = torch.arange(bits, device=q.device, dtype=torch.int32).view(bits, 1, 1)
    b = ((qp.unsqueeze(0) >> shifts) & 1).view(bits, r, k_pad // 32, 32).to(torch.int64)
    words = (b << torch.arange(32, device=q.device, dtype=torch.int64)).sum(-1)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return words.view(bits, r, k_pad // CHUNK, 4, 4).transpose(-1, -2).reshape(bits, r, k_pad // 32)


def plane_bits(planes: torch.Tensor) -> torch.Tensor:
    """The {0, 1} entries of planes [bits, R, KW] in column order: int8 [bits, R, KW * 32]."""
    bits, r, kw = planes.shape
    words = planes.view(bits, r, kw // 16, 4, 4).transpose(-1, -2).reshape(bits, r, kw).to(torch.int64)
    return ((words.unsqueeze(-1) >> torch.arange(32, device=planes.device)) & 1).to(torch.int8).view(bits, r, -1)


def codes_from_planes(planes: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of `bit_planes`: int32 codes [R, k]."""
    b = plane_bits(planes).to(torch.int32)
    bits = b.shape[0]
    weights = torch.tensor([1 << i for i in range(bits - 1)] + [-(1 << (bits - 1))], dtype=torch.int32,
                           device=planes.device)
    return (b * weights.view(bits, 1, 1)).sum(0)[:, :k]


def check_group(group: int, k: int) -> None:
    if group < k and not (group in (SUB, 2 * SUB) or group % CHUNK == 0):
        raise ValueError(f"the BTC GEMM takes scale groups of 128 or 256 columns, a multiple of 512, or one scale "
                         f"per row; got group {group} for {k} columns")


def to_btc_layout(qweight: torch.Tensor, scales: torch.Tensor, bits: int, group: int, columns: int) -> BTCWeight:
    """Canonical packed codes [N, packed] + scales [N, ceil(K / G)] (the artifact's form) -> `BTCWeight`."""
    check_group(group, columns)
    codes = unpack_int(qweight, bits, columns)
    n = codes.shape[0]
    k_pad = padded_k(columns)
    n_pad = -(-n // 16) * 16
    planes = bit_planes(F.pad(codes, (0, 0, 0, n_pad - n)), bits, k_pad)
    s = scales.float().t().contiguous()  # [groups, N]
    if s.shape[0] > 1:
        s = torch.cat([s, s.new_ones(-(-k_pad // group) - s.shape[0], n)])
    return BTCWeight(bits, group if s.shape[0] > 1 else max(group, k_pad), n, columns, k_pad, planes, s)


def btc_emulate(x_planes: torch.Tensor, x_scales: torch.Tensor, w: BTCWeight,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The kernel's arithmetic in torch: one exact binary product per (weight plane, activation plane) pair and
    scale group (float64 sums of 0/1 products are exact), weighted by +-2^(i+j), converted to fp32 and scaled per
    group in order, then per token; for tests of the layout and of the bit-plane algebra."""
    xb, wb = plane_bits(x_planes).double(), plane_bits(w.planes).double()[:, : w.n]
    abits, wbits = xb.shape[0], wb.shape[0]
    coef = [[(-1 if (i == wbits - 1) != (j == abits - 1) else 1) * float(1 << (i + j)) for j in range(abits)]
            for i in range(wbits)]
    step = w.k_pad if w.per_channel else w.group
    acc = torch.zeros(xb.shape[1], w.n, dtype=torch.float32, device=xb.device)
    for gi, k0 in enumerate(range(0, w.k_pad, step)):
        sl = slice(k0, k0 + step)
        part = sum(coef[i][j] * (xb[j][:, sl] @ wb[i][:, sl].t()) for i in range(wbits) for j in range(abits))
        acc = acc + part.to(torch.float32) * w.scales[gi]
    acc = acc * x_scales.float().unsqueeze(-1)
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(out_dtype)
