"""A graceful close sends what was queued, and says when it could not.

``aclose`` and ``send_eof`` first send everything queued: messages whose
``send_all`` returned reach the peer whatever else happens on a send side
that did not break (a cancelled ``send_eof``, another task waiting for
room, a second close).  A failed submission breaks the stream rather than
escaping as a bare ``OSError``, and one the kernel refused for a moment is
submitted again.
"""

from __future__ import annotations

import contextlib
import errno

import pytest
import trio
import trio.testing
from _reliability_helpers import drain
from _streams import (
    clog,
    close_under_a_waiting_call,
    fail_the_next_enter,
    fix_buffers,
    runnable_strategies,
    sends_until_might_block,
    tcp_pair,
    zc_tcp_pair,
)

import trio_uring
from trio_uring import _ring

RING_STRATEGIES = [s for s in runnable_strategies() if s != "socket"]
ZERO_COPY_STRATEGIES = [s for s in RING_STRATEGIES if s != "copy"]

pytestmark = pytest.mark.skipif(not RING_STRATEGIES, reason="needs io_uring")


async def zc_pair() -> tuple[trio_uring.ZeroCopyStream, trio_uring.ZeroCopyStream]:
    """Two ZeroCopyStreams over loopback with small socket buffers, so that
    a peer that does not read stops the sender soon."""
    left, right = await zc_tcp_pair()
    fix_buffers(left, right)
    return left, right


@pytest.mark.parametrize("strategy", RING_STRATEGIES)
async def test_a_cancelled_send_eof_leaves_the_stream_as_it_was(strategy: str) -> None:
    async with trio_uring.open_manager(strategy=strategy):
        left, right = await zc_pair()
        clogged = await clog(left)
        await left.send_all(b"A" * 5000)
        with trio.move_on_after(0.2) as scope:
            await left.send_eof()
        assert scope.cancelled_caught
        await left.send_all(b"C" * 10)  # still usable: queued after A
        received = bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, right, received)
            with trio.fail_after(5):
                await left.aclose()
        await right.aclose()
        assert received == b"x" * clogged + b"A" * 5000 + b"C" * 10


@pytest.mark.parametrize("other", ["wait_send_all_might_not_block", "send_eof"])
@pytest.mark.parametrize("strategy", RING_STRATEGIES)
async def test_aclose_sends_the_queue_while_another_task_waits_on_the_send_side(
    strategy: str, other: str
) -> None:
    """Only a task inside send_all (an incomplete message) makes aclose drop
    the queue; these two calls queue nothing of their own."""
    async with trio_uring.open_manager(strategy=strategy):
        left, right = await zc_pair()
        clogged = await clog(left)
        queued = await sends_until_might_block(left)
        received = bytearray()
        async with trio.open_nursery() as nursery:

            async def waiter() -> None:
                # It may finish first (room, or EOF sent), or see the close.
                with contextlib.suppress(trio.ClosedResourceError):
                    await getattr(left, other)()

            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(drain, right, received)
            with trio.fail_after(10):
                await left.aclose()
        await right.aclose()
        assert received == b"x" * clogged + b"c" * queued


@pytest.mark.parametrize("forceful", [True, False], ids=["forceful", "graceful"])
@pytest.mark.parametrize("strategy", RING_STRATEGIES)
async def test_a_draining_aclose_returns_when_another_task_closes_the_stream(
    strategy: str, forceful: bool
) -> None:
    async with trio_uring.open_manager(strategy=strategy):
        left, right = await zc_pair()
        await clog(left)
        await left.send_all(b"q" * 5000)  # queued behind the full socket
        async with trio.open_nursery() as nursery:

            async def other_close() -> None:
                await trio.testing.wait_all_tasks_blocked()
                if forceful:
                    await trio.aclose_forcefully(left)
                else:
                    nursery.start_soon(drain, right)
                    await left.aclose()

            nursery.start_soon(other_close)
            with trio.fail_after(5):
                await left.aclose()
        await right.aclose()


class RefusingLib:
    """The shim's ``lib``, whose ``tu_submit_staged`` answers the first
    ``times`` non-empty batches with ``-refusal`` and copies none of their
    SQEs into the SQ, as entering a kernel that failed (ENOMEM) or was busy
    (EBUSY) would.  ``refusals`` counts the refusals still to come."""

    def __init__(self, real: object, refusal: int, times: int) -> None:
        self._real = real
        self._refusal = refusal
        self.refusals = times

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)

    def tu_submit_staged(self, ring: object, staged: object, count: int, *rest):
        if self.refusals and count:
            self.refusals -= 1
            rest[-1][0] = 0  # nothing copied into the SQ
            return -self._refusal
        return self._real.tu_submit_staged(ring, staged, count, *rest)


