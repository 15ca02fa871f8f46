"""Issue 5, item 3: exhaustion.

An arena of 2 slices shared by 64 streams, a tiny submission queue, a
completion queue overflowed by a thousand completions at once, an
``RLIMIT_MEMLOCK`` too small for the arena (in a subprocess without
``CAP_IPC_LOCK``) and 10,000 concurrent connections through ``serve_tcp``
(``TRIO_URING_CONNECTIONS``, default 10000).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import pathlib
import resource
import shutil
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
    env_int,
    payload,
    rng,
    run_python,
    settle,
    stdlib_pair,
    stream_and_peer,
    stream_pair,
    vectored_fixed_with_a_successor,
)
from _streams import clog
from trio_uring._shim_cffi import lib

import trio_uring
from trio_uring import _abi

IO_URING = trio_uring.features().io_uring
needs_io_uring = pytest.mark.skipif(not IO_URING, reason="io_uring is unavailable here")


async def _transfer(pairs, sizes, seed: str) -> None:
    """Send ``sizes[i]`` checked bytes over each pair concurrently."""
    ok = []

    async def one(i: int, a, b) -> None:
        data = payload(i, sizes[i])
        got = bytearray()
        async with a, b, trio.open_nursery() as nursery:
            nursery.start_soon(drain, b, got)
            r = rng(seed, i)
            pos = 0
            while pos < len(data):
                n = r.choice((1, 1000, 16 * 1024, 50_000))
                await a.send_all(data[pos : pos + n])
                pos += n
            await a.send_eof()
        ok.append(hashlib.sha256(got).digest() == hashlib.sha256(data).digest())

    async with trio.open_nursery() as nursery:
        for i, (a, b) in enumerate(pairs):
            nursery.start_soon(one, i, a, b)
    assert ok == [True] * len(pairs)


async def test_two_slice_arena_under_64_streams() -> None:
    async with trio_uring.open_manager(arena_size=2 * 8192, slice_size=8192) as manager:
        assert manager.arena.n_slices == 2
        pairs = [stream_pair() for _ in range(64)]
        with trio.fail_after(60):
            await _transfer(pairs, [200_000] * 64, "two-slices")
        await settle(manager)
        assert_quiet(manager)


async def _other_sends_without_the_arena(
    manager: trio_uring.IOManager, tmp_path: pathlib.Path
) -> None:
    """With every slice taken: wait_send_all_might_not_block returns,
    reserve() hands out plain memory, and a small send_file goes past the
    arena; every byte arrives, in order."""
    body = payload(5, 20_000)
    path = tmp_path / "body"
    path.write_bytes(body)
    a, b = stream_pair()
    got = bytearray()

    def without_the_arena() -> int:
        return manager.stats()["arena_full_sends"]  # type: ignore[return-value]

    async with a, b, trio.open_nursery() as nursery:
        nursery.start_soon(drain, b, got)
        await a.wait_send_all_might_not_block()
        before = without_the_arena()
        async with a.reserve(1000) as view:
            view[:] = b"r" * 1000
        assert without_the_arena() == before + 1
        assert await a.send_file(path, 0, len(body)) == len(body)
        assert without_the_arena() == before + 2
        await a.send_all(b"end")
        await a.send_eof()
    assert bytes(got) == b"r" * 1000 + body + b"end"


@pytest.mark.parametrize("strategy", [s for s in available_strategies() if s != "socket"])
async def test_reserve_past_a_full_arena_cancelled_before_its_block_loses_nothing(
    strategy: str,
) -> None:
    """Every slice is taken and the socket is full: reserve() waits for the
    socket before it hands out plain memory, so a cancellation there runs no
    block, sends nothing and leaves the stream usable."""
    async with trio_uring.open_manager(strategy=strategy) as manager:
        free = manager.arena.free_slices
        taken = free[:]
        free.clear()
        try:
            a, b = stream_pair()
            async with a, b:
                for stream in (a, b):
                    stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
                    stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
                filled = await clog(a)
                ran = False
                with trio.move_on_after(0.2) as scope:
                    async with a.reserve(100) as view:
                        ran = True
                        view[:] = b"x" * 100
                assert scope.cancelled_caught and not ran
                got = bytearray()
                with trio.fail_after(10):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(drain, b, got)
                        await a.send_all(b"after")
                        await a.send_eof()
                assert bytes(got) == b"x" * filled + b"after"
        finally:
            free.extend(taken)


@pytest.mark.parametrize("strategy", [s for s in available_strategies() if s != "socket"])
async def test_peers_that_stop_reading_do_not_stall_other_streams(
    strategy: str, tmp_path: pathlib.Path
) -> None:
    """Four peers stop reading while their streams hold the whole arena
    (each its share, a quarter, pinned by a send the peer never takes).
    Another stream's send_all must not wait for those peers: it sends
    without the arena, from the caller's buffer, as a plain socket would,
    and its data arrives intact."""
    async with trio_uring.open_manager(
        arena_size=8 * 16384, slice_size=16384, strategy=strategy
    ) as manager:
        arena = manager.arena
        stalled = [stream_and_peer() for _ in range(4)]

        async def fill(stream: trio_uring.ZeroCopyStream) -> None:
            chunk = payload(9, 16384)
            while True:
                await stream.send_all(chunk)

        with trio.fail_after(30):
            async with trio.open_nursery() as stalls:
                for stream, _peer in stalled:
                    stalls.start_soon(fill, stream)
                while arena.free_count:
                    await trio.sleep(0.01)
                await trio.testing.wait_all_tasks_blocked(0.05)
                assert arena.free_count == 0
                a, b = stream_pair()
                await _transfer([(a, b)], [1 << 20], "beside-stalled-peers")
                assert manager.stats()["arena_full_sends"] > 0
                await _other_sends_without_the_arena(manager, tmp_path)
                assert arena.free_count == 0
                stalls.cancel_scope.cancel()
        for stream, peer in stalled:
            await trio.aclose_forcefully(stream)
            await peer.aclose()
        await settle(manager)
        assert_quiet(manager)


async def test_a_stream_that_sent_without_the_arena_moves_to_its_strategys_successor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A strategy that does not mix with plain send() calls names the one a
    stream moves to once it made them (``after_plain_sends``: the bundle
    strategy names fixed-single; the seed kernel's guest checks that case).
    Here vectored-fixed is given that successor for the test."""
    vectored_fixed_with_a_successor(monkeypatch)
    async with trio_uring.open_manager(strategy="vectored-fixed") as manager:
        free = manager.arena.free_slices
        taken = free[:]
        free.clear()
        a, b = stream_pair()
        got = bytearray()
        try:
            async with a, b, trio.open_nursery() as nursery:
                nursery.start_soon(drain, b, got)
                await a.send_all(b"p" * 1000)  # no slice free: plain send()
                assert a.strategy.name == "fixed-single"
                assert manager.stats()["arena_full_sends"] == 1
                free.extend(taken)
                taken = []
                await a.send_all(b"q" * 1000)  # queued, sent by the successor
                await a.send_eof()
        finally:
            free.extend(taken)
        assert bytes(got) == b"p" * 1000 + b"q" * 1000
        assert a.stats().strategy == "fixed-single"


