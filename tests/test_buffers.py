"""Arena and provided-ring bookkeeping, without the kernel."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_uring._buffers import (
    ProvidedRing,
    RegisteredArena,
    decode_fixed_provided,
    encode_fixed_provided,
)


def entries(ring: ProvidedRing) -> list[tuple[int, int, int]]:
    """The published entries as (addr, len, bid), read from ring memory."""
    return [
        struct.unpack_from("<QIH", ring.memory, (i & ring.mask) * 16)
        for i in range(ring.head, ring.tail)
    ]


SPLITS = {20: (20, 44), 32: (16, 32)}
"""index_bits -> (index bits the kernel honours, offset bits), as the two seed kernels decode."""


@pytest.mark.parametrize("index_bits", sorted(SPLITS))
@given(data=st.data())
def test_fixed_provided_encoding_round_trips(index_bits: int, data: st.DataObject) -> None:
    index_honoured, offset_bits = SPLITS[index_bits]
    index = data.draw(st.integers(0, (1 << index_honoured) - 1))
    offset = data.draw(st.integers(0, (1 << offset_bits) - 1))
    addr = encode_fixed_provided(index, offset, index_bits)
    assert addr == (offset << index_bits) | index
    assert addr < 1 << 64
    assert decode_fixed_provided(addr, index_bits) == (index, offset)


@pytest.mark.parametrize(
    ("index_bits", "index", "offset", "match"),
    [
        (20, 1 << 20, 0, "index 1048576 does not fit the 20/44 split"),
        (20, 0, 1 << 44, "does not fit the 20/44 split"),
        (20, -1, 0, "index -1"),
        # The 32/32 kernel keeps the index in a u16: 65536 would name buffer 0.
        (32, 1 << 16, 0, "index 65536 does not fit the 32/32 split"),
        (32, 0, 1 << 32, "offset 4294967296 does not fit the 32/32 split"),
        (32, 0, -1, "offset -1"),
    ],
)
def test_fixed_provided_encoding_rejects_what_the_kernel_cannot_decode(
    index_bits: int, index: int, offset: int, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        encode_fixed_provided(index, offset, index_bits)


def test_an_entry_for_one_split_names_other_bytes_under_the_other() -> None:
    # What the split probe relies on: (32768 << 20) | 0 is offset 8 under 32/32.
    addr = encode_fixed_provided(0, 32768, 20)
    assert decode_fixed_provided(addr, 32) == (0, 8)
    # And the other way: a 32/32 entry is offset << 12 under 20/44.
    assert decode_fixed_provided(encode_fixed_provided(3, 4096, 32), 20) == (3, 4096 << 12)
    with pytest.raises(ValueError, match="no fixed-provided split with 24"):
        encode_fixed_provided(0, 0, 24)


@pytest.mark.parametrize("index_bits", sorted(SPLITS))
def test_ring_writes_and_reads_entries_in_its_split(index_bits: int) -> None:
    arena = RegisteredArena(4 * 4096, 4096, buf_index=5)
    ring = ProvidedRing(4, fixed=True, index_bits=index_bits)
    ring.publish(arena, [(3 * 4096, 10, 3), (4096 + 7, 20, 1)])
    assert struct.unpack_from("<Q", ring.memory, 0)[0] == (3 * 4096) << index_bits | 5
    assert [(decode_fixed_provided(a, index_bits), n, bid) for a, n, bid in entries(ring)] == [
        ((5, 3 * 4096), 10, 3),
        ((5, 4096 + 7), 20, 1),
    ]


def test_ring_publishes_nothing_the_kernel_cannot_decode() -> None:
    arena = RegisteredArena(2 * 4096, 4096, buf_index=1 << 16)
    ring = ProvidedRing(4, fixed=True, index_bits=32)
    with pytest.raises(ValueError, match="32/32"):
        ring.publish(arena, [(0, 1, 0), (4096, 1, 1)])
    assert ring.published == 0 and ring.published_tail == 0
    # The same arena is fine where the kernel honours 20 index bits.
    wide = ProvidedRing(4, fixed=True, index_bits=20)
    wide.publish(arena, [(0, 1, 0), (4096, 1, 1)])
    assert wide.published_tail == 2


def test_ring_memory_matches_struct_io_uring_buf_ring() -> None:
    arena = RegisteredArena(4 * 4096, 4096, buf_index=3)
    ring = ProvidedRing(4, fixed=True, index_bits=20)
    ring.publish(arena, [(2 * 4096, 100, 2), (0, 4096, 0)])
    raw = bytes(ring.memory[: 4 * 16])
    # struct io_uring_buf { __u64 addr; __u32 len; __u16 bid; __u16 resv; }
    # with the ring tail overlaying resv of entry 0.
    addr0, len0, bid0, tail = struct.unpack_from("<QIHH", raw, 0)
    addr1, len1, bid1, resv1 = struct.unpack_from("<QIHH", raw, 16)
    assert (addr0, len0, bid0) == ((2 * 4096) << 20 | 3, 100, 2)
    assert (addr1, len1, bid1, resv1) == ((0 << 20) | 3, 4096, 0, 0)
    assert tail == 2 == ring.published_tail
    assert ring.address % 4096 == 0


def test_plain_ring_holds_pointers_in_order() -> None:
    arena = RegisteredArena(8 * 1024, 1024)
    ring = ProvidedRing(8, fixed=False)
    ring.publish(arena, [(5 * 1024, 10, 5), (1024 + 100, 20, 1), (7 * 1024, 30, 7)])
    assert entries(ring) == [
        (arena.base + 5 * 1024, 10, 5),
        (arena.base + 1024 + 100, 20, 1),
        (arena.base + 7 * 1024, 30, 7),
    ]
    ring.advance(3)
    assert ring.published == 0 and entries(ring) == []
    with pytest.raises(RuntimeError, match="underflow"):
        ring.advance(1)


def test_fixed_entries_name_offsets_inside_slices() -> None:
    arena = RegisteredArena(4 * 4096, 4096)
    ring = ProvidedRing(4, fixed=True)
    ring.publish(arena, [(4096 + 17, 100, 1)])
    addr, length, bid = entries(ring)[0]
    assert decode_fixed_provided(addr) == (0, 4096 + 17)
    assert (length, bid) == (100, 1)


def test_ring_wraps_and_refuses_overflow() -> None:
    arena = RegisteredArena(4 * 512, 512)
    ring = ProvidedRing(4)
    segments = [(0, 1, 0), (512, 2, 1), (1024, 3, 2)]
    for round_ in range(5):
        ring.publish(arena, segments)
        assert [bid for _, _, bid in entries(ring)] == [0, 1, 2], round_
        ring.advance(3)
    ring.publish(arena, [*segments, (1536, 1, 3)])
    with pytest.raises(RuntimeError, match="overflow"):
        ring.publish(arena, [(0, 1, 0)])


def test_ring_sizes() -> None:
    assert [ProvidedRing.entries_for(n) for n in (1, 2, 3, 64, 65)] == [1, 2, 4, 64, 128]
    with pytest.raises(ValueError):
        ProvidedRing(3)


def test_arena_validates_its_configuration() -> None:
    with pytest.raises(ValueError, match="at least one slice"):
        RegisteredArena(100, 4096)
    with pytest.raises(ValueError, match="1 GiB"):
        RegisteredArena(2 << 30, 1 << 20)
    with pytest.raises(TypeError):
        RegisteredArena(4096.0, 1024)  # type: ignore[arg-type]


def test_the_ring_index_wraps_where_the_tail_outgrows_32_bits() -> None:
    """The tail counts every entry ever published; the entry's slot and the
    kernel's 16-bit tail are that count modulo their sizes, past 2**32 too."""
    arena = RegisteredArena(4 * 4096, 4096, buf_index=3)
    ring = ProvidedRing(4, fixed=True, index_bits=20)
    ring.tail = ring.head = 2**32 - 1
    ring.publish(arena, [(0, 10, 0), (4096, 20, 1)])
    assert ring.published == 2
    assert ring.published_tail == (2**32 + 1) & 0xFFFF
    assert [(decode_fixed_provided(a, 20), n, bid) for a, n, bid in entries(ring)] == [
        ((3, 0), 10, 0),
        ((3, 4096), 20, 1),
    ]
