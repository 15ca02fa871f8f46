"""Issue 5, item 1: cancellation everywhere.

``send_all``, ``receive_some``, ``accept``, ``open_tcp_stream`` and ``aclose``
are cancelled at seeded random points (an already-cancelled scope, a sibling
cancelling after 0-30 scheduler ticks, a 0-3 ms deadline) against peers that
read fast, slowly, or not at all.  After each: no waiter left in the ring's
table, every slice back in the arena once notifications arrive, the stream in
its documented state, and the ring still moving intact data for other streams.

Iteration counts scale with ``TRIO_URING_CANCEL_ITERS`` (default 250 per
parametrisation, a few thousand cancelled operations in total).
"""

from __future__ import annotations

import hashlib

import pytest
import trio
from _reliability_helpers import (
    assert_quiet,
    available_strategies,
    check_ring_usable,
    drain,
    env_int,
    fd_count,
    foreign_entries,
    payload,
    plan_cancel,
    rng,
    settle,
    stream_and_peer,
    stream_pair,
)

import trio_uring

ITERS = env_int("TRIO_URING_CANCEL_ITERS", 250)
SIZES = (1, 100, 4096, 16 * 1024, 16 * 1024 + 1, 100_000, 300_000, 1 << 20)


async def _peer_reader(
    peer: trio.SocketStream, mode: str, got: bytearray, sender_done: trio.Event
) -> None:
    """Read like a fast, slow or stopped peer until the sender is done,
    then drain everything to EOF."""
    if mode == "stopped":
        await sender_done.wait()
    elif mode == "slow":
        while not sender_done.is_set():
            chunk = await peer.receive_some(1024)
            if not chunk:
                return
            got.extend(chunk)
            await trio.sleep(0.0005)
    await drain(peer, got)


@pytest.mark.parametrize("reader", ["fast", "slow", "stopped"])
async def test_cancel_send_all(reader: str) -> None:
    outcomes = {"cancelled": 0, "broken": 0, "completed": 0}
    async with trio_uring.open_manager(arena_size=256 * 1024, slice_size=16 * 1024) as manager:
        for i in range(ITERS):
            r = rng("send", reader, i)
            stream, peer = stream_and_peer()
            data = payload(i, r.choice(SIZES))
            got = bytearray()
            sender_done = trio.Event()
            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_peer_reader, peer, reader, got, sender_done)
                    with trio.CancelScope() as cs:
                        mode = plan_cancel(r, cs, nursery)
                        await stream.send_all(data)
                    sender_done.set()
                    where = f"iteration {i}, reader {reader}, cancel {mode}, {len(data)} bytes"
                    expected = data
                    if cs.cancelled_caught:
                        outcomes["cancelled"] += 1
                        # Documented: a send_all cancelled once it queued part
                        # of the data breaks the stream; one cancelled before
                        # it queued anything leaves it usable.
                        try:
                            await stream.send_all(b"more")
                        except trio.BrokenResourceError:
                            outcomes["broken"] += 1
                        else:
                            expected = b"more"
                        # Receiving works either way.
                        await peer.send_all(b"ping")
                        assert await stream.receive_some(4) == b"ping", where
                    else:
                        outcomes["completed"] += 1
                    await stream.aclose()
                    with pytest.raises(trio.ClosedResourceError):
                        await stream.send_all(b"x")
            await peer.aclose()
            if cs.cancelled_caught and expected is data:
                # A broken stream's bytes arrive as an intact prefix.
                assert bytes(got) == data[: len(got)], where
            else:
                assert len(got) == len(expected), where
                assert hashlib.sha256(got).digest() == hashlib.sha256(expected).digest(), where
            await settle(manager)
            assert_quiet(manager)
            if i % 25 == 0:
                await check_ring_usable(seed=i)
        await check_ring_usable(1 << 20, seed=-1)
    print(f"send_all vs {reader} reader: {outcomes}")
    assert outcomes["cancelled"] > ITERS // 10