@pytest.mark.parametrize("backlog", [False, True])
async def test_a_socket_holding_unsent_bytes_starts_on_its_strategys_successor(
    monkeypatch: pytest.MonkeyPatch, backlog: bool
) -> None:
    """Bytes written to a socket before it was wrapped, and still unsent
    (the peer's window is full), are plain socket data to the stream's
    first request: a strategy that does not mix with them is left at once.
    Bytes already sent are not in the way.  vectored-fixed is given the
    bundle strategy's successor for the test."""
    vectored_fixed_with_a_successor(monkeypatch)
    async with trio_uring.open_manager(strategy="vectored-fixed"):
        a, b = stdlib_pair()
        written = bytearray(b"p" * 100)
        a.sendall(written)
        assert b.recv(100, socket.MSG_PEEK | socket.MSG_WAITALL) == written
        if backlog:
            a.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while True:
                    written += b"p" * a.send(b"p" * 4096)
        stream = trio_uring.ZeroCopyStream(trio.socket.from_stdlib_socket(a))
        peer = trio_uring.ZeroCopyStream(trio.socket.from_stdlib_socket(b))
        assert stream.strategy.name == ("fixed-single" if backlog else "vectored-fixed")
        got = bytearray()
        async with stream, peer, trio.open_nursery() as nursery:
            nursery.start_soon(drain, peer, got)
            await stream.send_all(b"q" * 1000)
            await stream.send_eof()
        assert bytes(got) == written + b"q" * 1000


