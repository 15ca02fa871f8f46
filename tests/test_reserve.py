"""ZeroCopyStream.reserve: producing data straight into registered memory."""

from __future__ import annotations

import hashlib

import pytest
import trio
import trio.testing
from _streams import runnable_strategies, tcp_pair
from trio_uring._shim_cffi import ffi

import trio_uring


async def test_reserved_bytes_arrive(manager) -> None:
    stream, peer = await tcp_pair()
    async with stream, peer:
        async with stream.reserve(5) as view:
            assert len(view) == 5 and not view.readonly
            view[:] = b"hello"
        assert await peer.receive_some(10) == b"hello"
        assert stream.stats().bytes_sent == 5
    assert manager.arena.free_count == manager.arena.n_slices


async def test_view_is_released_when_the_block_ends(manager) -> None:
    stream, peer = await tcp_pair()
    async with stream, peer:
        async with stream.reserve(3) as view:
            view[:] = b"abc"
        with pytest.raises(ValueError):
            view[0] = 1
        assert await peer.receive_some(10) == b"abc"


async def test_an_error_in_the_block_sends_nothing(manager) -> None:
    stream, peer = await tcp_pair()
    async with stream, peer:
        with pytest.raises(KeyError):
            async with stream.reserve(100) as view:
                view[:4] = b"lost"
                raise KeyError("producer failed")
        assert manager.arena.free_count == manager.arena.n_slices
        # Not broken: nothing was sent.
        await stream.send_all(b"next")
        assert await peer.receive_some(10) == b"next"


async def test_cancelled_inside_the_block_sends_nothing(manager) -> None:
    stream, peer = await tcp_pair()
    async with stream, peer:
        with trio.move_on_after(0.01):
            async with stream.reserve(10) as view:
                view[:] = b"x" * 10
                await trio.sleep_forever()
        await stream.send_all(b"after")
        assert await peer.receive_some(10) == b"after"


async def test_reserve_arguments_are_checked(manager) -> None:
    stream, peer = await tcp_pair()
    async with stream, peer:
        slice_size = manager.arena.slice_size
        with pytest.raises(ValueError, match="slice_size"):
            async with stream.reserve(slice_size + 1):
                pass  # pragma: no cover
        with pytest.raises(ValueError, match="1 to slice_size"):
            async with stream.reserve(0):
                pass  # pragma: no cover
        with pytest.raises(TypeError, match="byte count"):
            async with stream.reserve(1.5):  # type: ignore[arg-type]
                pass  # pragma: no cover
        async with stream.reserve(slice_size) as view:
            view[:] = b"z" * slice_size
        got = b""
        while len(got) < slice_size:
            got += await peer.receive_some()
        assert got == b"z" * slice_size


async def test_reserve_counts_as_a_send_in_progress(manager) -> None:
    stream, peer = await tcp_pair()
    async with stream, peer:
        async with stream.reserve(1) as view:
            view[0] = 65
            with pytest.raises(trio.BusyResourceError):
                await stream.send_all(b"x")
        assert await peer.receive_some(10) == b"A"
    with pytest.raises(trio.ClosedResourceError):
        async with stream.reserve(1):
            pass  # pragma: no cover


async def test_reserve_after_send_eof_is_closed(manager) -> None:
    stream, peer = await tcp_pair()
    async with stream, peer:
        await stream.send_eof()
        with pytest.raises(trio.ClosedResourceError):
            async with stream.reserve(1):
                pass  # pragma: no cover


async def test_an_exported_view_retires_its_slice(manager) -> None:
    stream, peer = await tcp_pair()
    async with stream, peer:
        with pytest.raises(RuntimeError, match="still alive"):
            async with stream.reserve(8) as view:
                kept = ffi.from_buffer(view)  # holds a buffer export of the view
        assert manager.arena.free_count == manager.arena.n_slices - 1
        assert stream.queue.held == 0  # retired, not counted against the stream
        ffi.release(kept)


@pytest.mark.parametrize("strategy", runnable_strategies())
async def test_reserved_sends_interleave_with_send_all_intact(strategy: str) -> None:
    """Reserved and copied sends share the arena under recycling pressure."""
    async with trio_uring.open_manager(
        strategy=strategy, slice_size=4096, arena_size=4 * 4096
    ) as manager:
        stream, peer = await tcp_pair()
        sent = hashlib.sha256()
        got = hashlib.sha256()
        async with stream, peer:

            async def drain() -> None:
                async for chunk in peer:
                    got.update(chunk)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain)
                for i in range(300):
                    data = bytes([i % 251]) * (1 + (i * 37) % 4096)
                    if i % 2:
                        async with stream.reserve(len(data)) as view:
                            view[:] = data
                    else:
                        await stream.send_all(data)
                    sent.update(data)
                await stream.send_eof()
        assert got.digest() == sent.digest()
        with trio.fail_after(5):
            while manager.arena.free_count != manager.arena.n_slices:
                await trio.sleep(0.005)
