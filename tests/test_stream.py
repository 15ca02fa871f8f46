"""ZeroCopyStream: trio's stream contract, conventions and statistics."""

from __future__ import annotations

import errno
import os
import socket as stdlib_socket
import struct
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing
from _streams import (
    clog,
    close_under_a_waiting_call,
    fix_buffers,
    runnable_strategies,
    sends_until_might_block,
    unix_pair,
    zc_tcp_pair,
)

import trio_uring
from trio_uring._manager import FLUSH_THRESHOLD
from trio_uring._queue import OutboundQueue
from trio_uring._send import DIRECT_SEND_MIN, STRATEGY_IMPLS

#: Strategies that queue a small message (a zero-copy request at the
#: tick), and those that send it inside ``send_all`` with a plain send().
QUEUEING = [s for s in runnable_strategies() if not STRATEGY_IMPLS[s].sends_at_once]
SENDING_AT_ONCE = [s for s in runnable_strategies() if STRATEGY_IMPLS[s].sends_at_once]


async def zc_unix_pair() -> tuple[trio_uring.ZeroCopyStream, trio_uring.ZeroCopyStream]:
    left, right = await unix_pair()
    return left, trio_uring.ZeroCopyStream(right.socket)


async def roomy_zc_tcp_pair() -> tuple[trio_uring.ZeroCopyStream, trio_uring.ZeroCopyStream]:
    """``zc_tcp_pair`` with socket buffers that take every flush at once."""
    left, right = await zc_tcp_pair()
    big = 8 * 1024 * 1024
    left.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_SNDBUF, big)
    right.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_RCVBUF, big)
    return left, right


async def drain_into(stream: trio.abc.ReceiveStream, received: bytearray) -> None:
    """Receive until EOF, appending to ``received``."""
    async for chunk in stream:
        received.extend(chunk)


def clogged(maker):
    """Clog the way a user would: fill the socket, then the stream's queue."""

    async def make() -> tuple[trio_uring.ZeroCopyStream, trio_uring.ZeroCopyStream]:
        left, right = await maker()
        fix_buffers(left, right)
        for stream in (left, right):
            await clog(stream)
            await sends_until_might_block(stream)
        return left, right

    return make


@pytest.mark.parametrize("maker", [zc_tcp_pair, zc_unix_pair], ids=["tcp", "unix"])
async def test_trio_half_closeable_stream_conformance(manager, strategy, maker) -> None:
    await trio.testing.check_half_closeable_stream(maker, clogged(maker))


async def test_closing_wakes_a_blocked_sender(manager) -> None:
    left, right = await zc_tcp_pair()
    async with right:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:

                async def close_soon() -> None:
                    await trio.testing.wait_all_tasks_blocked(0.05)
                    await trio.aclose_forcefully(left)

                nursery.start_soon(close_soon)
                with pytest.raises(trio.ClosedResourceError):
                    for _ in range(1000):
                        await left.send_all(b"x" * (1 << 20))
    arena = manager.arena
    with trio.fail_after(5):
        while arena.free_count != arena.n_slices:
            await trio.sleep(0.01)


async def test_busy_resource_errors(manager) -> None:
    left, right = await zc_tcp_pair()
    async with right:
        await clog(left)
        with pytest.RaisesGroup(
            pytest.RaisesExc(trio.BusyResourceError, match="another task is currently sending")
        ):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(left.send_all, b"x" * 100)
                nursery.start_soon(left.send_all, b"y" * 100)
        # Nobody reads what left queued: drop it.  (A graceful close would
        # wait for the peer, or, once the peer's close reset the connection,
        # report the loss.)
        await trio.aclose_forcefully(left)
    left, right = await zc_tcp_pair()
    async with left, right:
        with pytest.RaisesGroup(
            pytest.RaisesExc(trio.BusyResourceError, match="currently receiving")
        ):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(left.receive_some, 10)
                nursery.start_soon(left.receive_some, 10)


async def test_closed_resource_errors_after_aclose(manager) -> None:
    left, right = await zc_tcp_pair()
    await left.aclose()
    await left.aclose()  # idempotent
    with pytest.raises(trio.ClosedResourceError):
        await left.send_all(b"x")
    with pytest.raises(trio.ClosedResourceError):
        await left.receive_some(10)
    with pytest.raises(trio.ClosedResourceError):
        await left.send_eof()
    with pytest.raises(trio.ClosedResourceError):
        await left.wait_send_all_might_not_block()
    await right.aclose()


async def test_aclose_wakes_a_blocked_receiver_with_closed_resource_error(manager) -> None:
    left, right = await zc_tcp_pair()
    async with right:
        await close_under_a_waiting_call(lambda: left.receive_some(10), left.aclose)
    if manager.ring is not None:
        assert manager.ring.table == {}


