"""The V:N:M kernel layout (mma.sp operand A in fragment order, metadata words, gathered column indices): exact
round trips with the canonical storage, hand-checked metadata bits, and the kernel's math replayed in torch."""

import itertools

import pytest
import torch
from conftest import random_vnm_pattern

from lowc.compress.sparsity.vnm import VNMSpec, vnm_compress
from lowc.kernels.packing import pack_2bit, unpack_2bit
from lowc.kernels.reference import vnm_to_dense
from lowc.kernels.vnm_layout import (KB_ALIGN, META_MODES, PAD_NIBBLE, compressed_a, decode_gathered,
                                     decode_gathered_int8, emulate_spmm, emulate_spmm_int8, from_vnm_kernel_layout,
                                     metadata_nibbles, to_vnm_int8_layout, to_vnm_kernel_layout)

def random_canonical(rows, cols, v, m, dtype=torch.float32, seed=0):
    """Canonical storage with uniformly random kept columns, positions and values (not only what pruning makes)."""
    g = torch.Generator().manual_seed(seed)
    columns, positions, padding = random_vnm_pattern(rows, cols, v, m, g)
    values = torch.randn(rows, 2 * (-(-cols // m)), generator=g).to(dtype).masked_fill(padding, 0)
    return values, columns, pack_2bit(positions.reshape(rows, -1)), positions


CASES = [(16, 4, 16, 16), (16, 5, 40, 37), (32, 4, 64, 70), (32, 5, 33, 131), (64, 5, 100, 300),
         (64, 8, 130, 257), (128, 16, 130, 33), (128, 7, 250, 1000), (64, 4, 64, 4096), (48, 6, 47, 95)]


@pytest.mark.parametrize("v,m,rows,cols", CASES)
def test_round_trip_random_storage(v, m, rows, cols):
    values, columns, packed, unpacked = random_canonical(rows, cols, v, m, seed=rows * 7 + cols)
    for pos in (packed, unpacked):
        w = to_vnm_kernel_layout(values, columns, pos, v, m, (rows, cols))
        back = from_vnm_kernel_layout(w)
        assert torch.equal(back["values"], values)
        assert torch.equal(back["columns"], columns)
        assert torch.equal(back["positions"], packed)
    # and kernel -> canonical -> kernel is the identity on the kernel tensors
    again = to_vnm_kernel_layout(back["values"], back["columns"], back["positions"], v, m, (rows, cols))
    for name in ("values", "meta", "columns"):
        assert torch.equal(getattr(again, name), getattr(w, name)), name


@pytest.mark.parametrize("v,m,rows,cols", CASES)
def test_layout_shapes_and_padding(v, m, rows, cols):
    values, columns, packed, _ = random_canonical(rows, cols, v, m)
    w = to_vnm_kernel_layout(values, columns, packed, v, m, (rows, cols), dtype=torch.bfloat16)
    kb = -(-cols // m)
    rp = -(-rows // v) * v
    assert w.kb == kb and w.kb_pad % KB_ALIGN == 0 and w.kb_pad >= kb
    assert w.rows_pad == rp and w.values.dtype == torch.bfloat16
    assert tuple(w.values.shape) == (rp // 16, w.kb_pad // 8, 32, 8)
    assert tuple(w.meta.shape) == (rp // 16, w.kb_pad // 8, 8, 2) and w.meta.dtype == torch.int32
    assert tuple(w.columns.shape) == (rp // v, 4 * w.kb_pad) and w.columns.dtype == torch.int32
    # gathered columns: ascending inside each block, block b's entries in [b*M, b*M + M)
    cols_abs = w.columns.long().reshape(rp // v, w.kb_pad, 4)
    base = (torch.arange(w.kb_pad) * m).view(1, -1, 1)
    assert bool(((cols_abs - base) >= 0).all() and ((cols_abs - base) < m).all())
    assert bool((cols_abs[..., 1:] > cols_abs[..., :-1]).all())
    # padding rows / blocks: zero values and the valid nibble 0b0100
    a = compressed_a(w)
    assert a.shape == (rp, 2 * w.kb_pad)
    assert torch.equal(a[:rows, :2 * kb], values.to(torch.bfloat16))
    assert not a[rows:].any() and not a[:, 2 * kb:].any()
    nib = metadata_nibbles(w)
    assert bool((nib[rows:] == PAD_NIBBLE).all()) and bool((nib[:, kb:] == PAD_NIBBLE).all())
    # every nibble is a valid ascending pair (0b0000, 0b0101, 0b1010, 0b1111 are undefined for mma.sp)
    assert bool(((nib & 3) < (nib >> 2)).all())


def test_metadata_words_hand_made():
    """One 16 x 16 tile (V=16, M=4, K=16): all chunks keep (0, 1) except three, whose words are worked out by hand
    from the PTX ISA layout (selector 0: lane 4g's word, row g in bits 15:0, row g+8 in bits 31:16, chunk c in
    the nibble at 4c, first index in its low 2 bits)."""
    rows, cols = 16, 16
    pos = torch.tensor([0, 1], dtype=torch.uint8).repeat(rows, 4, 1)  # [16, 4 blocks, 2]
    pos[0, 0] = torch.tensor([2, 3])  # row 0, chunk 0: nibble 2 | 3 << 2 = 0xE
    pos[8, 3] = torch.tensor([1, 3])  # row 8, chunk 3: nibble 1 | 3 << 2 = 0xD
    pos[3, 1] = torch.tensor([0, 2])  # row 3, chunk 1: nibble 0 | 2 << 2 = 0x8
    columns = torch.tensor([0, 1, 2, 3], dtype=torch.uint8).repeat(1, 4, 1)  # M = 4: plain 2:4
    values = torch.arange(rows * 8, dtype=torch.float32).reshape(rows, 8)
    w = to_vnm_kernel_layout(values, columns, pos, 16, 4, (rows, cols))
    words = w.meta.long() & 0xFFFFFFFF  # [1, kb_pad/8, 8 quads, 2 k16 steps]
    expect = torch.full((8,), 0x44444444, dtype=torch.long)
    expect[0] = 0xD444444E
    expect[3] = 0x44444484
    assert torch.equal(words[0, 0, :, 0], expect)
    assert bool((words[0, 0, :, 1] == 0x44444444).all())  # second k16 step: padding chunks
    # A fragment of lane 4g+t, k16 step 0: (row g, values 2t, 2t+1), (row g+8, values 2t, 2t+1)
    frag = w.values[0, 0]  # [32 lanes, 8]
    for g in range(8):
        for t in range(4):
            lane = 4 * g + t
            assert frag[lane, :4].tolist() == [values[g, 2 * t], values[g, 2 * t + 1],
                                               values[g + 8, 2 * t], values[g + 8, 2 * t + 1]]
    # the dense tile the tensor cores see
    dense = decode_gathered(w)[:, :16]
    ref = vnm_to_dense(values, columns, pos, 16, 4, (rows, cols))
    assert torch.equal(dense, ref)
    assert dense[0, :4].tolist() == [0, 0, values[0, 0], values[0, 1]]
    assert dense[8, 12:16].tolist() == [0, values[8, 6], 0, values[8, 7]]


@pytest.mark.parametrize("v,m,rows,cols", CASES)
def test_emulated_kernel_matches_reference(v, m, rows, cols):
    values, columns, packed, _ = random_canonical(rows, cols, v, m, seed=cols)
    w = to_vnm_kernel_layout(values, columns, packed, v, m, (rows, cols))
    dense = vnm_to_dense(values, columns, packed, v, m, (rows, cols))
    torch.manual_seed(rows)
    for tokens in (1, 7, 16, 33):
        x = torch.randn(tokens, cols)
        bias = torch.randn(rows)
        y = emulate_spmm(x, w, bias)
        ref = x @ dense.t() + bias
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)


def test_gathered_view_matches_dense():
    """decode_gathered, scattered back through the gathered column indices, is the reference dense matrix."""
    v, m, rows, cols = 32, 6, 70, 77
    values, columns, packed, _ = random_canonical(rows, cols, v, m, seed=3)
    w = to_vnm_kernel_layout(values, columns, packed, v, m, (rows, cols))
    gathered = decode_gathered(w)  # [Rp, 4*kb_pad]
    idx = w.columns.long().repeat_interleave(v, 0)  # [Rp, 4*kb_pad]
    dense = torch.zeros(w.rows_pad, w.kb_pad * m)
    dense.scatter_(1, idx, gathered)
    ref = vnm_to_dense(values, columns, packed, v, m, (rows, cols))
    assert torch.equal(dense[:rows, :cols], ref)
    assert not dense[:, cols:].any() and not dense[rows:].any()


def test_pruned_weights_round_trip_bf16():
    spec = VNMSpec.parse("64:2:5")
    weight = torch.randn(130, 203).to(torch.bfloat16)
    st = vnm_compress(weight, spec)
    w = to_vnm_kernel_layout(st["values"], st["columns"], st["positions"], spec.v, spec.m, tuple(weight.shape))
    assert w.values.dtype == torch.bfloat16
    back = from_vnm_kernel_layout(w)
    assert torch.equal(back["values"], st["values"])
    assert torch.equal(back["columns"], st["columns"])
    assert torch.equal(unpack_2bit(back["positions"], 2 * w.kb).reshape(130, -1, 2), st["positions"])
    x = torch.randn(5, 203)
    dense = vnm_to_dense(st["values"].float(), st["columns"], st["positions"].reshape(130, -1, 2), 64, 5,
                         (130, 203))
    torch.testing.assert_close(emulate_spmm(x, w), x @ dense.t(), rtol=1e-5, atol=1e-4)


def test_bad_shapes_rejected():
    values, columns, packed, _ = random_canonical(40, 37, 16, 5)
    with pytest.raises(ValueError, match="columns"):
        to_vnm_kernel_layout(values, columns[:1], packed, 16, 5, (40, 37))
    with pytest.raises(ValueError, match="values"):
        to_vnm_kernel_layout(values[:, :-2], columns, packed, 16, 5, (40, 37))
    with pytest.raises(ValueError, match="positions"):
        to_vnm_kernel_layout(values, columns, packed[:, :-1], 16, 5, (40, 37))
    with pytest.raises(ValueError, match="multiple of 16"):
        to_vnm_kernel_layout(values, columns, packed, 24, 5, (40, 37))


# ---------------------------------------------------------------------------------------------- INT8 values layout


def random_int8(rows, cols, v, m, seed=0):
    values, columns, _, positions = random_canonical(rows, cols, v, m, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    codes = torch.randint(-127, 128, values.shape, generator=g).to(torch.int8).masked_fill(values == 0, 0)
    scales = torch.rand(rows, generator=g) * 0.01 + 1e-4
    return codes, scales, columns, positions


@pytest.mark.parametrize("mode", META_MODES)
@pytest.mark.parametrize("v,m,rows,cols", [(16, 4, 16, 64), (32, 5, 45, 83), (64, 8, 70, 300), (16, 16, 20, 100)])
def test_int8_emulation_matches_reference(mode, v, m, rows, cols):
    codes, scales, columns, positions = random_int8(rows, cols, v, m, seed=rows)
    w = to_vnm_int8_layout(codes, scales, columns, positions, v, m, (rows, cols), meta_mode=mode)
    kb = -(-cols // m)
    assert w.values.dtype == torch.int8 and tuple(w.values.shape) == (w.rows_pad // 16, w.kb_pad // 16, 32, 16)
    assert tuple(w.meta.shape) == (w.rows_pad // 16, w.kb_pad // 16, 8, 2, 2)
    dense = vnm_to_dense(codes.double(), columns, positions, v, m, (rows, cols))
    xq = torch.randint(-127, 128, (5, cols), generator=torch.Generator().manual_seed(1)).to(torch.int8)
    xs = torch.rand(5)
    bias = torch.randn(rows)
    ref = (xq.double() @ dense.t()).float() * xs[:, None] * scales + bias
    torch.testing.assert_close(emulate_spmm_int8(xq, xs, w, bias), ref, rtol=1e-6, atol=1e-5)
    # the gathered integer matrix scatters back to the dense codes
    gathered = decode_gathered_int8(w)
    idx = w.columns.long().repeat_interleave(v, 0)
    back = torch.zeros(w.rows_pad, w.kb_pad * m).scatter_(1, idx, gathered)
    assert torch.equal(back[:rows, :cols], dense.float()) and kb <= w.kb_pad


def test_int8_metadata_words_hand_made():
    """One 16-row tile, M=4 (K=32 = one k32 step): row 0 chunk 5 keeps (1, 2), row 9 chunk 2 keeps (0, 3), all
    else (0, 1). 'cols': lane 4g+h holds chunks 4h..4h+3 of rows g (low half) and g+8 (high half); 'rows': lane
    4g+h holds the 8 chunks of row g+8h."""
    pos = torch.tensor([0, 1], dtype=torch.uint8).repeat(16, 8, 1)
    pos[0, 5] = torch.tensor([1, 2])  # nibble 1 | 2 << 2 = 0x9
    pos[9, 2] = torch.tensor([0, 3])  # nibble 0 | 3 << 2 = 0xC
    columns = torch.tensor([0, 1, 2, 3], dtype=torch.uint8).repeat(1, 8, 1)
    codes = torch.arange(16 * 16).reshape(16, 16).remainder(100).to(torch.int8)
    cols_w = to_vnm_int8_layout(codes, torch.ones(16), columns, pos, 16, 4, (16, 32), meta_mode="cols")
    words = cols_w.meta.long() & 0xFFFFFFFF  # [1, kp, g, lane h, step]
    assert int(words[0, 0, 0, 1, 0]) == 0x44444494  # row 0 chunks 4..7 (chunk 5 = 0x9) | row 8 chunks 4..7
    assert int(words[0, 0, 1, 0, 0]) == 0x4C444444  # row 1 chunks 0..3 | row 9 chunks 0..3 (chunk 2 = 0xC)
    assert int(words[0, 0, 0, 0, 0]) == 0x44444444
    rows_w = to_vnm_int8_layout(codes, torch.ones(16), columns, pos, 16, 4, (16, 32), meta_mode="rows")
    words = rows_w.meta.long() & 0xFFFFFFFF
    assert int(words[0, 0, 0, 0, 0]) == 0x44944444  # row 0, chunk 5 at bits 23:20
    assert int(words[0, 0, 1, 1, 0]) == 0x44444C44  # row 9, chunk 2 at bits 11:8
    # A registers: lane 4g+t, step 0: row g codes 4t..4t+3, then row g+8 codes 4t..4t+3
    frag = cols_w.values[0, 0]
    for g, t in itertools.product(range(8), range(4)):
        expect = codes[g, 4 * t:4 * t + 4].tolist() + codes[g + 8, 4 * t:4 * t + 4].tolist()
        assert frag[4 * g + t, :8].tolist() == expect


@pytest.mark.parametrize("v,m,rows,cols,group", [(16, 5, 40, 300, 32), (64, 5, 70, 700, 128), (32, 8, 33, 900, 64)])
def test_int8_group_scales_emulation_matches_reference(v, m, rows, cols, group):
    """Group-wise scales over the kept values (the last group shorter, padding groups past it): the kernel's math
    scales each group's integer sums, which must equal x_q . (codes * their group's scale)^T."""
    codes, _, columns, positions = random_int8(rows, cols, v, m, seed=cols)
    n_groups = -(-codes.shape[1] // group)
    scales = torch.rand(rows, n_groups, generator=torch.Generator().manual_seed(2)) * 0.01 + 1e-4
    w = to_vnm_int8_layout(codes, scales, columns, positions, v, m, (rows, cols), group=group)
    assert w.group_pairs == group // 32 and w.scales.shape[1] == w.rows_pad
    values = codes.double() * scales.double().repeat_interleave(group, dim=1)[:, :codes.shape[1]]
    dense = vnm_to_dense(values, columns, positions, v, m, (rows, cols))
    xq = torch.randint(-127, 128, (3, cols), generator=torch.Generator().manual_seed(1)).to(torch.int8)
    xs = torch.rand(3)
    ref = (xq.double() @ dense.t()).float() * xs[:, None]
    torch.testing.assert_close(emulate_spmm_int8(xq, xs, w), ref, rtol=1e-5, atol=1e-6)


def test_int8_group_scales_rejected():
    codes, scales, columns, positions = random_int8(40, 37, 16, 5)
    with pytest.raises(ValueError, match="multiple of 32"):
        to_vnm_int8_layout(codes, scales.view(-1, 1).expand(-1, 2), columns, positions, 16, 5, (40, 37))
    with pytest.raises(ValueError, match="multiple of 32"):
        to_vnm_int8_layout(codes, scales.view(-1, 1).expand(-1, 2), columns, positions, 16, 5, (40, 37), group=8)
    with pytest.raises(ValueError, match="scales must be"):
        to_vnm_int8_layout(codes, scales.view(-1, 1).expand(-1, 2), columns, positions, 16, 5, (40, 37), group=64)
    with pytest.raises(ValueError, match="meta_mode"):
        to_vnm_int8_layout(codes, scales, columns, positions, 16, 5, (40, 37), meta_mode="diag")
