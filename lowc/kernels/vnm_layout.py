"""Load-time conversion of canonical V:N:M storage into the layout the sparse-tensor-core kernel reads, and back.

Canonical storage (docs/FORMAT.md) for a weight W [R, K] pruned to V:N:M: `values` [R, 2·Kb] (value 2b+j of a row
is its j-th kept value in column block b), `columns` uint8 [Rp/V, Kb, 4] (the 4 kept offsets of every V x M block)
and 2-bit `positions` (which 2 of those 4 a row keeps), with Kp = ceil(K/M)·M and Kb = Kp/M.

The kernel (lowc/kernels/cuda/vnm_spmm.cu) computes Yᵀ = W·Xᵀ with W as the sparse operand A of
`mma.sp.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}` (2:4 sparse A, 16 x 16 dense-equivalent per instruction).
Per V-row block it gathers the block's kept columns of X — 4 per column block, K' = 4·Kb "gathered" columns — and
over those gathered columns every row of W is exactly 2:4 sparse: gathered chunk b (4 columns) holds the row's
two kept values at the positions the canonical `positions` give. So the canonical values are already the
compressed operand A [R, K'/2] (value 2b+j sits in chunk b); the conversion only pads, reorders them into
register-fragment order and builds the metadata words.

Kernel layout (`VNMKernelWeight`):

- Kb is padded to `kb_pad`, a multiple of `KB_ALIGN` (32 column blocks = 128 gathered columns, the kernel's
  largest K chunk); rows are padded to Rp (a multiple of V, hence of 16). Padding chunks keep positions (0, 1)
  (metadata nibble 0b0100, a valid encoding) with zero values.
- `columns` int32 [Rp/V, 4·kb_pad]: absolute input-column index of every gathered column; block b's entries are
  b·M + offset. Indices >= K (canonical slots in the K padding, and all of a padding block's b·M + 0..3) are read
  as zero by the kernel.
- `values` [Rp/16, kb_pad/8, 32, 8] (x's dtype): the compressed A matrix A[Rp, 2·kb_pad] (canonical values,
  padded) in fragment order. Tile (rt, kp) covers rows 16rt..16rt+15 and two k16 steps (ktl = 0, 1: gathered
  columns 32kp + 16ktl .. +15, i.e. column blocks 8kp + 4ktl .. +3). Lane l = 4g + t of a warp holds in its 8
  elements e = 4·ktl + 2·h + j the value A[16rt + 8h + g, 16kp + 8ktl + 2t + j]: one 16-byte load gives the two
  A registers {a0a1 (row g), a2a3 (row g+8)} of both k16 steps, exactly the mma.sp A fragment (PTX ISA,
  "Matrix fragments for sparse mma.m16n8k16 with .f16 and .bf16 types": a0, a1 row groupID, a2, a3 row
  groupID + 8, compressed columns 2·threadID_in_group + {0, 1}, i.e. the two kept values of chunk
  threadID_in_group).
- `meta` int32 (bit pattern of u32) [Rp/16, kb_pad/8, 8, 2]: meta[rt, kp, g, ktl] is the metadata register of
  the k16 step ktl for sparsity selector 0, which lane 4g (threadID_in_group 0) of each quad supplies. Per the
  PTX ISA metadata figure for sparse m16n8k16 .f16/.bf16 (section 9.7.14.6.2.1 in PTX ISA 9.2, 9.7.15.6.2.1 in
  9.3) bits 15:0 describe row g and bits 31:16 row g + 8 of the 16 x 16 tile; nibble c (bits 4c+3:4c of each
  half) describes chunk c (dense columns 4c..4c+3): its low 2 bits are the index of the first kept value, its
  high 2 bits the index of the second. lowc keeps them ascending (pos0 < pos1), so the words are also valid for
  `mma.sp::ordered_metadata`.

Everything here is plain torch (any device); `emulate_spmm` replays the kernel's math from the kernel layout
alone, decoding fragments and metadata bits as the PTX ISA defines them, so the CPU tests check the layout
without a GPU. The INT8 layout (`to_vnm_int8_layout`, for mma.sp m16n8k32 .s8) is at the end of the file.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from .packing import pack_2bit, unpack_2bit

KB_ALIGN = 32  # column blocks per padding unit: 128 gathered columns, a whole number of the kernel's K chunks
PAD_NIBBLE = 0b0100  # positions (0, 1): the metadata of an all-zero padding chunk


@dataclass
class VNMKernelWeight:
    """A V:N:M weight [rows, cols] in the sparse-tensor-core kernel layout (see the module docstring)."""

    v: int
    m: int
    rows: int
    cols: int
    kb: int  # canonical column blocks, ceil(cols / m)
    kb_pad: int  # padded to a multiple of KB_ALIGN
    columns: torch.Tensor  # int32 [Rp/V, 4*kb_pad]
    values: torch.Tensor  # dtype [Rp/16, kb_pad/8, 32, 8]
    meta: torch.Tensor  # int32 [Rp/16, kb_pad/8, 8, 2]

    @property
    def rows_pad(self) -> int:
        return self.values.shape[0] * 16

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def gathered(self) -> int:
        """Gathered (kept) columns per V-row block, padding included: 4 * kb_pad."""
        return 4 * self.kb_pad

    @property
    def nbytes(self) -> int:
        """Bytes a product must read for this weight: values, metadata and column indices."""
        return sum(t.numel() * t.element_size() for t in (self.values, self.meta, self.columns))

    def to(self, device=None, dtype: torch.dtype | None = None) -> "VNMKernelWeight":
        values = self.values.to(device=device, dtype=dtype)
        return VNMKernelWeight(self.v, self.m, self.rows, self.cols, self.kb, self.kb_pad,
                               self.columns.to(device), values, self.meta.to(device))


def _unpacked_positions(positions: torch.Tensor, rows: int, kb: int) -> torch.Tensor:
    """Positions as uint8 [rows, kb, 2] from the packed artifact form [rows, ceil(2kb/4)] or the unpacked form."""
    if positions.dim() == 3:
        if tuple(positions.shape) != (rows, kb, 2):
            raise ValueError(f"positions: expected shape {(rows, kb, 2)}, got {tuple(positions.shape)}")
        return positions.to(torch.uint8)
    if positions.dim() != 2 or tuple(positions.shape) != (rows, -(-2 * kb // 4)):
        raise ValueError(f"positions: expected packed shape {(rows, -(-2 * kb // 4))} or unpacked {(rows, kb, 2)}, "
                         f"got {tuple(positions.shape)}")
    return unpack_2bit(positions, 2 * kb).reshape(rows, kb, 2)


def _to_int32_bits(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> int32 tensors holding the same 32 bits."""
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def _u32(words: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns -> int64 values in [0, 2^32)."""
    return words.to(torch.int64) & 0xFFFFFFFF


def to_vnm_kernel_layout(values: torch.Tensor, columns: torch.Tensor, positions: torch.Tensor, v: int, m: int,
                         shape: tuple[int, int], dtype: torch.dtype | None = None) -> VNMKernelWeight:
    """Canonical V:N:M storage -> kernel layout. `positions` packed [R, ceil(2Kb/4)] or unpacked [R, Kb, 2];
    `dtype` (default: the values' dtype) is the kernel's operand type, bfloat16 or float16."""
    rows, cols = shape
    if v < 16 or v % 16:
        raise ValueError(f"V must be a positive multiple of 16, got {v}")
    if not 4 <= m <= 16:
        raise ValueError(f"M must lie in 4..16, got {m}")
    kb = -(-cols // m)
    rp = -(-rows // v) * v
    if tuple(columns.shape) != (rp // v, kb, 4):
        raise ValueError(f"columns: expected shape {(rp // v, kb, 4)}, got {tuple(columns.shape)}")
    if tuple(values.shape) != (rows, 2 * kb):
        raise ValueError(f"values: expected shape {(rows, 2 * kb)}, got {tuple(values.shape)}")
    dtype = dtype or values.dtype
    dev = values.device
    pos = _unpacked_positions(positions, rows, kb).to(dev).long()
    kbp = -(-kb // KB_ALIGN) * KB_ALIGN
    nrt, kp = rp // 16, kbp // 8

    # absolute gathered column indices, padding blocks b >= kb pointing at b*M + 0..3 (all >= Kp >= K)
    offs = torch.arange(4, device=dev).expand(rp // v, kbp, 4).clone()
    offs[:, :kb] = columns.to(dev).long()
    base = (torch.arange(kbp, device=dev) * m).view(1, kbp, 1)
    gathered = (offs + base).reshape(rp // v, 4 * kbp).to(torch.int32).contiguous()

    # compressed A [Rp, 2*kb_pad] in fragment order: (rt, h, g, kp, ktl, t, j) -> (rt, kp, g, t, ktl, h, j)
    a = torch.zeros(rp, 2 * kbp, dtype=dtype, device=dev)
    a[:rows, :2 * kb] = values.to(dtype)
    frag = a.reshape(nrt, 2, 8, kp, 2, 4, 2).permute(0, 3, 2, 5, 4, 1, 6).reshape(nrt, kp, 32, 8).contiguous()

    # metadata nibbles [Rp, kb_pad] (pos0 | pos1 << 2), then words (rt, h, g, kp, ktl, c) -> [rt, kp, g, ktl]
    nib = torch.full((rp, kbp), PAD_NIBBLE, dtype=torch.int64, device=dev)
    nib[:rows, :kb] = pos[..., 0] | (pos[..., 1] << 2)
    nib = nib.reshape(nrt, 2, 8, kp, 2, 4)
    shift = (4 * torch.arange(4, device=dev)).view(1, 1, 1, 1, 1, 4) + (16 * torch.arange(2, device=dev)).view(
        1, 2, 1, 1, 1, 1)
    words = (nib << shift).sum(dim=(1, 5))  # [nrt, 8, kp, 2]; nibbles never overlap, so the sum is an OR
    meta = _to_int32_bits(words.permute(0, 2, 1, 3)).contiguous()
    return VNMKernelWeight(v, m, rows, cols, kb, kbp, gathered, frag, meta)


def compressed_a(w: VNMKernelWeight) -> torch.Tensor:
    """The compressed sparse operand A [Rp, 2*kb_pad] (row r's kept values over the gathered columns, 2 per
    chunk of 4), undoing the fragment order of `w.values`."""
    nrt, kp = w.values.shape[:2]
    return w.values.reshape(nrt, kp, 8, 4, 2, 2, 2).permute(0, 5, 2, 1, 4, 3, 6).reshape(nrt * 16, 16 * kp)


def metadata_nibbles(w: VNMKernelWeight) -> torch.Tensor:
    """int64 [Rp, kb_pad]: the metadata nibble (pos0 | pos1 << 2) of every row and chunk, read from `w.meta`."""
    nrt, kp = w.meta.shape[:2]
    words = _u32(w.meta).permute(0, 2, 1, 3)  # [nrt, g, kp, ktl]
    halves = torch.stack([words & 0xFFFF, words >> 16], dim=1)  # [nrt, h, g, kp, ktl]
    nib = torch.stack([(halves >> (4 * c)) & 0xF for c in range(4)], dim=-1)  # [nrt, h, g, kp, ktl, c]
    return nib.reshape(nrt * 16, kp * 8)


def from_vnm_kernel_layout(w: VNMKernelWeight, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Kernel layout -> canonical storage: values [R, 2Kb], columns uint8 [Rp/V, Kb, 4], positions packed uint8
    [R, ceil(2Kb/4)] (the artifact's form). The exact inverse of `to_vnm_kernel_layout`."""
    rows, kb, m = w.rows, w.kb, w.m
    a = compressed_a(w)
    values = a[:rows, :2 * kb]
    if dtype is not None:
        values = values.to(dtype)
    cols = w.columns.long().reshape(-1, w.kb_pad, 4)[:, :kb]
    offsets = cols - (torch.arange(kb, device=cols.device) * m).view(1, kb, 1)
    if offsets.numel() and (int(offsets.min()) < 0 or int(offsets.max()) >= m):
        raise ValueError("kernel layout columns do not lie inside their column blocks")
    nib = metadata_nibbles(w)[:rows, :kb]
    pos = torch.stack([nib & 0x3, nib >> 2], dim=-1).reshape(rows, 2 * kb)
    return {"values": values.contiguous(), "columns": offsets.to(torch.uint8).contiguous(),
            "positions": pack_2bit(pos)}


def decode_gathered(w: VNMKernelWeight) -> torch.Tensor:
    """float32 [Rp, 4*kb_pad]: W over the gathered columns, rebuilt as the tensor cores see it.

    Follows the PTX ISA fragment rules literally: lane 4g+t's A registers hold rows g / g+8, compressed columns
    2t, 2t+1 (chunk t); selector 0 takes the metadata word of lane 4g, whose bits 16h+4t+2j+1 : 16h+4t+2j give
    the index in chunk t of the j-th value of row g + 8h.
    """
    nrt, kp = w.values.shape[:2]
    vals = w.values.float().reshape(nrt, kp, 8, 4, 2, 2, 2)  # [rt, kp, g, t, ktl, h, j]
    words = _u32(w.meta)  # [rt, kp, g, ktl]
    g_ = words.view(nrt, kp, 8, 1, 2, 1, 1)
    t = torch.arange(4).view(1, 1, 1, 4, 1, 1, 1)
    h = torch.arange(2).view(1, 1, 1, 1, 1, 2, 1)
    j = torch.arange(2).view(1, 1, 1, 1, 1, 1, 2)
    idx = (g_ >> (16 * h + 4 * t + 2 * j)) & 0x3  # [rt, kp, g, t, ktl, h, j]
    ktl = torch.arange(2).view(1, 1, 1, 1, 2, 1, 1)
    kpi = torch.arange(kp).view(1, kp, 1, 1, 1, 1, 1)
    col = 32 * kpi + 16 * ktl + 4 * t + idx  # gathered column within the row's V-block
    gi = torch.arange(8).view(1, 1, 8, 1, 1, 1, 1)
    rti = torch.arange(nrt).view(nrt, 1, 1, 1, 1, 1, 1)
    row = 16 * rti + 8 * h + gi
    shape = (nrt, kp, 8, 4, 2, 2, 2)
    dense = torch.zeros(nrt * 16, 32 * kp, dtype=torch.float32)
    dense.index_put_((row.expand(shape).reshape(-1), col.expand(shape).reshape(-1)), vals.reshape(-1),
                     accumulate=True)  # accumulate: a (corrupt) duplicate index would show up as a wrong sum
    return dense


def emulate_spmm(x: torch.Tensor, w: VNMKernelWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel's math in float32 torch (CPU): per V-row block gather the kept columns of x (indices >= K read
    as 0), multiply by the tensor-core view of W from `decode_gathered`; returns float32 [..., rows]."""
    x2 = x.reshape(-1, x.shape[-1]).float().cpu()
    k = x2.shape[1]
    if k != w.cols:
        raise ValueError(f"x has {k} features, the weight expects {w.cols}")
    xp = torch.nn.functional.pad(x2, (0, 1))  # column k is the zero every index >= K reads
    idx = w.columns.long().cpu().clamp(max=k)  # [Rp/V, K']
    dense = decode_gathered(w.to("cpu"))  # [Rp, K']
    nvb = idx.shape[0]
    xg = xp[:, idx]  # [T, Rp/V, K']
    y = torch.einsum("tbk,bvk->tbv", xg, dense.reshape(nvb, w.v, -1)).reshape(x2.shape[0], -1)[:, :w.rows]
    if bias is not None:
        y = y + bias.float().cpu()
    return y.reshape(*x.shape[:-1], w.rows)


def canonical_to_dense(values: torch.Tensor, columns: torch.Tensor, positions: torch.Tensor, v: int, m: int,
                       shape: tuple[int, int]) -> torch.Tensor:
    """Thin alias of the reference decoder (`kernels.reference.vnm_to_dense`), for symmetry in tests."""
    from .reference import vnm_to_dense

    return vnm_to_dense(values, columns, positions, v, m, shape)


# ------------------------------------------------------------------------------------------------------------------
# INT8 values: the sparse A operand of mma.sp m16n8k32 .s8 (2:4 over 4-column chunks, like 16-bit types).
#
# Per k32 step a row has 8 chunks (32 gathered columns, 16 kept int8 values). Lane 4g+t's two A registers hold
# row g and row g+8, compressed columns 4t..4t+3, i.e. the kept values of chunks 2t and 2t+1 (PTX ISA, "Matrix
# fragments for sparse mma.m16n8k32 with .u8/.s8": each register has four non-zero elements out of 8 consecutive).
# Metadata: 8 chunks x 16 rows x 4 bits = 512 bits per step, two threads per quad (selector 0: threadID_in_group 0
# and 1). Which half each of them carries is drawn only in the ISA's figure, so both readings are supported and
# the GPU benchmark checks which one the hardware uses (`META_MODES`; on an H100, sm_90a, it is "rows": every
# "cols" check failed, every "rows" check passed, benchmarks/results/kernels_vnm_h100.json):
#   "cols": lane 4g+h holds chunks 4h..4h+3 (dense columns 16h..16h+15) of row g in bits 15:0 and of row g+8 in
#           bits 31:16, nibble c at bits 4c (the layout of the 16-bit-type m16n8k32 shape);
#   "rows": lane 4g+h holds all 8 chunks of row g + 8h, nibble c at bits 4c.
# ------------------------------------------------------------------------------------------------------------------

META_MODES = ("cols", "rows")
DEFAULT_META_MODE = "rows"  # the reading the hardware uses (measured on an H100)


@dataclass
class VNMInt8Weight:
    """INT8 V:N:M weight in the m16n8k32 kernel layout: codes in fragment order [Rp/16, kb_pad/16, 32, 16] int8,
    metadata int32 [Rp/16, kb_pad/16, 8, 2 (lane 4g+h), 2 (k32 step)], gathered columns as for 16-bit values,
    per-row fp32 weight scales [Rp] (y = scale_row * scale_token * sum of integer products), or with
    `group_pairs` > 0 group-wise scales [groups, Rp], a group being 32 * group_pairs consecutive kept values of a
    row (group_pairs k32-step pairs: y = scale_token * sum over groups of scale_group * integer products)."""

    v: int
    m: int
    rows: int
    cols: int
    kb: int
    kb_pad: int
    columns: torch.Tensor
    values: torch.Tensor
    meta: torch.Tensor
    scales: torch.Tensor
    meta_mode: str = "cols"
    group_pairs: int = 0

    @property
    def rows_pad(self) -> int:
        return self.values.shape[0] * 16

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.meta, self.columns, self.scales))

    def to(self, device=None) -> "VNMInt8Weight":
        return VNMInt8Weight(self.v, self.m, self.rows, self.cols, self.kb, self.kb_pad, self.columns.to(device),
                             self.values.to(device), self.meta.to(device), self.scales.to(device), self.meta_mode,
                             self.group_pairs)


def to_vnm_int8_layout(codes: torch.Tensor, scales: torch.Tensor, columns: torch.Tensor, positions: torch.Tensor,
                       v: int, m: int, shape: tuple[int, int], meta_mode: str = DEFAULT_META_MODE,
                       group: int | None = None) -> VNMInt8Weight:
    """Canonical V:N:M storage with integer values of up to 8 bits (codes int8 [R, 2Kb], e.g. `unpack_int` of an
    INT6 `qweight`) and per-row `scales` [R] or [R, 1] -> kernel layout; or group-wise `scales` [R, ceil(2Kb /
    group)] with `group` (kept values per scale, a multiple of 32: the kernel scales whole k32-step pairs)."""
    if meta_mode not in META_MODES:
        raise ValueError(f"meta_mode must be one of {META_MODES}, got {meta_mode!r}")
    rows, cols = shape
    group_pairs = 0
    if scales.dim() == 2 and scales.shape[1] == 1:
        scales = scales[:, 0]
    elif scales.dim() == 2:
        if group is None or group % 32:
            raise ValueError(f"the INT8 V:N:M kernel takes group-wise scales only for groups of a multiple of 32 "
                             f"kept values; got {scales.shape[1]} groups per row, group={group}")
        if scales.shape[1] != -(-codes.shape[1] // group):
            raise ValueError(f"scales must be [{rows}, {-(-codes.shape[1] // group)}] for group {group}, got "
                             f"{list(scales.shape)}")
        group_pairs = group // 32
    base = to_vnm_kernel_layout(codes.to(torch.float32), columns, positions, v, m, shape, dtype=torch.float32)
    kbp = base.kb_pad
    nrt, kp2 = base.rows_pad // 16, kbp // 16
    a = compressed_a(base).round().to(torch.int8)  # [Rp, 2*kb_pad]; exact: codes are small integers
    # (rt, h, g, kp, stl, t, j) -> (rt, kp, g, t, stl, h, j): lane 4g+t, element 8*stl + 4*h + j
    frag = a.reshape(nrt, 2, 8, kp2, 2, 4, 4).permute(0, 3, 2, 5, 4, 1, 6).reshape(nrt, kp2, 32, 16).contiguous()
    nib = metadata_nibbles(base).reshape(nrt, 2, 8, kp2, 2, 8)  # [rt, h(row half), g, kp, stl, chunk 0..7]
    dev = nib.device
    if meta_mode == "cols":
        # word(g, lane h) = row g chunks 4h..4h+3 (bits 15:0) | row g+8 same chunks (bits 31:16)
        part = nib.reshape(nrt, 2, 8, kp2, 2, 2, 4)  # [rt, rowhalf, g, kp, stl, lane h, c]
        shift = (4 * torch.arange(4, device=dev)).view(1, 1, 1, 1, 1, 1, 4) + \
            (16 * torch.arange(2, device=dev)).view(1, 2, 1, 1, 1, 1, 1)
        words = (part << shift).sum(dim=(1, 6))  # [rt, g, kp, stl, lane h]
        words = words.permute(0, 2, 1, 4, 3)  # [rt, kp, g, lane h, stl]
    else:
        # word(g, lane h) = all 8 chunks of row g + 8h
        shift = (4 * torch.arange(8, device=dev)).view(1, 1, 1, 1, 1, 8)
        words = (nib << shift).sum(dim=5)  # [rt, h, g, kp, stl]
        words = words.permute(0, 3, 2, 1, 4)  # [rt, kp, g, lane h, stl]
    meta = _to_int32_bits(words).contiguous()
    if group_pairs:  # [groups over the padded kept values, Rp], padding groups and rows 1 (their codes are 0)
        sc = torch.ones(-(-2 * kbp // (32 * group_pairs)), base.rows_pad, dtype=torch.float32, device=dev)
        sc[:scales.shape[1], :rows] = scales.to(dev).float().t()
    else:
        sc = torch.ones(base.rows_pad, dtype=torch.float32, device=dev)
        sc[:rows] = scales.to(dev).float()
    return VNMInt8Weight(v, m, rows, cols, base.kb, kbp, base.columns, frag, meta, sc, meta_mode, group_pairs)


def decode_gathered_int8(w: VNMInt8Weight) -> torch.Tensor:
    """float32 [Rp, 4*kb_pad]: the integer weight codes over the gathered columns as the tensor cores see them
    under `w.meta_mode`'s reading of the metadata (see the section comment)."""
    nrt, kp2 = w.values.shape[:2]
    vals = w.values.float().cpu().reshape(nrt, kp2, 8, 4, 2, 2, 2, 2)  # [rt, kp, g, t, stl, h, jj(chunk 2t+jj), j]
    words = _u32(w.meta.cpu())  # [rt, kp, g, lane h, stl]
    dense = torch.zeros(nrt * 16, 64 * kp2, dtype=torch.float32)
    for rt, kp, g, t, stl, h, jj in itertools.product(range(nrt), range(kp2), range(8), range(4), range(2),
                                                      range(2), range(2)):
        c = 2 * t + jj  # chunk within the k32 step
        if w.meta_mode == "cols":
            word = int(words[rt, kp, g, c // 4, stl])
            nibble = (word >> (16 * h + 4 * (c % 4))) & 0xF
        else:
            word = int(words[rt, kp, g, h, stl])
            nibble = (word >> (4 * c)) & 0xF
        for j in range(2):
            idx = (nibble >> (2 * j)) & 0x3
            dense[16 * rt + 8 * h + g, 64 * kp + 32 * stl + 4 * c + idx] += vals[rt, kp, g, t, stl, h, jj, j]
    return dense


def emulate_spmm_int8(xq: torch.Tensor, xs: torch.Tensor, w: VNMInt8Weight, bias: torch.Tensor | None = None):
    """The INT8 kernel's math on CPU: (gathered int8 codes of x) . (decoded codes)^T, exact in float64, times the
    token scale and the row scale, or with group-wise scales each group's part times its scale (+ bias); float32
    [T, rows]."""
    x2 = xq.reshape(-1, xq.shape[-1]).double().cpu()
    xp = torch.nn.functional.pad(x2, (0, 1))
    idx = w.columns.long().cpu().clamp(max=x2.shape[1])
    dense = decode_gathered_int8(w).double()
    if w.group_pairs:  # gathered column gc lies in k32-step pair gc // 64
        group = torch.arange(dense.shape[1]) // (64 * w.group_pairs)
        dense = dense * w.scales.double().cpu()[group].t()
    xg = xp[:, idx]  # [T, Rp/V, K']
    acc = torch.einsum("tbk,bvk->tbv", xg, dense.reshape(idx.shape[0], w.v, -1)).reshape(x2.shape[0], -1)
    row_scales = 1.0 if w.group_pairs else w.scales[:w.rows].float().cpu()
    y = acc[:, :w.rows].float() * xs.reshape(-1, 1).float().cpu() * row_scales
    if bias is not None:
        y = y + bias.float().cpu()
    return y