async def test_async_for_receives_like_receive_some(manager) -> None:
    """``async for`` (``ZeroCopyStream.__anext__``, receive_some written
    out): bytes already waiting, bytes it waits for, the end of the stream;
    a cancel point that loses nothing, whether it is cancelled before it
    looks or while it waits; receive_some's errors."""
    left, right = await zc_tcp_pair()
    async with right:
        await right.send_all(b"waiting")
        await trio.sleep(0.01)
        chunks = aiter(left)
        assert await anext(chunks) == b"waiting"
        await right.send_all(b"kept")
        await trio.sleep(0.01)
        with trio.CancelScope() as scope:
            scope.cancel()
            await anext(chunks)  # the checkpoint raises before a recv
        assert scope.cancelled_caught
        assert await anext(chunks) == b"kept"
        with trio.move_on_after(0.05) as scope:
            await anext(chunks)  # nothing yet: cancelled while it waits
        assert scope.cancelled_caught
        got = []

        async def take() -> None:
            got.append(await anext(chunks))

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(take)
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(trio.BusyResourceError, match="currently receiving"):
                    await left.receive_some()
                await right.send_all(b"later")
            assert got == [b"later"]
            await right.send_all(b"last")
            await right.send_eof()
            received = b""
            async for chunk in left:
                received += chunk
            assert received == b"last"
    await left.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await anext(aiter(left))
    left, right = await zc_tcp_pair()
    right.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_LINGER, struct.pack("ii", 1, 0))
    await right.aclose()
    with trio.fail_after(5), pytest.raises(trio.BrokenResourceError) as info:
        async for _ in left:
            pass
    assert info.value.__cause__.errno == errno.ECONNRESET
    await left.aclose()


async def test_reset_by_peer_is_broken_resource_error_with_cause(manager) -> None:
    left, right = await zc_tcp_pair()
    right.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_LINGER, struct.pack("ii", 1, 0))
    await right.aclose()
    with trio.fail_after(10), pytest.raises(trio.BrokenResourceError) as info:
        while True:
            await left.send_all(b"x" * 65536)
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno in (errno.ECONNRESET, errno.EPIPE)
    # Once broken, always broken.
    with pytest.raises(trio.BrokenResourceError):
        await left.send_all(b"more")
    await left.aclose()


async def test_receive_after_reset_is_broken(manager) -> None:
    left, right = await zc_tcp_pair()
    right.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_LINGER, struct.pack("ii", 1, 0))
    await right.aclose()
    with trio.fail_after(5), pytest.raises(trio.BrokenResourceError) as info:
        await left.receive_some(10)
    assert info.value.__cause__.errno == errno.ECONNRESET
    await left.aclose()


async def test_epipe_after_send_eof_of_peer_and_close(manager) -> None:
    left, right = await zc_tcp_pair()
    await right.aclose()
    with trio.fail_after(10), pytest.raises(trio.BrokenResourceError) as info:
        for _ in range(1000):
            await left.send_all(b"x" * 4096)
            await trio.sleep(0.001)
    assert info.value.__cause__.errno in (errno.EPIPE, errno.ECONNRESET)
    await left.aclose()


def fail_writes_part_way(
    stream: trio_uring.ZeroCopyStream, *, after: int = 0, queued: int = 100
) -> None:
    """The stream's queue.write() queues nothing ``after`` times, as when no
    slice is free; then it queues ``queued`` bytes and raises, as a
    MemoryError part way through a copy would."""
    calls = []

    class FailsPartWay(OutboundQueue):
        __slots__ = ()

        def write(self, data: bytes | bytearray | memoryview, pos: int = 0) -> int:
            calls.append(pos)
            if len(calls) <= after:
                return pos
            super().write(memoryview(data)[: pos + queued], pos)
            raise MemoryError

    stream.queue.__class__ = FailsPartWay


@pytest.mark.parametrize("after", [0, 1], ids=["at-once", "after-waiting-for-room"])
@pytest.mark.parametrize("strategy", QUEUEING)
async def test_send_all_that_raises_with_a_prefix_queued_breaks_the_stream(
    strategy: str, manager, after: int
) -> None:
    left, right = await zc_tcp_pair()
    async with left, right:
        fail_writes_part_way(left, after=after)
        with pytest.raises(MemoryError):
            await left.send_all(b"m" * 1000)
        left.queue.__class__ = OutboundQueue
        with pytest.raises(trio.BrokenResourceError):
            await left.send_all(b"next")


async def test_send_all_that_raises_after_a_plain_send_took_a_prefix_breaks_the_stream() -> None:
    if "copy" not in runnable_strategies():
        pytest.skip("no io_uring here")
    async with trio_uring.open_manager(strategy="copy"):
        left, right = await zc_tcp_pair()
        async with left, right:
            real = left.stdlib_socket

            class SendsAPrefix:
                def __getattr__(self, name: str) -> object:
                    return getattr(real, name)

                def send(self, data: memoryview, flags: int = 0) -> int:
                    return real.send(data[:10], flags)

            left.stdlib_socket = SendsAPrefix()  # type: ignore[assignment]
            fail_writes_part_way(left, queued=0)
            with pytest.raises(MemoryError):
                await left.send_all(bytearray(1000))
            left.stdlib_socket = real
            left.queue.__class__ = OutboundQueue
            with pytest.raises(trio.BrokenResourceError):
                await left.send_all(b"next")
            assert await right.receive_some(100) == bytes(10)


async def test_cancelled_send_all_breaks_the_stream_and_returns_slices(manager) -> None:
    left, right = await zc_tcp_pair()
    arena = manager.arena
    async with left, right:
        fix_buffers(left, right)
        with trio.move_on_after(0.05) as scope:
            # Far more than the socket buffers and the arena hold together.
            await left.send_all(b"z" * (arena.size * 4))
        assert scope.cancelled_caught
        with pytest.raises(trio.BrokenResourceError, match="cancelled part way"):
            await left.send_all(b"again")
        # Receiving still works on a stream whose sending side broke.
        await right.send_all(b"ping")
        assert await left.receive_some(10) == b"ping"
    with trio.fail_after(5):
        while arena.free_count != arena.n_slices:
            await trio.sleep(0.01)
    if manager.ring is not None:
        assert manager.ring.table == {}


