"""Stream pairs, the strategies this kernel runs, a failing kernel entry and
a close under a waiting call, shared by the tests."""

from __future__ import annotations

import errno
import os
import socket as stdlib_socket
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

import trio_uring
from trio_uring import _ring
from trio_uring._features import STRATEGIES, features


def runnable_strategies() -> list[str]:
    f = features()
    runnable = {
        "fixed-provided-bundle": f.fixed_provided_send_zc,
        "vectored-fixed": f.sendmsg_zc_fixed_vectored,
        "fixed-single": f.send_zc_fixed,
        "copy": f.io_uring,
        "socket": True,
    }
    return [s for s in STRATEGIES if runnable[s]]


async def tcp_pair() -> tuple[trio_uring.ZeroCopyStream, trio.SocketStream]:
    """A ZeroCopyStream connected to a plain trio SocketStream over loopback."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = trio.socket.socket()
    await client.connect(listener.getsockname())
    server, _ = await listener.accept()
    listener.close()
    return trio_uring.ZeroCopyStream(client), trio.SocketStream(server)


async def unix_pair() -> tuple[trio_uring.ZeroCopyStream, trio.SocketStream]:
    a, b = stdlib_socket.socketpair()
    return (
        trio_uring.ZeroCopyStream(trio.socket.from_stdlib_socket(a)),
        trio.SocketStream(trio.socket.from_stdlib_socket(b)),
    )


async def clog(stream: trio_uring.ZeroCopyStream) -> int:
    """Fill the socket's send buffer with ``b"x"`` so that even a 1-byte
    send must wait; return how many bytes that took.

    Loopback keeps draining the send queue until the peer's window closes,
    so fill until a pause frees nothing.  Fix both ends' buffer sizes
    first, or the peer's receive-buffer autotuning reopens the window.
    """
    filled, idle_rounds = 0, 0
    while idle_rounds < 2:
        written = 0
        for size in (65536, 4096, 1):
            try:
                while True:
                    written += os.write(stream.fd, b"x" * size)
            except BlockingIOError:
                pass
        filled += written
        idle_rounds = 0 if written else idle_rounds + 1
        await trio.sleep(0.02)
    return filled


async def zc_tcp_pair() -> tuple[trio_uring.ZeroCopyStream, trio_uring.ZeroCopyStream]:
    left, right = await tcp_pair()
    return left, trio_uring.ZeroCopyStream(right.socket)


def fix_buffers(*streams: trio_uring.ZeroCopyStream) -> None:
    """Fixed socket buffer sizes: no autotuning growing them behind our back."""
    for stream in streams:
        stream.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_SNDBUF, 16384)
        stream.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_RCVBUF, 16384)


async def sends_until_might_block(stream: trio_uring.ZeroCopyStream) -> int:
    """``send_all`` through the stream until ``wait_send_all_might_not_block``
    stalls: the outbound queue is full too, as a user's sender makes it.
    Returns how many bytes (``b"c"``) that sent."""
    sent = 0
    while True:
        returned = False

        async def wait() -> None:
            nonlocal returned
            await stream.wait_send_all_might_not_block()
            returned = True

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        if not returned:
            return sent
        await stream.send_all(b"c" * 16384)
        sent += 16384


def fail_the_next_enter(
    monkeypatch: pytest.MonkeyPatch, ring: _ring.Ring, method: str = "submit_and_reap"
) -> Callable[[], None]:
    """Make the ring's next ``method`` call (``submit_and_reap`` or
    ``submit``) fail as a refused ``io_uring_enter`` would, once, before it
    submits anything.  Returns the real method, which that failure puts
    back: ``getattr(ring, method) == real`` says the failure was met."""
    real = getattr(ring, method)

    def failing() -> None:
        monkeypatch.setattr(ring, method, real)
        raise OSError(errno.ENOMEM, "io_uring_enter failed (injected)")

    monkeypatch.setattr(ring, method, failing)
    return real


async def close_under_a_waiting_call(
    wait: Callable[[], Awaitable[object]], close: Callable[[], Awaitable[None]]
) -> None:
    """Run ``close`` once another task is blocked in ``wait``.  The waiting
    call must end with trio.ClosedResourceError, and all of it within 5 s:
    a close that leaves a waiter hanging fails rather than hangs the run."""

    async def waiting() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await wait()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiting)
            await trio.testing.wait_all_tasks_blocked()
            await close()
