"""serve_tcp, open_tcp_stream, listeners, and the strategy the seed kernel would use."""

from __future__ import annotations

import errno
import functools
import os
import socket as stdlib_socket
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import trio
import trio.testing
from _streams import close_under_a_waiting_call, fail_the_next_enter

import trio_uring

if sys.version_info < (3, 11):
    from exceptiongroup import ExceptionGroup


async def echo(stream: trio_uring.ZeroCopyStream) -> None:
    async with stream:
        async for data in stream:
            await stream.send_all(data)


async def test_serve_tcp_and_open_tcp_stream(strategy: str, manager) -> None:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio_uring.serve_tcp, echo, 0, host="127.0.0.1")
        )
        assert all(isinstance(lst, trio_uring.ZeroCopyListener) for lst in listeners)
        port = listeners[0].socket.getsockname()[1]

        async def client(i: int) -> None:
            stream = await trio_uring.open_tcp_stream("127.0.0.1", port)
            async with stream:
                message = f"hello {i} ".encode() * 1000
                await stream.send_all(message)
                got = b""
                while len(got) < len(message):
                    got += await stream.receive_some()
                assert got == message

        with trio.fail_after(30):
            async with trio.open_nursery() as clients:
                for i in range(50):
                    clients.start_soon(client, i)
        nursery.cancel_scope.cancel()


@pytest.mark.skipif(
    not hasattr(stdlib_socket, "TCP_NOTSENT_LOWAT"), reason="no TCP_NOTSENT_LOWAT here"
)
async def test_both_ends_leave_unsent_data_to_the_system_default(manager) -> None:
    # trio's SocketStream caps unsent data at 16 KiB; open_tcp_stream undoes
    # that, so both ends of a connection behave alike (0: the sysctl).
    lowat = (stdlib_socket.IPPROTO_TCP, stdlib_socket.TCP_NOTSENT_LOWAT)
    (listener,) = await trio_uring.open_tcp_listeners(0, host="127.0.0.1")
    async with listener:
        port = listener.socket.getsockname()[1]
        client = await trio_uring.open_tcp_stream("127.0.0.1", port)
        server = await listener.accept()
        async with client, server:
            assert client.getsockopt(*lowat) == 0
            assert server.getsockopt(*lowat) == 0
            trio_stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with trio_stream, await listener.accept():
                assert trio_stream.getsockopt(*lowat) == 16384  # what is undone


async def test_listener_accept_is_cancellable_and_closable(manager) -> None:
    (listener,) = await trio_uring.open_tcp_listeners(0, host="127.0.0.1")
    with trio.move_on_after(0.05) as scope:
        await listener.accept()
    assert scope.cancelled_caught
    # A connection made while nobody was accepting is still delivered.
    port = listener.socket.getsockname()[1]
    client = await trio_uring.open_tcp_stream("127.0.0.1", port)
    server = await listener.accept()
    async with client, server:
        await client.send_all(b"x")
        assert await server.receive_some(1) == b"x"
    await close_under_a_waiting_call(listener.accept, listener.aclose)
    with pytest.raises(trio.ClosedResourceError):
        await listener.accept()


async def test_listener_whose_cancel_fails_to_enter_the_kernel_still_closes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """aclose cancels the accept request, then closes the socket.  Should
    entering the kernel with that cancel fail, no OSError escapes and the
    socket is closed all the same; the socket check submits the cancel
    again, which ends the accept."""
    from trio_uring import _manager

    monkeypatch.setattr(_manager, "SOCKET_CHECK_INTERVAL", 0.05)
    async with trio_uring.open_manager() as manager:
        if manager.ring is None:
            pytest.skip("accept without a ring is trio's")
        (listener,) = await trio_uring.open_tcp_listeners(0, host="127.0.0.1")
        ring = manager.ring

        async def close() -> None:
            real = fail_the_next_enter(monkeypatch, ring, "submit")
            await listener.aclose()
            assert ring.submit == real  # the close met the failure
            assert listener.socket.fileno() == -1

        await close_under_a_waiting_call(listener.accept, close)