async def test_empty_send_all_is_a_checkpoint(manager) -> None:
    left, right = await zc_tcp_pair()
    async with left, right:
        with trio.testing.assert_checkpoints():
            await left.send_all(b"")
        with trio.testing.assert_checkpoints():
            await left.send_all(b"abc")
        with trio.testing.assert_checkpoints():
            assert await right.receive_some(10) == b"abc"


async def test_bad_input_is_a_clear_error(manager) -> None:
    left, right = await zc_tcp_pair()
    async with left, right:
        with pytest.raises(TypeError, match="bytes-like"):
            await left.send_all("text")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="contiguous"):
            await left.send_all(memoryview(b"abcdef")[::2])
        with pytest.raises(ValueError, match=">= 1"):
            await left.receive_some(0)
        with pytest.raises(TypeError, match="max_bytes must be an int"):
            await left.receive_some(1.5)  # type: ignore[arg-type]
        await left.send_all(memoryview(bytearray(b"12345678")).cast("I"))
        assert await right.receive_some(100) == b"12345678"
        await left.send_all(b"huge")
        assert await right.receive_some(1 << 40) == b"huge"


async def test_from_socket_validates_its_argument(manager) -> None:
    with pytest.raises(TypeError, match="from_stdlib_socket"):
        trio_uring.ZeroCopyStream.from_socket(stdlib_socket.socket())  # type: ignore[arg-type]
    udp = trio.socket.socket(type=stdlib_socket.SOCK_DGRAM)
    with udp, pytest.raises(ValueError, match="SOCK_STREAM"):
        trio_uring.ZeroCopyStream.from_socket(udp)
    closed = trio.socket.socket()
    closed.close()
    with pytest.raises(ValueError, match="closed"):
        trio_uring.ZeroCopyStream.from_socket(closed)


async def test_socket_options_pass_through(manager) -> None:
    left, right = await zc_tcp_pair()
    async with left, right:
        assert left.getsockopt(stdlib_socket.IPPROTO_TCP, stdlib_socket.TCP_NODELAY)
        left.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_SNDBUF, 1 << 16)
        assert left.getsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_SNDBUF, 4)
        assert left.socket.family == stdlib_socket.AF_INET


async def test_stats_after_a_bulk_send(manager, strategy: str) -> None:
    left, right = await zc_tcp_pair()
    payload = os.urandom(8 * manager.arena.slice_size + 123)
    received = bytearray()
    async with left, right:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain_into, right, received)
            for _ in range(4):
                await left.send_all(payload)
            await left.send_eof()
        # Notifications trail the sends: wait for every slice to come back.
        with trio.fail_after(5):
            while manager.arena.free_count != manager.arena.n_slices:
                await trio.sleep(0.005)
        stats = left.stats()
    assert received == payload * 4
    assert stats.strategy == strategy
    assert stats.bytes_sent == len(payload) * 4
    assert stats.sends >= 1
    # Zero copy copies every byte into slices once; the copying strategies
    # send payloads this large straight from the caller's buffer.
    zero_copy = strategy in ("vectored-fixed", "fixed-single", "fixed-provided-bundle")
    assert stats.bytes_copied == (len(payload) * 4 if zero_copy else 0)
    if zero_copy:
        # Every zero-copy send gets one notification; on loopback the kernel
        # copies, and says so in every one of them.
        assert stats.notifications == stats.sends
        assert stats.notifications_copied == stats.notifications
        assert stats.notifications_zerocopy == 0
    else:
        assert stats.notifications == 0
    assert manager.arena.free_count == manager.arena.n_slices


async def test_unix_streams_use_copy_instead_of_zero_copy(manager, strategy: str) -> None:
    left, right = await unix_pair()
    async with left, right:
        expected = "socket" if strategy == "socket" else "copy"
        assert left.stats().strategy == expected
        await left.send_all(b"over unix")
        assert await right.receive_some(100) == b"over unix"


async def test_stream_leaves_zero_copy_when_the_kernel_keeps_copying() -> None:
    """With the strategy left to the library, loopback's copied notifications
    switch the stream to plain sends after COPIED_SWITCH_THRESHOLD of them."""
    from trio_uring._stream import COPIED_FALLBACK_STRATEGY, COPIED_SWITCH_THRESHOLD

    if trio_uring.features().strategy in ("copy", "socket"):
        pytest.skip("no zero-copy strategy runs on this kernel")
    async with trio_uring.open_manager(slice_size=4096, arena_size=64 * 4096) as manager:
        assert manager.adaptive
        left, right = await zc_tcp_pair()
        received = bytearray()
        async with left, right:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain_into, right, received)
                for i in range(4 * COPIED_SWITCH_THRESHOLD):
                    await left.send_all(bytes([i % 256]) * 4096)
                    await trio.sleep(0)
                await left.send_eof()
            stats = left.stats()
        assert stats.strategy == COPIED_FALLBACK_STRATEGY
        assert stats.notifications_copied >= COPIED_SWITCH_THRESHOLD
        assert stats.notifications < stats.sends
        expected = (bytes([i % 256]) * 4096 for i in range(4 * COPIED_SWITCH_THRESHOLD))
        assert received == b"".join(expected)


