"""Registered content: copied once, sent to many streams by reference."""

from __future__ import annotations

import hashlib
import os
import socket

import pytest
import trio
from _streams import runnable_strategies, tcp_pair
from hypothesis import given, settings
from hypothesis import strategies as st

import trio_uring
from trio_uring._buffers import ContentRegion


def test_region_allocates_first_fit_and_merges_on_free() -> None:
    region = ContentRegion(1000, 64 * 8)
    a = region.allocate(100)  # 128 bytes, aligned
    b = region.allocate(64)
    c = region.allocate(1)
    assert (a, b, c) == (1000, 1128, 1192)
    region.free(b, 64)
    assert region.free_bytes == 64 * 8 - 128 - 64
    region.free(a, 100)
    region.free(c, 1)
    assert region.free_bytes == region.largest_free == 64 * 8


def test_region_full_says_how_much_is_free_and_what_to_do() -> None:
    region = ContentRegion(0, 4096)
    region.allocate(4000)
    with pytest.raises(trio_uring.ContentFullError, match=r"64 of its 4096 bytes.*content_size"):
        region.allocate(100)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 700)), max_size=60))
def test_region_never_hands_out_overlapping_ranges(ops: list[tuple[bool, int]]) -> None:
    region = ContentRegion(0, 64 * 64)
    live: dict[int, int] = {}
    for free_one, n in ops:
        if free_one and live:
            offset = sorted(live)[n % len(live)]
            region.free(offset, live.pop(offset))
            continue
        try:
            offset = region.allocate(n)
        except trio_uring.ContentFullError:
            continue
        span = -(-n // 64) * 64
        for other, m in live.items():
            assert offset + span <= other or other + -(-m // 64) * 64 <= offset
        live[offset] = n
    for offset, n in live.items():
        region.free(offset, n)
    assert region.free_bytes == region.largest_free == 64 * 64


@pytest.mark.parametrize("strategy", runnable_strategies())
async def test_one_registration_reaches_many_streams_copied_once(strategy: str) -> None:
    message = os.urandom(64 * 1024 + 3)
    async with trio_uring.open_manager(strategy=strategy) as manager:
        pairs = [await tcp_pair() for _ in range(10)]
        received = [bytearray() for _ in pairs]
        copied_before = manager.stats()["bytes_copied"]

        async def read(i: int) -> None:
            async for chunk in pairs[i][1]:
                received[i].extend(chunk)

        async with trio.open_nursery() as nursery:
            for i in range(len(pairs)):
                nursery.start_soon(read, i)
            with trio_uring.register(message) as handle:
                for _ in range(3):
                    for stream, _ in pairs:
                        await stream.send_all(handle)
                        await stream.send_all(handle[10:20])
            for stream, _ in pairs:
                await stream.send_eof()
        stats = [stream.stats() for stream, _ in pairs]
        for stream, peer in pairs:
            await stream.aclose()
            await peer.aclose()
        expected = (message + message[10:20]) * 3
        assert all(bytes(r) == expected for r in received)
        # Copied once, at registration; never per stream or per send.
        assert manager.stats()["bytes_copied"] - copied_before == len(message)
        assert all(s.bytes_copied == 0 for s in stats)
        with trio.fail_after(5):
            while manager.arena.content.free_bytes != manager.arena.content.size:
                await trio.sleep(0.005)


async def test_closed_handle_keeps_its_memory_until_the_sends_are_done() -> None:
    """The reuse invariant for content: a handle closed with sends in flight
    (the peer is not reading) keeps its bytes until they are delivered."""
    message = hashlib.sha256(b"seed").digest() * 2048  # 64 KiB
    async with trio_uring.open_manager(content_size=128 * 1024) as manager:
        region = manager.arena.content
        stream, peer = await tcp_pair()
        # Small buffers: 512 KiB cannot all leave while the peer does not read.
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        handle = trio_uring.register(message)
        for _ in range(8):
            await stream.send_all(handle)
        await trio.testing.wait_all_tasks_blocked()
        handle.close()
        with pytest.raises(ValueError, match="closed"):
            await stream.send_all(handle)
        # Still in use by the queued and in-flight sends: not free to reuse.
        assert region.free_bytes < region.size
        with pytest.raises(trio_uring.ContentFullError):
            trio_uring.register(b"y" * (region.size - 1024))
        got = bytearray()

        async def read() -> None:
            async for chunk in peer:
                got.extend(chunk)

        async with stream, peer, trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await stream.send_eof()
        assert bytes(got) == message * 8
        with trio.fail_after(5):
            while region.free_bytes != region.size:
                await trio.sleep(0.005)


async def test_bad_content_use_gets_clear_errors() -> None:
    async with trio_uring.open_manager(content_size=4096):
        handle = trio_uring.register(b"abc")
        with pytest.raises(TypeError, match="slicing only"):
            handle[0]  # type: ignore[index]
        with pytest.raises(ValueError, match="step 1"):
            handle[::2]
        assert handle[1:].tobytes() == b"bc" and len(handle[5:]) == 0
        with pytest.raises(TypeError, match="bytes-like"):
            trio_uring.register("text")  # type: ignore[arg-type]
        with pytest.raises(trio_uring.ContentFullError, match="content_size"):
            trio_uring.register(b"x" * 5000)
        handle.close()
        assert "closed" in repr(handle)
