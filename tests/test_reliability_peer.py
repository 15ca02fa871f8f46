"""Issue 5, item 2: peer failures.

A reset (SO_LINGER 0) in the middle of a send and of a receive, a half-close,
a peer process killed with SIGKILL, and the socket closed under an in-flight
request by other code.  Each ends in ``BrokenResourceError`` (with the
``OSError`` as ``__cause__``) or ``ClosedResourceError`` within a bounded
time, and a bystander stream on the same ring keeps its data intact.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pathlib
import signal
import socket
import subprocess
import sys

import pytest
import trio
import trio.testing
from _reliability_helpers import (
    assert_quiet,
    available_strategies,
    check_ring_usable,
    drain,
    payload,
    rst_close,
    settle,
    stdlib_pair,
    stream_and_peer,
    trio_pair,
)

import trio_uring

RESET_ERRNOS = {errno.ECONNRESET, errno.EPIPE}
STRATEGIES = available_strategies()
#: Strategies whose send_all queues bytes ("socket" sends them at once).
QUEUEING_STRATEGIES = [s for s in STRATEGIES if s != "socket"]


async def _bystander(done: trio.Event, results: list[bool]) -> None:
    """A stream pair streaming a checked payload while the others fail."""
    a, b = trio_pair()
    sa, sb = trio_uring.ZeroCopyStream(a), trio_uring.ZeroCopyStream(b)
    data = payload(77, 3 << 20)
    got = bytearray()
    async with sa, sb, trio.open_nursery() as nursery:
        nursery.start_soon(drain, sb, got)
        for i in range(0, len(data), 100_000):
            await sa.send_all(data[i : i + 100_000])
            await trio.sleep(0)
        await sa.send_eof()
        await done.wait()
    results.append(hashlib.sha256(got).digest() == hashlib.sha256(data).digest())


def _assert_broken_by_reset(exc: BaseException) -> None:
    assert isinstance(exc, trio.BrokenResourceError), repr(exc)
    cause = exc.__cause__
    assert isinstance(cause, OSError), f"no OSError cause: {cause!r}"
    assert cause.errno in RESET_ERRNOS, cause


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_reset_mid_send(strategy: str) -> None:
    async with trio_uring.open_manager(
        arena_size=256 * 1024, slice_size=16 * 1024, strategy=strategy
    ) as manager:
        for i in range(10):
            client, server = stdlib_pair()
            stream = trio_uring.ZeroCopyStream(trio.socket.from_stdlib_socket(client))
            done = trio.Event()
            ok: list[bool] = []
            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_bystander, done, ok)

                    async def reset_later(i: int = i, server: socket.socket = server) -> None:
                        # Let the send fill the socket buffers, read a bit, reset.
                        await trio.sleep(0.002 * (i % 5))
                        server.setblocking(False)
                        try:
                            server.recv(1000 * i)
                        except BlockingIOError:
                            pass
                        rst_close(server)

                    nursery.start_soon(reset_later)
                    with pytest.raises(trio.BrokenResourceError) as info:
                        while True:
                            await stream.send_all(payload(i, 1 << 20))
                    _assert_broken_by_reset(info.value)
                    # The stream stays broken.  The kernel reports the reset
                    # once, so receiving then sees it or a plain end of stream.
                    with pytest.raises(trio.BrokenResourceError):
                        await stream.send_all(b"x")
                    try:
                        assert await stream.receive_some() == b""
                    except trio.BrokenResourceError:
                        pass
                    done.set()
            assert ok == [True]
            await stream.aclose()
        await settle(manager)
        assert_quiet(manager)
        await check_ring_usable()


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_reset_mid_receive(strategy: str) -> None:
    async with trio_uring.open_manager(strategy=strategy) as manager:
        for i in range(10):
            stream, peer = stream_and_peer()
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:

                    async def peer_side(i: int = i, peer: trio.SocketStream = peer) -> None:
                        await peer.send_all(b"a" * i)
                        await trio.sleep(0.001 * (i % 4))
                        rst_close(peer.socket)

                    nursery.start_soon(peer_side)
                    got = bytearray()
                    with pytest.raises(trio.BrokenResourceError) as info:
                        while True:
                            chunk = await stream.receive_some()
                            if not chunk:
                                pytest.fail("reset reported as a clean EOF")
                            got += chunk
                    assert bytes(got) == b"a" * len(got)
                    cause = info.value.__cause__
                    assert isinstance(cause, OSError) and cause.errno == errno.ECONNRESET
            await stream.aclose()
        await settle(manager)
        assert_quiet(manager)
        await check_ring_usable()


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_half_close_both_ways(strategy: str) -> None:
    async with trio_uring.open_manager(strategy=strategy) as manager:
        stream, peer = stream_and_peer()
        with trio.fail_after(10):
            # The peer half-closes: we read EOF (repeatedly) but can still send.
            await peer.send_all(b"request")
            await peer.send_eof()
            got = b""
            while len(got) < 7:
                got += await stream.receive_some()
            assert got == b"request"
            assert await stream.receive_some() == b""
            assert await stream.receive_some() == b""
            data = payload(3, 500_000)
            async with trio.open_nursery() as nursery:
                sink = bytearray()
                nursery.start_soon(drain, peer, sink)
                await stream.send_all(data)
                # We half-close: the peer reads EOF; sending is now an error.
                await stream.send_eof()
                await stream.send_eof()  # idempotent
            assert bytes(sink) == data
            with pytest.raises(trio.ClosedResourceError, match="EOF"):
                await stream.send_all(b"late")
        await stream.aclose()
        await peer.aclose()
        await settle(manager)
        assert_quiet(manager)


_PEER_PROGRAM = """
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"ready")
s.recv(10)  # read a little, then stop reading and wait to be killed
time.sleep(60)
"""


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_peer_process_killed_mid_send(strategy: str) -> None:
    async with trio_uring.open_manager(
        arena_size=256 * 1024, slice_size=16 * 1024, strategy=strategy
    ) as manager:
        (listener,) = await trio_uring.open_tcp_listeners(0, host="127.0.0.1")
        port = listener.socket.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-c", _PEER_PROGRAM, str(port)])
        try:
            with trio.fail_after(20):
                stream = await listener.accept()
                got = b""
                while len(got) < 5:
                    got += await stream.receive_some()
                assert got == b"ready"
                sent = 0
                broken: BaseException | None = None
                async with trio.open_nursery() as nursery:

                    async def kill_when_stuck() -> None:
                        # Kill once the send is under way and blocked: the peer
                        # stopped reading, so the sends wait for socket space or
                        # (zero copy) for slices still pinned in its queue.  The
                        # first send_all may itself be the one that blocks.
                        while manager.stats()["bytes"] == 0:
                            await trio.sleep(0.005)
                        await trio.testing.wait_all_tasks_blocked(0.1)
                        proc.send_signal(signal.SIGKILL)

                    nursery.start_soon(kill_when_stuck)
                    try:
                        while True:
                            await stream.send_all(payload(sent, 256 * 1024))
                            sent += 256 * 1024
                    except trio.BrokenResourceError as exc:
                        broken = exc
                    nursery.cancel_scope.cancel()
                assert broken is not None
                _assert_broken_by_reset(broken)
                await stream.aclose()
        finally:
            proc.kill()
            proc.wait()
        await listener.aclose()
        await settle(manager)
        assert_quiet(manager)
        await check_ring_usable()


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_socket_closed_by_other_code_while_idle_or_in_flow(strategy: str) -> None:
    """Other code closes the stream's socket between sends, and a new socket
    may get its fd number.  A lone message (sent at once through the socket
    object) fails with ClosedResourceError at once.  Bytes queued for the
    tick's flush, which names the fd number, are dropped there, also bytes
    queued before the socket was closed (a flow's): the next call raises
    ClosedResourceError saying so.  Nothing reaches the new socket, the
    stream is not left broken, and aclose() is clean once that was said."""
    async with trio_uring.open_manager(strategy=strategy) as manager:
        for in_flow in (False, True):
            stream, peer = stream_and_peer()
            fd = stream.fd
            await stream.send_all(b"first")
            assert await peer.receive_some(100) == b"first"
            if in_flow:
                await stream.send_all(b"a")
                await stream.send_all(b"b")  # the tick after the last: held
            # Every strategy but "socket" (no queue for send_all) holds b"b".
            queued = stream.queue.nbytes
            assert queued == (1 if in_flow and strategy != "socket" else 0)
            stream.socket.close()
            a, b = stdlib_pair()
            try:
                with trio.fail_after(5):
                    if queued:
                        await trio.sleep(0)  # the tick's flush finds the socket gone
                        with pytest.raises(trio.ClosedResourceError, match="1 bytes queued"):
                            await stream.send_all(b"must not reach the new socket")
                    elif stream.strategy.sends_at_once:
                        # A lone message goes through the socket object.
                        with pytest.raises(trio.ClosedResourceError, match="aclose"):
                            await stream.send_all(b"must not reach the new socket")
                    else:
                        # Queued, for the tick's flush, which drops it.
                        await stream.send_all(b"must not reach the new socket")
                        await trio.sleep(0)
                        with pytest.raises(trio.ClosedResourceError, match="29 bytes queued"):
                            await stream.send_all(b"must not reach the new socket")
                    with pytest.raises(trio.ClosedResourceError, match="aclose"):
                        await stream.send_all(b"must not reach the new socket")
                    with pytest.raises(trio.ClosedResourceError):
                        await stream.receive_some()
                    await stream.aclose()  # closed, not broken: no error
                for reused, partner in ((a, b), (b, a)):
                    if reused.fileno() == fd:
                        partner.setblocking(False)
                        with pytest.raises(BlockingIOError):
                            partner.recv(100)
            finally:
                a.close()
                b.close()
            await peer.aclose()
        await settle(manager)
        assert_quiet(manager)


@pytest.mark.parametrize("strategy", QUEUEING_STRATEGIES)
@pytest.mark.parametrize("flushed", [True, False], ids=["after the flush", "before it"])
async def test_queued_bytes_of_a_closed_socket_reported_by_aclose(
    strategy: str, flushed: bool
) -> None:
    """Bytes queued when other code closed the socket are dropped, by the
    tick's flush or by aclose() itself when it comes first; if no other call
    said so, aclose() does (BrokenResourceError)."""
    async with trio_uring.open_manager(strategy=strategy) as manager:
        stream, peer = stream_and_peer()
        await stream.send_all(b"first")
        await stream.send_all(b"second")  # the tick after the first: held
        assert stream.queue.nbytes == len(b"second")
        stream.socket.close()
        if flushed:
            await trio.sleep(0)
        with pytest.raises(trio.BrokenResourceError, match="6 bytes queued") as info:
            await stream.aclose()
        assert isinstance(info.value.__cause__, trio.ClosedResourceError)
        await peer.aclose()
        await settle(manager)
        assert_quiet(manager)


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_socket_closed_by_other_code_during_receive(strategy: str) -> None:
    """Other code closes the trio socket while a receive is in flight.

    The kernel keeps the file open while io_uring holds it, so the receive
    ends when the peer next acts; it must then end in ClosedResourceError,
    and the stream must never touch the fd number again (it may already
    name a new socket)."""
    async with trio_uring.open_manager(strategy=strategy) as manager:
        stream, peer = stream_and_peer()
        fd = stream.fd
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:

                async def other_code() -> None:
                    await trio.sleep(0.01)
                    stream.socket.close()
                    await trio.sleep(0.01)
                    await peer.aclose()

                nursery.start_soon(other_code)
                with pytest.raises(trio.ClosedResourceError):
                    await stream.receive_some()
        # A new socket now gets the same fd number: the stream must not use it.
        a, b = stdlib_pair()
        try:
            if fd not in (a.fileno(), b.fileno()):
                pytest.skip("the fd number was not reused")
            b.sendall(b"not for the closed stream") if a.fileno() == fd else a.sendall(b"x")
            with trio.fail_after(5):
                with pytest.raises(trio.ClosedResourceError):
                    await stream.receive_some()
                with pytest.raises(trio.ClosedResourceError):
                    await stream.send_all(b"must not reach the new socket")
        finally:
            a.close()
            b.close()
        await stream.aclose()
        await settle(manager)
        assert_quiet(manager)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("waiter", ["receive_some", "send_all", "send_file"])
@pytest.mark.parametrize("then", ["nothing", "aclose"])
async def test_socket_closed_by_other_code_under_a_task_waiting_on_a_silent_peer(
    strategy: str,
    waiter: str,
    then: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: pathlib.Path,
) -> None:
    """Other code closes the socket while a task waits on a peer that does
    nothing: a receive with nothing to receive, a send_all waiting for room
    (its messages queued) or a send_file spliced while the peer does not
    read.  The task's io_uring request holds
    the socket open, so the close alone ends nothing; the manager's socket
    check finds the closed socket, cancels the request, and the task raises
    ClosedResourceError.  With the request gone the close takes effect: the
    peer sees the connection end.  If the stream's aclose() follows the
    close, it ends the wait itself (the socket check is made too slow to
    matter here), cancelling the requests one by one, not by the stale fd."""
    if then == "aclose":
        monkeypatch.setattr(trio_uring._manager, "SOCKET_CHECK_INTERVAL", 3600.0)
    body = tmp_path / "body"
    body.write_bytes(payload(3, 16 << 20))
    async with trio_uring.open_manager(
        arena_size=128 * 1024, slice_size=16 * 1024, strategy=strategy
    ) as manager:
        stream, peer = stream_and_peer()
        closed = False

        async def other_code() -> None:
            nonlocal closed
            await trio.sleep(0.2)
            closed = True
            stream.socket.close()
            if then == "aclose":
                await trio.sleep(0.05)
                try:
                    await stream.aclose()
                except trio.BrokenResourceError as exc:
                    # Bytes were queued when the socket was closed; unless
                    # the waiting send_all said so first, aclose() does.
                    assert "were not sent" in str(exc)

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(other_code)
                # "socket" waits in trio's epoll, which says "another task
                # closed this fd"; the others say to use aclose(), or that
                # the stream was closed.
                with pytest.raises(trio.ClosedResourceError, match="closed"):
                    if waiter == "receive_some":
                        await stream.receive_some()
                    elif waiter == "send_all":
                        while True:  # under DIRECT_SEND_MIN: every message queued
                            await stream.send_all(payload(1, 16 * 1024))
                    else:
                        await stream.send_file(body)
            assert closed
            try:
                while await peer.receive_some(1 << 20):
                    pass
            except trio.BrokenResourceError:
                pass  # a reset: the kernel dropped bytes the peer had not read
        await stream.aclose()
        await peer.aclose()
        await settle(manager)
        assert_quiet(manager)
        await check_ring_usable()


@pytest.mark.parametrize("strategy", QUEUEING_STRATEGIES)
async def test_stream_broken_while_a_task_is_inside_reserve(strategy: str) -> None:
    """The peer resets while a task is inside a reserve() block, with a send
    in flight: the kernel fails it and the queue is cleared under the
    reserved tail.  Leaving the block raises BrokenResourceError and queues
    nothing, aclose() is clean, and every slice comes back."""
    async with trio_uring.open_manager(
        arena_size=64 * 16384, slice_size=16384, strategy=strategy
    ) as manager:
        stream, peer = stream_and_peer()
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        with trio.fail_after(10):
            while stream.in_flight is None:
                await stream.send_all(payload(1, 8000))
                await trio.sleep(0.01)
            with pytest.raises(trio.BrokenResourceError) as info:
                async with stream.reserve(100) as view:
                    view[:] = b"x" * 100
                    rst_close(peer.socket)
                    while stream.in_flight is not None:
                        await trio.sleep(0.01)
        _assert_broken_by_reset(info.value)
        assert stream.queue.reserved == -1 and not stream.queue.nbytes
        await stream.aclose()
        await peer.aclose()
        await settle(manager)
        assert_quiet(manager)


async def test_listener_socket_closed_by_other_code_during_accept() -> None:
    """A task waits in accept() when other code closes the listener's socket:
    the accept request holds it open, the manager's socket check cancels it,
    and accept() raises ClosedResourceError rather than waiting forever."""
    async with trio_uring.open_manager() as manager:
        (listener,) = await trio_uring.open_tcp_listeners(0, host="127.0.0.1")

        async def other_code() -> None:
            await trio.sleep(0.2)
            listener.socket.close()

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(other_code)
                with pytest.raises(trio.ClosedResourceError, match="aclose"):
                    await listener.accept()
        await listener.aclose()
        await settle(manager)
        assert_quiet(manager)


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_aclose_from_other_task_during_send(strategy: str) -> None:
    async with trio_uring.open_manager(
        arena_size=128 * 1024, slice_size=16 * 1024, strategy=strategy
    ) as manager:
        stream, peer = stream_and_peer()  # the peer never reads: send blocks
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:

                async def closer() -> None:
                    await trio.sleep(0.02)
                    await stream.aclose()

                nursery.start_soon(closer)
                with pytest.raises(trio.ClosedResourceError):
                    while True:
                        await stream.send_all(payload(0, 1 << 20))
        await peer.aclose()
        await settle(manager)
        assert_quiet(manager)
        await check_ring_usable()


def test_rst_close_helper_sends_reset() -> None:
    a, b = stdlib_pair()
    rst_close(b)
    a.settimeout(5)
    with pytest.raises(ConnectionResetError):
        a.recv(10)
    a.close()
    assert os.name == "posix"


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_reset_of_queued_bytes_surfaces_from_the_next_call(strategy: str) -> None:
    """send_all returns once bytes are queued; when the peer resets, the
    kernel's error for them is raised by a later send_all within 5 s, as
    BrokenResourceError with the OSError as its cause, never silently."""
    async with trio_uring.open_manager(strategy=strategy):
        client, server = stdlib_pair()
        stream = trio_uring.ZeroCopyStream(trio.socket.from_stdlib_socket(client))
        await stream.send_all(b"hello")
        rst_close(server)
        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError) as info:
            while True:
                await stream.send_all(b"x" * 1000)
                await trio.sleep(0.01)
        _assert_broken_by_reset(info.value)
        await stream.aclose()


CLOSES = [
    "graceful",
    "forceful",
    "after a send_all said so",
    "in a shielded finally",
    "leaving an async with that raised",
]


@pytest.mark.parametrize("close", CLOSES)
async def test_aclose_reports_a_failure_of_queued_bytes_once(close: str) -> None:
    """The kernel failed queued bytes (a failed send's completion calls
    ZeroCopyStream.fail) before any call could say so.  A graceful aclose()
    raises BrokenResourceError with the OSError as its cause, so the loss is
    never silent; a cancelled one (aclose_forcefully) was told to drop the
    queue and raises nothing; once a send_all raised it, aclose() is clean;
    and aclose() never replaces an exception already on its way out."""
    async with trio_uring.open_manager():
        stream, peer = stream_and_peer()
        await stream.send_all(b"hello")
        stream.fail(ConnectionResetError(errno.ECONNRESET, os.strerror(errno.ECONNRESET)))
        if close == "graceful":
            with pytest.raises(trio.BrokenResourceError, match="queued bytes") as info:
                await stream.aclose()
            _assert_broken_by_reset(info.value)
        elif close == "forceful":
            await trio.aclose_forcefully(stream)
        elif close == "after a send_all said so":
            with pytest.raises(trio.BrokenResourceError) as info:
                await stream.send_all(b"more")
            _assert_broken_by_reset(info.value)
            await stream.aclose()
        elif close == "in a shielded finally":
            with trio.CancelScope() as scope:
                try:
                    scope.cancel()
                    await trio.sleep_forever()
                finally:
                    with trio.CancelScope(shield=True):
                        await stream.aclose()
            assert scope.cancelled_caught  # Cancelled went on, and was caught
        else:
            with pytest.raises(KeyError):
                async with stream:
                    raise KeyError("the body's own error")
        with pytest.raises(trio.ClosedResourceError):
            await stream.send_all(b"closed either way")
        await stream.aclose()  # idempotent
        await peer.aclose()


@pytest.mark.parametrize("strategy", QUEUEING_STRATEGIES)
async def test_aclose_raises_for_bytes_queued_when_the_peer_reset(strategy: str) -> None:
    """The peer resets while bytes wait in the queue; the stream's next call
    is aclose(): its flush gets the kernel's error, and it raises it."""
    async with trio_uring.open_manager(strategy=strategy):
        client, server = stdlib_pair()
        stream = trio_uring.ZeroCopyStream(trio.socket.from_stdlib_socket(client))
        await stream.send_all(b"first")
        await stream.send_all(b"second")  # the tick after the first: held
        assert stream.queue.nbytes
        rst_close(server)
        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError) as info:
            await stream.aclose()
        _assert_broken_by_reset(info.value)