async def test_a_plain_send_stream_sends_a_lone_message_at_once_and_queues_a_flow() -> None:
    """Under ``copy`` a message of a stream that queued nothing in the last
    two ticks (a response) goes out with one send() from send_all, copied
    nowhere in user space; back-to-back messages are queued and coalesced."""
    if not trio_uring.features().io_uring:
        pytest.skip("the copy strategy needs io_uring")
    async with trio_uring.open_manager(strategy="copy"):
        left, right = await zc_tcp_pair()
        received = bytearray()
        async with left, right, trio.open_nursery() as nursery:
            nursery.start_soon(drain_into, right, received)
            await left.send_all(b"response")
            stats = left.stats()
            assert (stats.sends, stats.bytes_sent, stats.bytes_copied) == (1, 8, 0)
            await trio.sleep(0.01)
            flow = [bytes([i]) * 100 for i in range(200)]
            for message in flow:
                await left.send_all(message)
            await left.send_eof()
            stats = left.stats()
            assert stats.bytes_sent == 8 + 200 * 100
            # The first message of the flow went at once; the rest were
            # copied into the queue and left in fewer, larger sends.
            assert stats.bytes_copied == 199 * 100
            assert stats.sends < 100
        assert received == b"response" + b"".join(flow)


async def test_a_flow_is_held_while_it_queues_and_flushed_once_it_pauses_or_trio_sleeps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The per-tick flush holds a stream that queued in this tick and the one
    before (a producer in full flow), flushes it at the end of the first tick
    in which it queued nothing, and holds nothing when trio is about to sleep."""
    if not trio_uring.features().io_uring:
        pytest.skip("the copy strategy needs io_uring")
    async with trio_uring.open_manager(strategy="copy") as manager:
        left, right = await zc_tcp_pair()
        flushed_at: list[int] = []  # the tick whose end flushed the stream
        real_flush = trio_uring.ZeroCopyStream.flush

        def flush(stream: trio_uring.ZeroCopyStream) -> None:
            if stream is left:
                flushed_at.append(manager.ticker.tick - 1)
            real_flush(stream)

        monkeypatch.setattr(trio_uring.ZeroCopyStream, "flush", flush)
        async with left, right:
            await left.send_all(b"r")  # a lone message: one send() at once
            assert left.stats().sends == 1 and not left.queue.nbytes
            t1 = manager.ticker.tick
            await left.send_all(b"a")  # the tick after: a flow, queued
            t2 = manager.ticker.tick
            await left.send_all(b"b")
            assert t2 == t1 + 1 and left.queue.nbytes == 2 and flushed_at == []
            await trio.lowlevel.cancel_shielded_checkpoint()  # a tick without a message
            assert flushed_at == [t2 + 1] and not left.queue.nbytes

            await left.send_all(b"c")  # lone again (two ticks went by)
            t3 = manager.ticker.tick
            assert left.queue.write(b"d") == 1  # the next tick: a flow
            left._queued(t3)
            assert left.hold_tick == t3
            await trio.sleep(0.01)  # nothing else to run: trio sleeps, nothing is held
            assert flushed_at == [t2 + 1, t3] and not left.queue.nbytes
            await left.send_eof()
            assert await right.receive_some(10) == b"rabcd"


async def test_a_copying_stream_holds_a_flow_of_large_bytes_by_reference() -> None:
    """Under ``copy`` a flow of ``bytes`` messages of ``DIRECT_SEND_MIN`` or
    more is held by reference and leaves several per send(), copied nowhere
    in user space; mutable buffers are sent before ``send_all`` returns, so
    changing them afterwards changes nothing on the wire."""
    if not trio_uring.features().io_uring:
        pytest.skip("the copy strategy needs io_uring")
    async with trio_uring.open_manager(strategy="copy"):
        left, right = await zc_tcp_pair()
        received = bytearray()
        flow = [bytes([i]) * DIRECT_SEND_MIN for i in range(40)]
        async with left, right, trio.open_nursery() as nursery:
            nursery.start_soon(drain_into, right, received)
            for message in flow:
                await left.send_all(message)
            mutable = bytearray(b"m" * DIRECT_SEND_MIN)
            for _ in range(4):
                await left.send_all(mutable)
                mutable[:] = b"!" * DIRECT_SEND_MIN
            await left.send_eof()
            stats = left.stats()
            assert stats.bytes_copied == 0
            assert stats.bytes_sent == 44 * DIRECT_SEND_MIN
            assert stats.sends < 30
        assert received == b"".join(flow) + b"m" * DIRECT_SEND_MIN + b"!" * 3 * DIRECT_SEND_MIN


async def test_copy_flushes_slices_at_the_threshold_and_held_bytes_at_the_share() -> None:
    """Held bytes wait for more messages up to the stream's share; bytes
    copied into the arena's slices, shared by every stream, only up to
    ``FLUSH_THRESHOLD``."""
    if not trio_uring.features().io_uring:
        pytest.skip("the copy strategy needs io_uring")
    async with trio_uring.open_manager(strategy="copy"):
        left, right = await roomy_zc_tcp_pair()
        queue = left.queue
        share = queue.limit * queue.slice_size
        assert left.flush_threshold == share
        assert left.flush_slices == FLUSH_THRESHOLD // queue.slice_size
        received = bytearray()
        async with left, right, trio.open_nursery() as nursery:
            nursery.start_soon(drain_into, right, received)
            # Queued within one tick, as a flow's messages are before the
            # tick's flush: the send happens at the threshold, not before.
            for _ in range(2 * FLUSH_THRESHOLD // 4096):
                assert queue.write(memoryview(b"s" * 4096)) == 4096
                left._queued(left.ticker.tick)
                if left.stats().sends:
                    break
            assert left.stats().sends == 1
            assert FLUSH_THRESHOLD < left.stats().bytes_sent <= FLUSH_THRESHOLD + queue.slice_size
            with trio.fail_after(5):
                while queue.nbytes or left.in_flight is not None:
                    await trio.sleep(0.01)
            held = 0
            for _ in range(2 * share // DIRECT_SEND_MIN):
                queue.hold(b"h" * DIRECT_SEND_MIN)
                left._queued(left.ticker.tick)
                held += 1
                if left.stats().sends == 2:
                    break
            assert held == share // DIRECT_SEND_MIN
            await left.send_eof()
        assert len(received) == left.stats().bytes_sent


async def test_a_flow_through_send_all_leaves_at_the_threshold_in_a_send_each() -> None:
    """A producer in full flow is held at every tick, and ``send_all`` itself
    flushes it each time its slices pass ``FLUSH_THRESHOLD``: one send per
    threshold's worth, neither one per tick (the hold lost) nor one per
    share (the threshold lost).  ``send_all`` writes the rule out for this
    case, apart from ``_queued``, so it is checked through ``send_all``."""
    if not trio_uring.features().io_uring:
        pytest.skip("the copy strategy needs io_uring")
    async with trio_uring.open_manager(strategy="copy"):
        left, right = await roomy_zc_tcp_pair()
        per_send = FLUSH_THRESHOLD + left.queue.slice_size  # past it by one slice
        flushes = 16
        message = b"f" * 4096
        received = bytearray()
        async with left, right, trio.open_nursery() as nursery:
            nursery.start_soon(drain_into, right, received)
            await left.send_all(message)  # a lone message: one send() at once
            for _ in range(flushes * per_send // len(message)):
                await left.send_all(message)
            during_the_flow = left.stats().sends - 1
            await left.send_eof()
        assert flushes - 1 <= during_the_flow <= flushes + 1
        assert len(received) == (1 + flushes * per_send // len(message)) * len(message)


async def test_held_bytes_wait_for_a_slow_peer_and_a_cancelled_wait_queues_nothing() -> None:
    """Held bytes count against the stream's share: once the peer stops
    reading, ``send_all`` waits when the share is queued, and the kernel
    sends what the socket could not take from the bytes themselves.  A
    send_all cancelled in that wait queued nothing: the stream stays usable."""
    if not trio_uring.features().io_uring:
        pytest.skip("the copy strategy needs io_uring")
    async with trio_uring.open_manager(strategy="copy"):
        left, right = await zc_tcp_pair()
        fix_buffers(left, right)
        share = left.queue.limit * left.queue.slice_size
        sent: list[bytes] = []
        received = bytearray()

        async def read_two_messages() -> None:
            while len(received) < 2 * DIRECT_SEND_MIN:
                received.extend(await right.receive_some(2 * DIRECT_SEND_MIN - len(received)))

        async with left, right:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_two_messages)
                with trio.move_on_after(1) as scope:
                    for i in range(4 * share // DIRECT_SEND_MIN):
                        message = bytes([i % 251]) * DIRECT_SEND_MIN
                        await left.send_all(message)
                        sent.append(message)
            assert scope.cancelled_caught
            assert left.queue.nbytes >= share - DIRECT_SEND_MIN
            assert left.in_flight is not None  # the kernel reads held bytes
            assert left.stats().bytes_copied == 0
            await left.send_all(b"after")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain_into, right, received)
                await left.send_eof()
        assert received == b"".join(sent) + b"after"


async def test_a_message_sent_at_once_to_a_reset_peer_raises_broken() -> None:
    if not trio_uring.features().io_uring:
        pytest.skip("the copy strategy needs io_uring")
    async with trio_uring.open_manager(strategy="copy"):
        left, right = await zc_tcp_pair()
        async with left:
            linger = struct.pack("ii", 1, 0)  # on, 0 s: close sends a reset
            right.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_LINGER, linger)
            await trio.aclose_forcefully(right)
            await trio.sleep(0.05)
            with pytest.raises(trio.BrokenResourceError) as info:
                await left.send_all(b"to nobody")
            assert isinstance(info.value.__cause__, OSError)
            with pytest.raises(trio.BrokenResourceError):
                await left.send_all(b"again")


async def test_cancelled_after_a_partial_send_at_once_the_stream_is_broken() -> None:
    """The socket took part of a message at once, no slice was free for the
    rest (other streams held them all) and the socket had no room for it:
    the peer has a prefix, so a cancel must break the stream even though
    nothing was queued."""
    if not trio_uring.features().io_uring:
        pytest.skip("the copy strategy needs io_uring")
    async with trio_uring.open_manager(strategy="copy") as manager:
        left, right = await zc_tcp_pair()
        fix_buffers(left, right)
        free = manager.arena.free_slices
        taken = free[:]
        free.clear()
        try:
            async with left, right:
                # A full socket with a little room made again: the lone
                # message's send() takes part of it, and then nothing more.
                await clog(left)
                await right.receive_some(65536)
                await trio.sleep(0.05)
                message = b"m" * 60_000
                with trio.move_on_after(0.2) as scope:
                    await left.send_all(message)
                assert scope.cancelled_caught
                assert 0 < left.stats().bytes_sent < len(message)
                with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
                    await left.send_all(b"next")
        finally:
            free.extend(taken)


async def test_send_all_after_the_manager_shut_down_says_so() -> None:
    """A stream used after its open_manager() block ended gets a clear
    error, never bytes queued that nothing will flush."""
    async with trio_uring.open_manager():
        left, right = await zc_tcp_pair()
    with pytest.raises(trio_uring.ManagerClosedError, match="open_manager"):
        await left.send_all(b"too late")
    await trio.aclose_forcefully(left)
    await trio.aclose_forcefully(right)


async def test_streams_on_a_copying_address_skip_the_zero_copy_trial() -> None:
    """Copied notifications count per route (local, peer address), whichever
    stream they come from: once COPIED_SWITCH_THRESHOLD in a row said
    "copied", a stream opened on that route starts in copied mode, and one
    already open switches at its next notification."""
    from trio_uring._manager import COPIED_SWITCH_THRESHOLD
    from trio_uring._stream import COPIED_FALLBACK_STRATEGY

    if trio_uring.features().strategy in ("copy", "socket"):
        pytest.skip("no zero-copy strategy runs on this kernel")

    async def send_notified(stream: trio_uring.ZeroCopyStream, count: int) -> None:
        """Send until ``count`` more notifications came back, or the stream
        left zero copy."""
        target = stream.stats().notifications + count
        i = 0
        with trio.fail_after(10):
            while (
                stream.stats().notifications < target
                and stream.stats().strategy != COPIED_FALLBACK_STRATEGY
            ):
                if stream.stats().sends < target:
                    await stream.send_all(bytes([i % 256]) * 4096)
                    i += 1
                await trio.sleep(0.001)

    async with trio_uring.open_manager(slice_size=4096, arena_size=64 * 4096) as manager:
        first, first_peer = await zc_tcp_pair()
        early, early_peer = await zc_tcp_pair()
        async with first, first_peer, early, early_peer:
            async with trio.open_nursery() as nursery:
                for peer in (first_peer, early_peer):
                    nursery.start_soon(drain_into, peer, bytearray())
                await send_notified(early, 2)
                assert early.stats().strategy != COPIED_FALLBACK_STRATEGY
                assert manager.stats()["copying_routes"] == []
                await send_notified(first, COPIED_SWITCH_THRESHOLD)
                # early's two count too: first switched two notifications sooner.
                assert first.stats().strategy == COPIED_FALLBACK_STRATEGY
                assert first.stats().notifications < COPIED_SWITCH_THRESHOLD
                assert manager.stats()["copying_routes"] == [("127.0.0.1", "127.0.0.1")]
                # Far below the threshold on its own, and it switches.
                await send_notified(early, 1)
                assert early.stats().strategy == COPIED_FALLBACK_STRATEGY
                assert early.stats().notifications <= 4
                late, late_peer = await zc_tcp_pair()
                received = bytearray()
                async with late, late_peer, trio.open_nursery() as late_nursery:
                    assert late.stats().strategy == COPIED_FALLBACK_STRATEGY
                    late_nursery.start_soon(drain_into, late_peer, received)
                    await late.send_all(b"late")
                    await late.send_eof()
                assert received == b"late"
                for stream in (first, early):
                    await stream.send_eof()


def test_copying_routes_count_copied_notifications_in_a_row_per_route() -> None:
    from trio_uring._manager import CopyingRoutes

    nic = ("10.0.0.1", "10.0.0.9")
    local = ("10.0.0.1", "10.0.0.1")  # a local client of the NIC address
    copying = CopyingRoutes(threshold=3)
    assert not copying.note(local, True)
    assert not copying.note(local, True)
    assert not copying.note(local, False)  # a real zero-copy send resets
    assert not copying.note(nic, True)  # another route counts apart
    assert not copying.note(local, True)
    assert not copying.note(local, True)
    assert local not in copying
    assert copying.note(local, True)
    assert local in copying and nic not in copying
    # Once copying, it stays so, whatever a late notification says.
    assert copying.note(local, False)
    assert copying.routes == {local}


async def test_a_stalled_peer_cannot_starve_other_streams(manager) -> None:
    """Slices sent to a peer that stopped reading stay pinned; one such
    stream may hold only its share of the arena, so others keep going."""
    stalled, stalled_peer = await zc_tcp_pair()
    healthy, healthy_peer = await zc_tcp_pair()
    arena = manager.arena
    payload = os.urandom(4 * arena.size)
    async with stalled, stalled_peer, healthy, healthy_peer:
        async with trio.open_nursery() as nursery:

            async def flood() -> None:
                with trio.move_on_after(30):
                    await stalled.send_all(payload)

            nursery.start_soon(flood)
            await trio.testing.wait_all_tasks_blocked(0.05)
            assert arena.free_count >= arena.n_slices - arena.n_slices // 4
            received = bytearray()
            nursery.start_soon(drain_into, healthy_peer, received)
            with trio.fail_after(20):
                await healthy.send_all(payload)
                await healthy.send_eof()
                while len(received) < len(payload):
                    await trio.sleep(0.01)
            assert received == payload
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("strategy", [s for s in runnable_strategies() if s != "socket"])
async def test_no_request_names_the_fd_after_aclose(manager) -> None:
    """aclose cancels a send part way; the send must not be continued on the
    fd number, which the next socket() may already have been given (the
    socket strategy makes no request: it sends through the socket object)."""
    left, right = await zc_tcp_pair()
    fix_buffers(left, right)
    after_close: list[tuple[object, tuple[object, ...]]] = []
    submit = manager.submit

    async def recording_submit(prep, *args, op=None):  # type: ignore[no-untyped-def]
        if left._closed and args and args[0] == left.fd:
            after_close.append((prep, args))
        return await submit(prep, *args, op=op)

    manager.submit = recording_submit  # type: ignore[method-assign]
    try:
        async with right:
            async with trio.open_nursery() as nursery:

                async def close_soon() -> None:
                    await trio.testing.wait_all_tasks_blocked(0.05)
                    await left.aclose()

                nursery.start_soon(close_soon)
                with pytest.raises(trio.ClosedResourceError):
                    for _ in range(100):
                        await left.send_all(b"x" * (1 << 20))
    finally:
        del manager.submit
    assert after_close == []


async def reset_by(peer: trio_uring.ZeroCopyStream) -> None:
    """The peer closes with SO_LINGER (1, 0), resetting the connection; the
    reset has arrived when this returns."""
    peer.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_LINGER, struct.pack("ii", 1, 0))
    await peer.aclose()
    await trio.sleep(0.05)


async def end_connection(
    how: str, stream: trio_uring.ZeroCopyStream, peer: trio_uring.ZeroCopyStream
) -> type[Exception]:
    """End ``stream``'s connection ``how``: "socket closed" (other code
    closed its socket) or "reset" (by ``peer``).  Returns the error the
    stream's calls then raise."""
    if how == "socket closed":
        stream.socket.close()
        return trio.ClosedResourceError
    await reset_by(peer)
    return trio.BrokenResourceError