@needs_io_uring
async def test_submission_queue_full() -> None:
    """entries=2: every few requests the SQ is full and must be flushed."""
    async with trio_uring.open_manager(entries=2, arena_size=64 * 1024, slice_size=4096) as manager:
        assert manager.ring is not None and manager.ring.sq_entries == 2
        pairs = [stream_pair() for _ in range(32)]
        with trio.fail_after(60):
            await _transfer(pairs, [100_000] * 32, "sq-full")
        await settle(manager)
        assert_quiet(manager)


@needs_io_uring
async def test_completion_queue_overflow() -> None:
    """2000 receives in flight on a ring with an 8-entry CQ; the peers then
    write to all of them in one scheduler tick, so the kernel overflows the
    CQ.  Every completion must still reach its task."""
    n = env_int("TRIO_URING_CQ_OVERFLOW_OPS", 2000)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * n + 1000)), hard))
    overflowed = []
    try:
        async with trio_uring.open_manager(entries=4, arena_size=64 * 1024) as manager:
            ring = manager.ring
            assert ring is not None and ring.cq_entries == 8
            original = ring._kernel_has_more

            def spy() -> bool:
                if lib.tu_sq_flags(ring._ring) & _abi.IORING_SQ_CQ_OVERFLOW:
                    overflowed.append(True)
                return original()

            ring._kernel_has_more = spy  # type: ignore[method-assign]
            streams, peers = [], []
            for _ in range(n):
                a, b = stdlib_pair()
                streams.append(trio_uring.ZeroCopyStream(trio.socket.from_stdlib_socket(a)))
                peers.append(b)
            results: list[bytes] = [b""] * n

            async def receive(i: int) -> None:
                results[i] = await streams[i].receive_some(16)

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    for i in range(n):
                        nursery.start_soon(receive, i)
                    while len(ring.table) < n:
                        await trio.sleep(0.001)
                    for i, p in enumerate(peers):  # no checkpoint: one tick
                        p.send(i.to_bytes(4, "little"))
            assert results == [i.to_bytes(4, "little") for i in range(n)]
            for s in streams:
                await s.aclose()
            for p in peers:
                p.close()
            await settle(manager)
            assert_quiet(manager)
            await check_ring_usable()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert overflowed, "the CQ never overflowed; the test did not exercise the overflow path"


_MEMLOCK_PROGRAM = """
import resource, sys, trio, trio_uring
limit = 512 * 1024
resource.setrlimit(resource.RLIMIT_MEMLOCK, (limit, limit))

async def main():
    try:
        async with trio_uring.open_manager(arena_size=4 << 20):
            print("NO ERROR")
    except trio_uring.MemlockError as exc:
        print("MEMLOCK:", exc)
    # The documented fix works under the same limit: a smaller arena.
    async with trio_uring.open_manager(arena_size=128 * 1024, content_size=0) as m:
        a, b = trio.socket.socketpair()
        s1, s2 = trio_uring.ZeroCopyStream(a), trio_uring.ZeroCopyStream(b)
        await s1.send_all(b"small arena works")
        print("SMALL:", (await s2.receive_some()).decode(), m.strategy)

trio.run(main)
"""