async def test_cancel_receive_some_loses_nothing() -> None:
    """Cancelled receives never drop or reorder bytes: a receive that
    raced with its completion returns the data, one that was cancelled in
    the kernel consumed nothing."""
    rounds = max(4, ITERS // 10)
    cancelled = calls = 0
    async with trio_uring.open_manager() as manager:
        for k in range(rounds):
            r = rng("recv", k)
            stream, peer = stream_and_peer()
            sent = bytearray()
            got = bytearray()

            async def writer(r=r, peer=peer, sent=sent) -> None:
                for j in range(r.randrange(20, 60)):
                    chunk = payload(j, r.choice((1, 7, 1000, 5000, 70_000)))
                    await peer.send_all(chunk)
                    sent.extend(chunk)
                    await trio.sleep(r.choice((0, 0, 0.0002, 0.001)))
                await peer.send_eof()

            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(writer)
                    while True:
                        calls += 1
                        chunk = None
                        async with trio.open_nursery() as inner:
                            with trio.CancelScope() as cs:
                                plan_cancel(r, cs, inner)
                                chunk = await stream.receive_some(r.choice((1, 100, 65536)))
                            cancelled += cs.cancelled_caught
                            inner.cancel_scope.cancel()
                        if chunk is None:
                            continue
                        if not chunk:
                            break
                        got.extend(chunk)
            assert bytes(got) == bytes(sent), f"round {k}: received bytes differ from sent"
            await stream.aclose()
            await peer.aclose()
            await settle(manager)
            assert_quiet(manager)
        await check_ring_usable()
    print(f"receive_some: {calls} calls, {cancelled} cancelled")
    assert cancelled > calls // 10


async def test_cancel_accept_loses_no_connection() -> None:
    n_clients = max(50, ITERS)
    cancelled = 0
    async with trio_uring.open_manager() as manager:
        (listener,) = await trio_uring.open_tcp_listeners(0, host="127.0.0.1")
        port = listener.socket.getsockname()[1]
        clients: list[trio.SocketStream] = []

        async def connect_all() -> None:
            r = rng("accept-clients")
            for i in range(n_clients):
                s = await trio.open_tcp_stream("127.0.0.1", port)
                await s.send_all(i.to_bytes(4, "little"))
                clients.append(s)
                if r.random() < 0.3:
                    await trio.sleep(r.uniform(0, 0.002))

        seen: set[int] = set()
        r = rng("accept")
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(connect_all)
                while len(seen) < n_clients:
                    server = None
                    async with trio.open_nursery() as inner:
                        with trio.CancelScope() as cs:
                            plan_cancel(r, cs, inner)
                            server = await listener.accept()
                        cancelled += cs.cancelled_caught
                        inner.cancel_scope.cancel()
                    if server is None:
                        continue
                    ident = bytearray()
                    while len(ident) < 4:
                        ident += await server.receive_some(4 - len(ident))
                    seen.add(int.from_bytes(ident, "little"))
                    await server.aclose()
        assert seen == set(range(n_clients))
        for s in clients:
            await s.aclose()
        await listener.aclose()
        with trio.fail_after(10):
            while manager.ring is not None and manager.ring.table:
                await trio.sleep(0.001)
        assert_quiet(manager)
        await check_ring_usable()
    print(f"accept: {n_clients} connections, {cancelled} accepts cancelled")
    assert cancelled > 0


async def test_cancel_open_tcp_stream() -> None:
    iterations = ITERS * 2
    opened = cancelled = 0
    async with trio_uring.open_manager() as manager:
        (listener,) = await trio_uring.open_tcp_listeners(0, host="127.0.0.1")
        port = listener.socket.getsockname()[1]

        async def serve(task_status=trio.TASK_STATUS_IGNORED) -> None:
            task_status.started()
            async with trio.open_nursery() as handlers:
                while True:
                    s = await listener.accept()

                    async def handle(s=s) -> None:
                        async with s:
                            await drain(s)

                    handlers.start_soon(handle)

        base_fds = fd_count()
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(serve)
                for i in range(iterations):
                    r = rng("open", i)
                    stream = None
                    async with trio.open_nursery() as inner:
                        with trio.CancelScope() as cs:
                            plan_cancel(r, cs, inner)
                            stream = await trio_uring.open_tcp_stream("127.0.0.1", port)
                        inner.cancel_scope.cancel()
                    if stream is None:
                        cancelled += 1
                        continue
                    opened += 1
                    async with stream:
                        await stream.send_all(b"hello")
                # Every connection was closed by its client: the handlers end.
                with trio.fail_after(10):
                    while fd_count() > base_fds:
                        await trio.sleep(0.005)
                nursery.cancel_scope.cancel()
        await listener.aclose()
        await settle(manager)
        assert not manager.ring or not manager.ring.table or not foreign_entries(manager)
        assert_quiet(manager)
        await check_ring_usable()
    print(f"open_tcp_stream: {opened} opened, {cancelled} cancelled")
    assert cancelled > 0 and opened > 0


async def test_cancel_aclose_with_ops_in_flight() -> None:
    """aclose in a cancelled scope still closes; the tasks blocked in
    send_all and receive_some end with ClosedResourceError."""
    iterations = max(10, ITERS // 2)
    async with trio_uring.open_manager(arena_size=128 * 1024, slice_size=16 * 1024) as manager:
        for i in range(iterations):
            r = rng("aclose", i)
            stream, peer = stream_pair()
            results: dict[str, object] = {}

            async def sender(stream=stream, results=results) -> None:
                try:
                    while True:
                        await stream.send_all(payload(1, 200_000))
                except (trio.ClosedResourceError, trio.BrokenResourceError) as exc:
                    results["send"] = exc

            async def receiver(stream=stream, results=results) -> None:
                try:
                    while True:
                        await stream.receive_some()
                except (trio.ClosedResourceError, trio.BrokenResourceError) as exc:
                    results["recv"] = exc

            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(sender)
                    nursery.start_soon(receiver)
                    for _ in range(r.randrange(0, 40)):
                        await trio.sleep(0)
                    with trio.CancelScope() as cs:
                        if r.random() < 0.5:
                            cs.cancel()
                        await stream.aclose()
                    assert stream.socket.fileno() == -1
            assert isinstance(results["recv"], trio.ClosedResourceError), results
            assert isinstance(results["send"], (trio.ClosedResourceError,)), results
            with pytest.raises(trio.ClosedResourceError):
                await stream.receive_some()
            with pytest.raises(trio.ClosedResourceError):
                await stream.send_all(b"x")
            await stream.aclose()  # idempotent
            await peer.aclose()
            await settle(manager)
            assert_quiet(manager)
        await check_ring_usable()


@pytest.mark.parametrize("strategy", ["vectored-fixed", "fixed-single", "copy", "socket"])
async def test_regression_send_cancelled_before_submit_returns_slices(strategy: str) -> None:
    """Regression: a send_all cancelled at the checkpoint before its request
    reached the kernel kept its slices held forever (the zero-copy request
    object took a reference on creation that nothing dropped), so a few
    cancellations drained the arena and every later send_all hung."""
    if strategy not in available_strategies():
        pytest.skip(f"{strategy} cannot run on this kernel")
    async with trio_uring.open_manager(
        arena_size=64 * 1024, slice_size=16 * 1024, strategy=strategy
    ) as manager:
        for _ in range(8):
            stream, peer = stream_and_peer()
            with trio.CancelScope() as cs:
                cs.cancel()
                await stream.send_all(payload(0, 40_000))
            assert cs.cancelled_caught
            await stream.aclose()
            await peer.aclose()
        await settle(manager, timeout=5)
        assert_quiet(manager)
        await check_ring_usable()