async def fails_at_a_checkpoint(
    call: Callable[[], Awaitable[object]], error: type[BaseException]
) -> None:
    """``call()`` fails with ``error`` at a full checkpoint, and with
    Cancelled in a cancelled scope: its cancellation point comes before
    the failure is found, and such a call changes nothing."""
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await call()
    with trio.testing.assert_checkpoints():
        with pytest.raises(error):
            await call()


@pytest.mark.parametrize("receive", ["receive_some", "__anext__"])
@pytest.mark.parametrize("how", ["aclose", "socket closed", "reset"])
async def test_a_receive_that_fails_at_once_is_a_checkpoint(
    manager, how: str, receive: str
) -> None:
    """As trio's SocketStream, whose recv() raises only after a full
    checkpoint: on a closed stream, a socket other code closed, or a reset
    connection, receive_some and ``async for`` raise at a checkpoint, and
    a cancelled call raises Cancelled."""
    left, right = await zc_tcp_pair()
    if how == "aclose":
        await left.aclose()
        error: type[Exception] = trio.ClosedResourceError
    else:
        error = await end_connection(how, left, right)
    await fails_at_a_checkpoint(getattr(left, receive), error)
    await left.aclose()
    await right.aclose()


async def _reserve_a_byte(stream: trio_uring.ZeroCopyStream) -> None:
    async with stream.reserve(1) as view:
        view[:] = b"r"


