"""Invariant 1: a slice is never rewritten before its send's notification.

The peer stops reading, so zero-copy sends sit in the socket's send queue
with the kernel still referencing their slices: the send CQE has arrived, the
notification has not.  The arena is tiny, so every further ``send_all`` must
wait for notifications.  If slices were released on the send CQE instead,
later chunks would overwrite data still queued, and the receiver would see
it: each chunk carries its own number, so any reuse shows as corruption.
"""

from __future__ import annotations

import socket as stdlib_socket

import pytest
import trio
from _streams import runnable_strategies, tcp_pair

import trio_uring

ZERO_COPY = [s for s in runnable_strategies() if s not in ("copy", "socket")]
CHUNK = 4096
CHUNKS = 256


def chunk(i: int) -> bytes:
    return i.to_bytes(4, "little") * (CHUNK // 4)


@pytest.mark.skipif(not ZERO_COPY, reason="no zero-copy strategy runs on this kernel")
@pytest.mark.parametrize("strategy", ZERO_COPY)
async def test_slices_are_not_reused_before_their_notification(strategy: str) -> None:
    async with trio_uring.open_manager(
        strategy=strategy, slice_size=CHUNK, arena_size=4 * CHUNK
    ) as manager:
        stream, peer = await tcp_pair()
        peer.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_RCVBUF, 4096)
        received = bytearray()
        notified_before_reading: list[int] = []

        async def slow_reader() -> None:
            await trio.sleep(0.3)
            notified_before_reading.append(stream.stats().notifications)
            async for data in peer:
                received.extend(data)

        async with stream, peer:
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(slow_reader)
                    for i in range(CHUNKS):
                        await stream.send_all(chunk(i))
                    await stream.send_eof()
            stats = stream.stats()
        # The scenario really had sends waiting for notifications: the arena
        # (4 slices) ran dry while the reader slept.
        assert stats.sends >= CHUNKS // 4
        assert notified_before_reading[0] < stats.sends
        assert len(received) == CHUNK * CHUNKS
        for i in range(CHUNKS):
            got = bytes(received[i * CHUNK : (i + 1) * CHUNK])
            assert got == chunk(i), f"chunk {i} was overwritten by a later send"
        assert manager.arena.free_count == manager.arena.n_slices


def small(i: int) -> bytes:
    return i.to_bytes(4, "little") * 25  # 100 bytes, numbered


@pytest.mark.skipif(not ZERO_COPY, reason="no zero-copy strategy runs on this kernel")
@pytest.mark.parametrize("strategy", ZERO_COPY)
async def test_packed_small_sends_are_not_rewritten_before_their_notification(
    strategy: str,
) -> None:
    """Many tiny sends share slices: a request reads the front of a tail
    slice while later messages are appended behind it, and the slice is
    rewritten only after every request that read it was notified."""
    count = 20_000
    async with trio_uring.open_manager(
        strategy=strategy, slice_size=CHUNK, arena_size=8 * CHUNK
    ) as manager:
        stream, peer = await tcp_pair()
        peer.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_RCVBUF, 4096)
        received = bytearray()

        async def slow_reader() -> None:
            await trio.sleep(0.2)
            async for data in peer:
                received.extend(data)
                await trio.sleep(0)

        async with stream, peer:
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(slow_reader)
                    for i in range(count):
                        await stream.send_all(small(i))
                    await stream.send_eof()
            stats = stream.stats()
        # Messages were packed: far fewer requests than send_all calls.
        assert stats.sends < count // 4
        assert len(received) == 100 * count
        for i in range(count):
            got = bytes(received[i * 100 : (i + 1) * 100])
            assert got == small(i), f"message {i} was overwritten by a later send"
        with trio.fail_after(5):
            while manager.arena.free_count != manager.arena.n_slices:
                await trio.sleep(0.005)
