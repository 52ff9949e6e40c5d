"""Load-time conversion of canonical packed integer weights into the layout the Triton low-bit GEMMs read.

The canonical layout (docs/FORMAT.md) is built for storage: INT6 packs 4 codes into 3 bytes, so a code straddles
byte boundaries and a tile of 2^n codes covers 3·2^(n-2) bytes. The kernels want every unpack to be one shift and
one mask on an aligned byte, and every tile to be a power-of-two number of bytes. The conversion runs once per
weight when a model is loaded, so it is plain torch.

Kernel layout of a weight W [N, K] with `bits` b and group size G (all row-major, K contiguous, so a tile of
BLOCK_N rows is BLOCK_N contiguous runs of bytes and loads 16 bytes per thread):

- K is padded with zero codes to `k_pad`, a multiple of `K_ALIGN`, so the kernels never mask weight loads.
- INT8: `codes` int8 [N, k_pad], the signed codes as they are.
- INT4: `codes` uint8 [N, k_pad/2] of *biased* codes u = c + 8 in [0, 16), column 2i in the low nibble and
  2i+1 in the high nibble of byte i. Biased codes turn into floats with one OR and one subtraction
  (fp16 0x6400|u is 1024+u, bf16 0x4300|u is 128+u), with no sign extension and no int-to-float conversion.
- INT6: biased codes u = c + 32 in [0, 64) split into two planes: `codes` uint8 [N, k_pad/2] holds the low 4
  bits exactly like INT4, `high` uint8 [N, k_pad/4] the top 2 bits, column 4i+j at bits 2j of byte i.
- `scales` fp16 [ceil(k_pad/G), N]: transposed so a tile's scales for one group are one contiguous load; groups
  that lie wholly in the padding get scale 1 (their codes are 0). A per-channel weight (G >= K) has one row.
  The kernels take the scales' row stride, so `scales` may also be a column slice of a wider matrix: that is how
  projections fused at load time (`concat_rows`) keep their own weights as views of the fused one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .packing import packed_columns, pack_int, unpack_int

GEMM_BITS = (4, 6, 8)  # weight widths the Triton GEMMs unpack (PackedLinear widens INT2/INT3 codes to INT4)

K_ALIGN = 256


def code_bias(bits: int) -> int:
    """Offset added to signed codes in the kernel layout (0 for INT8, which stays signed)."""
    return 0 if bits == 8 else 1 << (bits - 1)


@dataclass
class LowbitWeight:
    """A quantized weight W [n, k] in kernel layout (see the module docstring); `k_pad` >= k is the stored width."""

    bits: int
    group: int
    n: int
    k: int
    k_pad: int
    codes: torch.Tensor
    high: torch.Tensor | None
    scales: torch.Tensor

    @property
    def per_channel(self) -> bool:
        """One scale per output row (group covers all of K): the kernels apply it once, after the K loop."""
        return self.scales.shape[0] == 1

    @property
    def nbytes(self) -> int:
        """Bytes a GEMM must read for this weight (codes, high plane and scales)."""
        total = self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()
        if self.high is not None:
            total += self.high.numel() * self.high.element_size()
        return total

    def to(self, device: torch.device | str) -> "LowbitWeight":
        """The same weight on another device."""
        high = None if self.high is None else self.high.to(device)
        return LowbitWeight(self.bits, self.group, self.n, self.k, self.k_pad, self.codes.to(device), high,
                            self.scales.to(device))


def _pair_nibbles(u: torch.Tensor) -> torch.Tensor:
    """[N, 2P] values < 16 -> uint8 [N, P], even column in the low nibble."""
    u = u.to(torch.int32)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).to(torch.uint8)


def _quad_crumbs(u: torch.Tensor) -> torch.Tensor:
    """[N, 4P] values < 4 -> uint8 [N, P], column 4i+j at bits 2j of byte i."""
    u = u.to(torch.int32)
    return (u[:, 0::4] | (u[:, 1::4] << 2) | (u[:, 2::4] << 4) | (u[:, 3::4] << 6)).to(torch.uint8)


def to_lowbit_layout(qweight: torch.Tensor, scales: torch.Tensor, bits: int, group: int,
                     columns: int) -> LowbitWeight:
    """Convert canonical `qweight` [N, packed_columns(columns, bits)] and `scales` [N, ceil(columns/group)] into
    the kernel layout, on the tensors' device. Raises ValueError on shapes that do not match the format."""
    if bits not in GEMM_BITS:
        raise ValueError(f"the low-bit GEMM kernels take bits in {GEMM_BITS} (widen INT2/INT3 codes to INT4 first), "
                         f"got bits={bits}")
    if qweight.dim() != 2 or qweight.shape[1] != packed_columns(columns, bits):
        raise ValueError(f"qweight must be [N, {packed_columns(columns, bits)}] for {columns} INT{bits} columns, "
                         f"got {list(qweight.shape)}")
    n = qweight.shape[0]
    n_groups = -(-columns // group)
    if tuple(scales.shape) != (n, n_groups):
        raise ValueError(f"scales must be [{n}, {n_groups}] for group {group}, got {list(scales.shape)}")
    k_pad = -(-columns // K_ALIGN) * K_ALIGN
    codes = torch.nn.functional.pad(unpack_int(qweight, bits, columns).to(torch.int32), (0, k_pad - columns))
    high = None
    if bits == 8:
        packed = codes.to(torch.int8)
    else:
        u = codes + code_bias(bits)
        packed = _pair_nibbles(u & 0xF)
        if bits == 6:
            high = _quad_crumbs(u >> 4).contiguous()
    s = scales.to(torch.float16)
    if n_groups > 1:
        padded_groups = -(-k_pad // group)
        s = torch.nn.functional.pad(s, (0, padded_groups - n_groups), value=1.0)
    return LowbitWeight(bits, group, n, columns, k_pad, packed.contiguous(), high, s.t().contiguous())


def lowbit_codes(w: LowbitWeight) -> torch.Tensor:
    """Signed codes int8 [n, k] decoded from the kernel layout (the inverse of the packing in `to_lowbit_layout`)."""
    if w.bits == 8:
        return w.codes[:, : w.k].to(torch.int8)
    b = w.codes.to(torch.int32)
    u = torch.stack([b & 0xF, b >> 4], dim=-1).reshape(w.n, w.k_pad)
    if w.bits == 6:
        h = w.high.to(torch.int32)
        u = u | (torch.stack([(h >> (2 * j)) & 0x3 for j in range(4)], dim=-1).reshape(w.n, w.k_pad) << 4)
    return (u[:, : w.k] - code_bias(w.bits)).to(torch.int8)


def from_lowbit_layout(w: LowbitWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """Back to canonical (`qweight`, `scales`): the exact inverse of `to_lowbit_layout`."""
    qweight = pack_int(lowbit_codes(w), w.bits)
    n_groups = -(-w.k // w.group)
    return qweight, w.scales.t()[:, :n_groups].contiguous()


def dequantize_lowbit(w: LowbitWeight) -> torch.Tensor:
    """Float32 W [n, k] that a kernel-layout weight encodes (codes times their group's scale)."""
    scales = w.scales.t().float()
    if not w.per_channel:
        scales = scales.repeat_interleave(w.group, dim=1)[:, : w.k]
    return lowbit_codes(w).float() * scales


def concat_rows(parts: list[LowbitWeight]) -> tuple[LowbitWeight, list[LowbitWeight]]:
    """Stack weights that read the same input ([n_i, k], same bits and group) into one [sum n_i, k] weight, so one
    GEMM launch computes them all; returns it and each part again as a view of its rows in it (the parts' old
    tensors can then be freed: the fused weight and the views share memory)."""
    first = parts[0]
    for p in parts[1:]:
        if (p.bits, p.group, p.k, p.k_pad, p.per_channel) != (first.bits, first.group, first.k, first.k_pad,
                                                               first.per_channel):
            raise ValueError("concat_rows needs weights of the same bits, group and input features")
    codes = torch.cat([p.codes for p in parts])
    high = None if first.high is None else torch.cat([p.high for p in parts])
    scales = torch.cat([p.scales for p in parts], dim=1)
    fused = LowbitWeight(first.bits, first.group, codes.shape[0], first.k, first.k_pad, codes, high, scales)
    views, r0 = [], 0
    for p in parts:
        r1 = r0 + p.n
        views.append(LowbitWeight(p.bits, p.group, p.n, p.k, p.k_pad, codes[r0:r1],
                                  None if high is None else high[r0:r1], scales[:, r0:r1]))
        r0 = r1
    return fused, views