@needs_io_uring
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is missing")
def test_memlock_too_small_gives_clear_error() -> None:
    """Without CAP_IPC_LOCK, registered buffers count against RLIMIT_MEMLOCK.
    Root has the capability, so the child drops it (setpriv) before lowering
    the limit; for a non-root user the limit applies as it is."""
    prefix = ["setpriv", "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock"]
    proc = run_python(_MEMLOCK_PROGRAM, prefix=prefix, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "NO ERROR" not in out, "a 4 MiB arena registered under a 512 KiB RLIMIT_MEMLOCK"
    line = next(x for x in out.splitlines() if x.startswith("MEMLOCK:"))
    assert "RLIMIT_MEMLOCK is 512 KiB" in line
    assert "ulimit -l" in line and "arena_size" in line
    assert "SMALL: small arena works" in out


_CLIENTS_PROGRAM = """
import sys, trio

async def main(port, n):
    clients = []
    limit = trio.Semaphore(512)  # connects in flight; every connection stays open

    async def client(i):
        async with limit:
            s = await trio.open_tcp_stream("127.0.0.1", port)
            await s.send_all(i.to_bytes(4, "little"))
            echo = b""
            while len(echo) < 4:
                echo += await s.receive_some(4 - len(echo))
            assert echo == i.to_bytes(4, "little"), (i, echo)
        clients.append(s)

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(client, i)
    print("connected", len(clients), flush=True)
    sys.stdin.readline()  # hold every connection until the server has counted

trio.run(main, int(sys.argv[1]), int(sys.argv[2]))
"""


def _raise_nofile(need: int) -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
        except (ValueError, OSError):
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need} and cannot be raised")
    else:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    return soft, hard


@pytest.mark.slow
async def test_ten_thousand_connections_through_serve_tcp() -> None:
    """The clients run in a child process (each side needs n fds); the
    server holds all n streams open at once before any is closed."""
    n = env_int("TRIO_URING_CONNECTIONS", 10_000)
    soft, hard = _raise_nofile(n + 1000)
    try:
        async with trio_uring.open_manager() as manager:
            all_in = trio.Event()
            handled = 0
            open_now = peak = 0

            async def handler(stream: trio_uring.ZeroCopyStream) -> None:
                nonlocal handled, open_now, peak
                open_now += 1
                peak = max(peak, open_now)
                try:
                    data = b""
                    while len(data) < 4:
                        data += await stream.receive_some(4 - len(data))
                    await stream.send_all(data)
                    handled += 1
                    await all_in.wait()
                finally:
                    open_now -= 1
                    await stream.aclose()

            with trio.fail_after(180):
                async with trio.open_nursery() as nursery:
                    serve = functools.partial(trio_uring.serve_tcp, host="127.0.0.1", backlog=4096)
                    (listener,) = await nursery.start(serve, handler, 0)
                    port = listener.socket.getsockname()[1]
                    proc = await trio.lowlevel.open_process(
                        [sys.executable, "-c", _CLIENTS_PROGRAM, str(port), str(n)],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        preexec_fn=lambda: resource.setrlimit(
                            resource.RLIMIT_NOFILE, (n + 1000, max(hard, n + 1000))
                        ),
                    )
                    line = b""
                    while not line.endswith(b"\n"):
                        chunk = await proc.stdout.receive_some(100)
                        assert chunk, "the client process died"
                        line += chunk
                    assert line.split() == [b"connected", str(n).encode()]
                    while handled < n:
                        await trio.sleep(0.01)
                    assert peak == n, f"only {peak} of {n} connections were open at once"
                    all_in.set()
                    await proc.stdin.send_all(b"close\n")
                    assert await proc.wait() == 0
                    while open_now:
                        await trio.sleep(0.01)
                    nursery.cancel_scope.cancel()
            await settle(manager)
            assert_quiet(manager)
        print(f"serve_tcp: {n} concurrent connections echoed, {peak} open at once")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