@pytest.mark.parametrize("strategy", ZERO_COPY_STRATEGIES)
async def test_a_failed_enter_in_send_alls_flush_breaks_the_stream(
    strategy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the tick's flush does with the error, a flush inside send_all
    does too: the stream breaks, and no bare OSError escapes."""
    async with trio_uring.open_manager(strategy=strategy) as manager:
        left, right = await zc_pair()
        fail_the_next_enter(monkeypatch, manager.ring)
        await left.send_all(b"x" * (300 * 1024))  # past the flush threshold
        with pytest.raises(trio.BrokenResourceError) as info:
            await left.send_all(b"y")
        assert info.value.__cause__.errno == errno.ENOMEM
        await trio.aclose_forcefully(left)
        await right.aclose()


@pytest.mark.parametrize("strategy", ZERO_COPY_STRATEGIES)
async def test_sqes_a_busy_kernel_refused_are_submitted_again(
    strategy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EBUSY from io_uring_enter leaves the tick's SQE staged; with nothing
    else to submit, the manager's once-a-second check hands it over."""
    async with trio_uring.open_manager(strategy=strategy):
        left, right = await tcp_pair()
        # Twice: submit_and_reap's attempt and submit()'s retry.
        busy = RefusingLib(_ring.lib, errno.EBUSY, times=2)
        monkeypatch.setattr(_ring, "lib", busy)
        await left.send_all(b"request")  # queued; the tick's flush meets EBUSY
        with trio.fail_after(5):
            assert await right.receive_some(100) == b"request"
        assert busy.refusals == 0
        await left.aclose()
        await right.aclose()


@pytest.mark.parametrize("strategy", ZERO_COPY_STRATEGIES)
async def test_a_failed_enter_at_the_tick_breaks_only_the_streams_it_carried(
    strategy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stream A's request went to the kernel in an earlier tick and waits
    for its full socket; in this tick A queues more and B its first bytes.
    Entering the kernel fails: only B's request was in that submission."""
    async with trio_uring.open_manager(strategy=strategy) as manager:
        a, a_peer = await zc_pair()
        b, b_peer = await zc_pair()
        await clog(a)
        await a.send_all(b"a" * 100_000)  # more than a full socket takes
        await trio.testing.wait_all_tasks_blocked()
        earlier = a.in_flight
        assert earlier is not None
        tick = manager.ticker.tick
        for stream, data in ((a, b"more"), (b, b"hello")):
            stream.queue.write(data)
            stream._queued(tick)
        ring = manager.ring
        fail_the_next_enter(monkeypatch, ring)
        await trio.lowlevel.cancel_shielded_checkpoint()  # the tick's flush
        assert ring.submit_and_reap.__name__ == "submit_and_reap"  # the failing enter ran
        with pytest.raises(trio.BrokenResourceError) as info:
            await b.send_all(b"x")
        assert info.value.__cause__.errno == errno.ENOMEM
        assert a._send_broken is None and a.in_flight is earlier
        for stream in (a, b, a_peer, b_peer):
            await trio.aclose_forcefully(stream)


@pytest.mark.parametrize("refusal", [errno.ENOMEM, errno.EBUSY], ids=["failed", "busy"])
@pytest.mark.parametrize("strategy", RING_STRATEGIES)
async def test_aclose_whose_cancel_the_kernel_did_not_take_still_closes(
    strategy: str, refusal: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aclose cancels the stream's requests by fd, then closes the socket.
    Entering the kernel with that cancel fails (ENOMEM) or is refused for a
    moment (EBUSY): the kernel would read it after the close, when the fd
    number names nothing.  The socket is closed all the same, no OSError
    escapes, and a receive waiting on it ends."""
    async with trio_uring.open_manager(strategy=strategy):
        left, right = await tcp_pair()
        refusing = RefusingLib(_ring.lib, refusal, times=1)

        async def close() -> None:
            monkeypatch.setattr(_ring, "lib", refusing)
            await left.aclose()
            assert refusing.refusals == 0
            assert left.socket.fileno() == -1

        await close_under_a_waiting_call(lambda: left.receive_some(10), close)
        await right.aclose()
