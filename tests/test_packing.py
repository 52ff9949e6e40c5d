"""Pack/unpack round trips are exact and the byte layouts are the documented ones."""

import pytest
import torch

from lowc.kernels import packing


@pytest.mark.parametrize("bits,lo,hi", [(8, -128, 127), (6, -32, 31), (4, -8, 7), (3, -4, 3), (2, -2, 1)])
@pytest.mark.parametrize("cols", [1, 3, 4, 5, 127, 128, 130])
def test_int_round_trip(bits, lo, hi, cols):
    q = torch.randint(lo, hi + 1, (7, cols), dtype=torch.int32)
    packed = packing.pack_int(q, bits)
    assert packed.shape == (7, packing.packed_columns(cols, bits))
    assert torch.equal(packing.unpack_int(packed, bits, cols).to(torch.int32), q)


def test_int6_bit_order_matches_spec():
    # codes 1, -1, 31, -32 -> word = 1 | 63<<6 | 31<<12 | 32<<18
    word = 1 | (63 << 6) | (31 << 12) | (32 << 18)
    packed = packing.pack_int6(torch.tensor([[1, -1, 31, -32]]))
    assert packed.tolist() == [[word & 0xFF, (word >> 8) & 0xFF, word >> 16]]


def test_int4_nibble_order_matches_spec():
    assert packing.pack_int4(torch.tensor([[3, -2]])).tolist() == [[0x3 | (0xE << 4)]]


def test_int3_and_int2_bit_order_matches_spec():
    codes = [1, -1, 3, -4, 0, 2, -2, -3]
    word = sum((c & 0x7) << (3 * j) for j, c in enumerate(codes))
    assert packing.pack_int3(torch.tensor([codes])).tolist() == [[word & 0xFF, (word >> 8) & 0xFF, word >> 16]]
    assert packing.pack_int2(torch.tensor([[1, -1, 0, -2, 1]])).tolist() == [[1 | 3 << 2 | 0 << 4 | 2 << 6, 1]]


def test_2bit_round_trip_and_order():
    p = torch.randint(0, 4, (5, 9))
    assert torch.equal(packing.unpack_2bit(packing.pack_2bit(p), 9).long(), p)
    assert packing.pack_2bit(torch.tensor([[1, 2, 3, 0, 3]])).tolist() == [[1 | 2 << 2 | 3 << 4, 3]]


@pytest.mark.parametrize("bits,bad", [(6, 32), (6, -33), (4, 8), (4, -9), (3, 4), (3, -5), (2, 2), (2, -3)])
def test_out_of_range_codes_rejected(bits, bad):
    with pytest.raises(ValueError):
        packing.pack_int(torch.tensor([[bad]]), bits)
