"""Bit packing of integer weight codes and 2:4 positions (the byte layouts of docs/FORMAT.md).

All packers work along the last dimension and pad it with zeros up to a whole number of bytes; the unpackers
take the true number of values back so padding never leaks out.

- INT8: one int8 per value.
- INT6: 4 values in 3 bytes. The 6-bit two's-complement codes c0..c3 form the 24-bit little-endian word
  c0 | c1 << 6 | c2 << 12 | c3 << 18, stored as bytes (word & 0xFF, word >> 8 & 0xFF, word >> 16).
- INT4: 2 values per byte, c0 in the low nibble, c1 in the high nibble (two's complement).
- INT3: 8 values in 3 bytes: the 3-bit two's-complement codes c0..c7 form the 24-bit little-endian word
  c0 | c1 << 3 | ... | c7 << 21, stored as 3 bytes like INT6.
- INT2: 4 values per byte, c_j at bits 2*j (two's complement; symmetric codes are -1, 0, 1).
- 2-bit positions (0..3): 4 per byte, entry j at bits 2*(j % 4) of byte j // 4.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 6, 8)


def packed_columns(columns: int, bits: int) -> int:
    """Bytes per row that `columns` codes of `bits` bits occupy once packed."""
    if bits == 8:
        return columns
    if bits == 6:
        return -(-columns // 4) * 3
    if bits == 4:
        return -(-columns // 2)
    if bits == 3:
        return -(-columns // 8) * 3
    if bits == 2:
        return -(-columns // 4)
    raise ValueError(f"unsupported bit width {bits} (supported: {', '.join(map(str, SUPPORTED_BITS))})")


def _pad_last(x: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = (-x.shape[-1]) % multiple
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x


def _check_range(q: torch.Tensor, lo: int, hi: int, what: str) -> None:
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        raise ValueError(f"{what} codes must lie in [{lo}, {hi}], got [{int(q.min())}, {int(q.max())}]")


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    _check_range(q, -128, 127, "int8")
    return q.to(torch.int8).contiguous()


def unpack_int8(packed: torch.Tensor, columns: int) -> torch.Tensor:
    return packed[..., :columns].to(torch.int8)


def _pack_words24(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack `bits`-bit two's-complement codes (bits divides 24) into little-endian 24-bit words of 3 bytes."""
    per_word = 24 // bits
    u = _pad_last(q.to(torch.int32) & ((1 << bits) - 1), per_word)
    u = u.reshape(*u.shape[:-1], -1, per_word)
    word = torch.zeros(u.shape[:-1], dtype=torch.int32, device=u.device)
    for j in range(per_word):
        word |= u[..., j] << (bits * j)
    out = torch.stack([word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF], dim=-1)
    return out.reshape(*q.shape[:-1], -1).to(torch.uint8)


def _unpack_words24(packed: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    b = packed.to(torch.int32).reshape(*packed.shape[:-1], -1, 3)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    u = torch.stack([(word >> (bits * j)) & ((1 << bits) - 1) for j in range(24 // bits)], dim=-1)
    u = u.reshape(*packed.shape[:-1], -1)[..., :columns]
    return (u - ((u & (1 << (bits - 1))) << 1)).to(torch.int8)


def pack_int6(q: torch.Tensor) -> torch.Tensor:
    """Pack signed codes in [-32, 31] 4-in-3-bytes; returns uint8 [..., ceil(n/4)*3]."""
    _check_range(q, -32, 31, "int6")
    return _pack_words24(q, 6)


def unpack_int6(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """Inverse of `pack_int6`: int8 codes [..., columns]."""
    return _unpack_words24(packed, 6, columns)


def pack_int3(q: torch.Tensor) -> torch.Tensor:
    """Pack signed codes in [-4, 3] 8-in-3-bytes; returns uint8 [..., ceil(n/8)*3]."""
    _check_range(q, -4, 3, "int3")
    return _pack_words24(q, 3)


def unpack_int3(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """Inverse of `pack_int3`: int8 codes [..., columns]."""
    return _unpack_words24(packed, 3, columns)


def pack_int2(q: torch.Tensor) -> torch.Tensor:
    """Pack signed codes in [-2, 1] four per byte (code j at bits 2*j); returns uint8 [..., ceil(n/4)]."""
    _check_range(q, -2, 1, "int2")
    return pack_2bit(q.to(torch.int32) & 0x3)


def unpack_int2(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """Inverse of `pack_int2`: int8 codes [..., columns]."""
    u = unpack_2bit(packed, columns).to(torch.int32)
    return (u - ((u & 0x2) << 1)).to(torch.int8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack signed codes in [-8, 7] two per byte (low nibble first); returns uint8 [..., ceil(n/2)]."""
    _check_range(q, -8, 7, "int4")
    u = _pad_last(q.to(torch.int32) & 0xF, 2)
    u = u.reshape(*u.shape[:-1], -1, 2)
    return (u[..., 0] | (u[..., 1] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """Inverse of `pack_int4`: int8 codes [..., columns]."""
    b = packed.to(torch.int32)
    u = torch.stack([b & 0xF, (b >> 4) & 0xF], dim=-1).reshape(*packed.shape[:-1], -1)[..., :columns]
    return (u - ((u & 0x8) << 1)).to(torch.int8)


def pack_int(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed integer codes of the given bit width (2, 3, 4, 6 or 8) along the last dimension."""
    if bits == 8:
        return pack_int8(q)
    if bits == 6:
        return pack_int6(q)
    if bits == 4:
        return pack_int4(q)
    if bits == 3:
        return pack_int3(q)
    if bits == 2:
        return pack_int2(q)
    raise ValueError(f"unsupported weight bits {bits} (supported: {', '.join(map(str, SUPPORTED_BITS))})")


def unpack_int(packed: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """Unpack `columns` signed codes per row; the inverse of `pack_int`."""
    if bits == 8:
        return unpack_int8(packed, columns)
    if bits == 6:
        return unpack_int6(packed, columns)
    if bits == 4:
        return unpack_int4(packed, columns)
    if bits == 3:
        return unpack_int3(packed, columns)
    if bits == 2:
        return unpack_int2(packed, columns)
    raise ValueError(f"unsupported weight bits {bits} (supported: {', '.join(map(str, SUPPORTED_BITS))})")


def pack_2bit(p: torch.Tensor) -> torch.Tensor:
    """Pack values in [0, 3] four per byte (entry j at bits 2*(j%4) of byte j//4)."""
    _check_range(p, 0, 3, "2-bit")
    u = _pad_last(p.to(torch.int32), 4).reshape(*p.shape[:-1], -1, 4)
    return (u[..., 0] | (u[..., 1] << 2) | (u[..., 2] << 4) | (u[..., 3] << 6)).to(torch.uint8)


def unpack_2bit(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of `pack_2bit`: uint8 values [..., count]."""
    b = packed.to(torch.int32)
    u = torch.stack([(b >> s) & 0x3 for s in (0, 2, 4, 6)], dim=-1)
    return u.reshape(*packed.shape[:-1], -1)[..., :count].to(torch.uint8)