async def test_an_accept_that_fails_to_enter_the_kernel_leaves_no_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """accept starts a multishot ACCEPT.  Should entering the kernel with it
    fail, accept raises the OSError (trio.serve_listeners sleeps and retries
    on ENOMEM) and the request is cancelled: left staged, the next
    submission would start it, and it would take connections that nobody
    accepts or closes.  The next accept starts another and gets them."""
    from trio_uring import _manager

    async with trio_uring.open_manager() as manager:
        if manager.ring is None:
            pytest.skip("accept without a ring is trio's")
        (listener,) = await trio_uring.open_tcp_listeners(0, host="127.0.0.1")
        ring = manager.ring
        fail_the_next_enter(monkeypatch, ring, "submit")
        with pytest.raises(OSError) as info:
            await listener.accept()
        assert info.value.errno == errno.ENOMEM

        def accepts() -> list[object]:
            return [e for e in ring.table.values() if isinstance(e, _manager.Multishot)]

        with trio.fail_after(5):
            await trio.testing.wait_all_tasks_blocked()
        assert accepts() == []  # its last CQE was reaped
        client = await trio_uring.open_tcp_stream(*listener.socket.getsockname()[:2])
        with trio.fail_after(5):
            server = await listener.accept()
        async with client, server:
            await client.send_all(b"x")
            assert await server.receive_some(1) == b"x"
            assert accepts() == [listener._multishot]
        await listener.aclose()


async def test_an_accept_that_fails_at_once_is_a_checkpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """accept on a closed listener, or one whose request cannot start, is a
    full checkpoint, as trio's listeners: a pending cancellation comes
    before the error."""
    async with trio_uring.open_manager() as manager:
        (listener,) = await trio_uring.open_tcp_listeners(0, host="127.0.0.1")
        if manager.ring is not None:
            ring = manager.ring
            real = fail_the_next_enter(monkeypatch, ring, "submit")
            with trio.testing.assert_checkpoints(), pytest.raises(OSError):
                await listener.accept()
            fail_the_next_enter(monkeypatch, ring, "submit")
            with trio.CancelScope() as scope:
                scope.cancel()
                await listener.accept()  # raises Cancelled
            assert scope.cancelled_caught
            monkeypatch.setattr(ring, "submit", real)
        await listener.aclose()
        with trio.testing.assert_checkpoints(), pytest.raises(trio.ClosedResourceError):
            await listener.accept()
        with trio.CancelScope() as scope:
            scope.cancel()
            await listener.accept()
        assert scope.cancelled_caught


async def test_open_unix_stream(manager, tmp_path) -> None:
    path = str(tmp_path / "sock")
    listener_sock = trio.socket.socket(stdlib_socket.AF_UNIX)
    await listener_sock.bind(path)
    listener_sock.listen()
    listener = trio_uring.ZeroCopyListener(listener_sock)
    async with listener:
        client = await trio_uring.open_unix_stream(path)
        server = await listener.accept()
        async with client, server:
            await client.send_all(b"unix")
            assert await server.receive_some(10) == b"unix"
            assert client.stats().strategy in ("copy", "socket")


async def test_listener_rejects_sockets_that_do_not_listen(manager) -> None:
    sock = trio.socket.socket()
    with sock, pytest.raises(ValueError, match="listen"):
        trio_uring.ZeroCopyListener(sock)