#: The send-side calls, and what each raises at once on a stream that was
#: closed, that sent EOF, that broke, or whose socket other code closed.
SEND_CALLS = ["send_all", "registered", "reserve", "send_file", "send_eof", "wait"]


@pytest.mark.parametrize(
    ("how", "call"),
    [
        (how, call)
        for how in ("aclose", "send_eof", "broken", "socket closed")
        for call in SEND_CALLS
        # send_all on a socket other code closed: the next test.
        if (how, call) != ("socket closed", "send_all")
    ],
)
async def test_a_send_that_fails_at_once_is_a_checkpoint(
    manager, how: str, call: str, tmp_path
) -> None:
    """As trio's SocketStream, whose socket send() raises only after a full
    checkpoint: on a closed stream, after EOF, on a broken stream or a
    socket other code closed, the send-side calls raise at a checkpoint,
    and a cancelled call raises Cancelled.  After EOF, send_eof and
    wait_send_all_might_not_block return, at a checkpoint too."""
    left, right = await zc_tcp_pair()
    content = trio_uring.register(b"c")
    path = tmp_path / "file"
    path.write_bytes(b"f" * 10)
    calls = {
        "send_all": lambda: left.send_all(b"x"),
        "registered": lambda: left.send_all(content),
        "reserve": lambda: _reserve_a_byte(left),
        "send_file": lambda: left.send_file(path),
        "send_eof": left.send_eof,
        "wait": left.wait_send_all_might_not_block,
    }
    error: type[Exception] | None = trio.ClosedResourceError
    if how == "aclose":
        await left.aclose()
    elif how == "send_eof":
        await left.send_eof()
        if call in ("send_eof", "wait"):
            error = None
    elif how == "broken":
        left.fail(ConnectionResetError(errno.ECONNRESET, os.strerror(errno.ECONNRESET)))
        error = trio.BrokenResourceError
    else:
        left.socket.close()
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await calls[call]()
    with trio.testing.assert_checkpoints():
        if error is None:
            await calls[call]()
        else:
            with pytest.raises(error):
                await calls[call]()
    content.close()
    await trio.aclose_forcefully(left)
    await right.aclose()


@pytest.mark.parametrize("size", [1, DIRECT_SEND_MIN], ids=["small", "large"])
@pytest.mark.parametrize("how", ["socket closed", "reset"])
@pytest.mark.parametrize("strategy", SENDING_AT_ONCE)
async def test_a_send_all_whose_send_fails_at_once_is_a_checkpoint(
    manager, how: str, size: int
) -> None:
    """A strategy that sends inside send_all, with a plain send() (a lone
    small message, a large one from the caller's buffer): that send()
    failing at once (EBADF on a socket other code closed, a reset
    connection) raises at a checkpoint, as trio's socket send()."""
    left, right = await zc_tcp_pair()
    error = await end_connection(how, left, right)
    await fails_at_a_checkpoint(lambda: left.send_all(b"x" * size), error)
    await trio.aclose_forcefully(left)
    await right.aclose()


async def test_send_eof_to_a_reset_peer_is_a_checkpoint(manager) -> None:
    """Nothing queued, so nothing to wait for: shutdown() fails at once on a
    reset connection, and send_eof raises at a checkpoint all the same."""
    left, right = await zc_tcp_pair()
    await reset_by(right)
    await fails_at_a_checkpoint(left.send_eof, trio.BrokenResourceError)
    await trio.aclose_forcefully(left)