def test_same_program_without_io_uring() -> None:
    """TRIO_URING_DISABLE=1: the socket strategy serves the same API."""
    program = textwrap.dedent(
        """
        import functools, trio, trio_uring

        async def echo(stream):
            async with stream:
                async for data in stream:
                    await stream.send_all(data)

        async def main():
            assert trio_uring.current_manager().ring is None
            async with trio.open_nursery() as nursery:
                (listener,) = await nursery.start(
                    functools.partial(trio_uring.serve_tcp, echo, 0, host="127.0.0.1"))
                port = listener.socket.getsockname()[1]
                stream = await trio_uring.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    await stream.send_all(b"ping" * 100000)
                    got = b""
                    while len(got) < 400000:
                        got += await stream.receive_some()
                    assert got == b"ping" * 100000
                    print(stream.stats().strategy)
                nursery.cancel_scope.cancel()

        trio.run(main)
        """
    )
    env = dict(os.environ, TRIO_URING_DISABLE="1")
    out = subprocess.run(
        [sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "socket"


def test_reuse_port_lets_processes_share_a_port(tmp_path) -> None:
    """Two processes, each its own trio run and ring, serve one port."""
    server = textwrap.dedent(
        """
        import os, sys, trio, trio_uring

        async def handler(stream):
            async with stream:
                await stream.send_all(str(os.getpid()).encode())

        async def main():
            async with trio.open_nursery() as nursery:
                await nursery.start(functools.partial(
                    trio_uring.serve_tcp, handler, int(sys.argv[1]), host="127.0.0.1",
                    reuse_port=True))
                print("ready", flush=True)
                await trio.sleep(20)
                nursery.cancel_scope.cancel()

        import functools
        trio.run(main)
        """
    )
    probe = stdlib_socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", server, str(port)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        pids = set()
        for _ in range(200):
            with stdlib_socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                pids.add(int(conn.recv(100)))
            if len(pids) == 2:
                break
        assert pids == {p.pid for p in procs}
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


async def test_reuse_port_listener_in_process(manager) -> None:
    (first,) = await trio_uring.open_tcp_listeners(0, host="127.0.0.1", reuse_port=True)
    port = first.socket.getsockname()[1]
    (second,) = await trio_uring.open_tcp_listeners(port, host="127.0.0.1", reuse_port=True)
    async with first, second:
        assert second.socket.getsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEPORT)
        client = await trio_uring.open_tcp_stream("127.0.0.1", port)
        async with client:
            with trio.fail_after(5):
                async with trio.open_nursery() as nursery:

                    async def take(listener: trio_uring.ZeroCopyListener) -> None:
                        async with await listener.accept():
                            nursery.cancel_scope.cancel()

                    nursery.start_soon(take, first)
                    nursery.start_soon(take, second)


def without_families(
    monkeypatch: pytest.MonkeyPatch, *families: int
) -> list[trio.socket.SocketType]:
    """Make trio.socket.socket() fail as on a system without ``families``
    (EAFNOSUPPORT); return the sockets it does make."""
    real = trio.socket.socket
    made: list[trio.socket.SocketType] = []

    def socket(family: int = stdlib_socket.AF_INET, *args: Any, **kwargs: Any) -> Any:
        if family in families:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        made.append(real(family, *args, **kwargs))
        return made[-1]

    monkeypatch.setattr(trio.socket, "socket", socket)
    return made


async def test_reuse_port_skips_a_family_the_system_has_no_sockets_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """host=None resolves to 0.0.0.0 and ::, also where IPv6 is off: as
    trio.open_tcp_listeners does, the family without sockets is skipped."""
    async with trio_uring.open_manager():
        without_families(monkeypatch, stdlib_socket.AF_INET6)
        listeners = await trio_uring.open_tcp_listeners(0, reuse_port=True)
        assert [lst.socket.family for lst in listeners] == [stdlib_socket.AF_INET]
        (listener,) = listeners
        async with listener:
            port = listener.socket.getsockname()[1]
            async with await trio_uring.open_tcp_stream("127.0.0.1", port) as client:
                async with await listener.accept() as server:
                    await client.send_all(b"hi")
                    assert await server.receive_some(2) == b"hi"


async def test_reuse_port_without_sockets_for_any_family_fails_like_trio(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with trio_uring.open_manager():
        without_families(monkeypatch, stdlib_socket.AF_INET, stdlib_socket.AF_INET6)
        with pytest.raises(OSError) as ours:
            await trio_uring.open_tcp_listeners(0, reuse_port=True)
        with pytest.raises(OSError) as theirs:
            await trio.open_tcp_listeners(0)
        assert ours.value.errno == theirs.value.errno == errno.EAFNOSUPPORT
        assert isinstance(ours.value.__cause__, ExceptionGroup)


async def test_reuse_port_closes_what_it_opened_when_a_later_family_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Any other error still fails the call, as in trio, and the sockets
    already open are closed, not leaked."""
    async with trio_uring.open_manager():
        made = without_families(monkeypatch)
        taken = stdlib_socket.socket(stdlib_socket.AF_INET6)
        taken.setsockopt(stdlib_socket.IPPROTO_IPV6, stdlib_socket.IPV6_V6ONLY, 1)
        taken.bind(("::", 0))
        taken.listen()
        with taken, pytest.raises(OSError) as info:
            # IPv4's port is free, IPv6's is taken (V6ONLY: they are separate).
            port = taken.getsockname()[1]
            await trio_uring.open_tcp_listeners(port, reuse_port=True)
        assert info.value.errno == errno.EADDRINUSE
        assert len(made) == 2 and all(sock.fileno() == -1 for sock in made)


async def test_two_tasks_accepting_at_once_is_busy(manager) -> None:
    (listener,) = await trio_uring.open_tcp_listeners(0, host="127.0.0.1")
    async with listener:
        with pytest.RaisesGroup(pytest.RaisesExc(trio.BusyResourceError, match="accepting")):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(listener.accept)
                nursery.start_soon(listener.accept)


async def test_arena_with_more_slices_than_a_ring_can_hold() -> None:
    """Up to 65536 slices are allowed; a stream's ring holds one batch."""
    async with trio_uring.open_manager(arena_size=40000 * 1024, slice_size=1024) as manager:
        assert manager.arena.n_slices > 32768
        (listener,) = await trio_uring.open_tcp_listeners(0, host="127.0.0.1")
        async with listener:
            client = await trio_uring.open_tcp_stream("127.0.0.1", listener.socket.getsockname()[1])
            server = await listener.accept()
            async with client, server:
                await client.send_all(b"q" * 5000)
                got = b""
                while len(got) < 5000:
                    got += await server.receive_some()
                assert got == b"q" * 5000


async def test_accept_without_a_ring_skips_one_connections_errors() -> None:
    """As trio.SocketListener does: an aborted connection (ECONNABORTED)
    costs that connection, not the listener's next accept."""
    async with trio_uring.open_manager(strategy="socket"):
        (listener,) = await trio_uring.open_tcp_listeners(0, host="127.0.0.1")
        real = listener.socket
        refused: list[bool] = []

        class AbortsOnce:
            def __getattr__(self, name: str) -> object:
                return getattr(real, name)

            async def accept(self) -> tuple[trio.socket.SocketType, object]:
                if not refused:
                    refused.append(True)
                    await trio.lowlevel.checkpoint()
                    raise ConnectionAbortedError(errno.ECONNABORTED, "aborted")
                return await real.accept()

        listener.socket = AbortsOnce()  # type: ignore[assignment]
        client = trio.socket.socket()
        await client.connect(real.getsockname())
        with trio.fail_after(5):
            stream = await listener.accept()
        assert refused
        listener.socket = real
        await stream.aclose()
        client.close()
        await listener.aclose()


async def test_a_connection_that_cannot_be_wrapped_is_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from trio_uring import _highlevel

    async with trio_uring.open_manager():
        (listener,) = await trio_uring.open_tcp_listeners(0, host="127.0.0.1")
        wrapped: list[trio.socket.SocketType] = []

        def refuse(sock: trio.socket.SocketType) -> None:
            wrapped.append(sock)
            raise trio_uring.ManagerClosedError("refused for the test")

        monkeypatch.setattr(_highlevel, "ZeroCopyStream", refuse)
        with pytest.raises(trio_uring.ManagerClosedError):
            await trio_uring.open_tcp_stream(*listener.socket.getsockname()[:2])
        assert wrapped[0].fileno() == -1  # closed, not leaked
        await listener.aclose()