@pytest.mark.parametrize("how", ["socket closed", "reset"])
@pytest.mark.parametrize("strategy", QUEUEING)
async def test_a_send_all_past_the_share_on_a_dead_connection_is_a_checkpoint(
    manager, how: str
) -> None:
    """A message larger than the stream's share: send_all queues what fits
    and flushes it to make room, and that flush fails at once (a reset, a
    socket other code closed) without the call waiting for anything.  It
    raises at a checkpoint all the same."""
    left, right = await zc_tcp_pair()
    data = b"x" * (2 * left.queue.byte_limit)
    error = await end_connection(how, left, right)
    await fails_at_a_checkpoint(lambda: left.send_all(data), error)
    await trio.aclose_forcefully(left)
    await right.aclose()


async def test_content_behind_a_full_share_on_a_reset_connection_is_a_checkpoint(
    manager,
) -> None:
    """Registered content behind a share's worth of queued bytes (a send
    took part of them and the rest was requeued): the call flushes before
    it waits for the share, and that flush fails at once on a reset
    connection.  It raises at a checkpoint all the same."""
    left, right = await zc_tcp_pair()
    content = trio_uring.register(b"c")
    await reset_by(right)
    queue = left.queue
    assert queue.write(memoryview(b"q" * queue.byte_limit)) == queue.byte_limit
    await fails_at_a_checkpoint(lambda: left.send_all(content), trio.BrokenResourceError)
    content.close()
    await trio.aclose_forcefully(left)


@pytest.mark.parametrize("call", ["reserve", "registered"])
@pytest.mark.parametrize("strategy", ["socket"])
async def test_bytes_queued_outside_send_all_to_a_reset_peer_without_a_ring(
    manager, call: str
) -> None:
    """Without a ring, reserve() and registered content send what they
    queued at once; that send fails at once on a reset connection, and the
    call raises at a checkpoint all the same."""
    left, right = await zc_tcp_pair()
    content = trio_uring.register(b"c")
    await reset_by(right)
    calls = {"reserve": lambda: _reserve_a_byte(left), "registered": lambda: left.send_all(content)}
    await fails_at_a_checkpoint(calls[call], trio.BrokenResourceError)
    content.close()
    await trio.aclose_forcefully(left)


@pytest.mark.parametrize("how", ["closed", "broken"])
async def test_a_reserve_whose_stream_closed_or_broke_during_its_block_is_a_checkpoint(
    manager, how: str
) -> None:
    """Another task closed the stream, or the kernel failed bytes queued
    before, while the block ran (here without the block waiting): leaving
    the block raises, and the call was a full checkpoint all the same."""
    left, right = await zc_tcp_pair()
    error = trio.ClosedResourceError if how == "closed" else trio.BrokenResourceError
    with trio.testing.assert_checkpoints():
        with pytest.raises(error):
            async with left.reserve(1) as view:
                view[:] = b"r"
                if how == "closed":
                    left._close_now()  # what a forceful close from another task does
                else:
                    left.fail(ConnectionResetError(errno.ECONNRESET, os.strerror(errno.ECONNRESET)))
    await trio.aclose_forcefully(left)
    await right.aclose()


@pytest.mark.parametrize(
    "strategy",
    [s for s in SENDING_AT_ONCE if 0 < STRATEGY_IMPLS[s].direct_min < FLUSH_THRESHOLD],
)
async def test_a_direct_send_behind_a_send_in_flight_on_a_closed_socket_is_a_checkpoint(
    manager,
) -> None:
    """A strategy that queues small messages and sends large ones from the
    caller's buffer: a large one waits for the queued bytes first, and on a
    socket other code closed that fails at once.  send_all raises at a
    checkpoint all the same."""
    left, right = await zc_tcp_pair()
    fix_buffers(left, right)
    await clog(left)
    await left.send_all(b"q")  # queued: the socket is full
    await trio.testing.wait_all_tasks_blocked()
    assert left.in_flight is not None
    left.socket.close()
    data = bytearray(left.direct_min)  # not bytes: sent, not held by reference
    await fails_at_a_checkpoint(lambda: left.send_all(data), trio.ClosedResourceError)
    await trio.aclose_forcefully(left)
    await right.aclose()
