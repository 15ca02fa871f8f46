"""The trio I/O manager: submission, completion, cancellation, lifetime."""

from __future__ import annotations

import gc
import socket
import subprocess
import sys
import threading
import weakref

import pytest
import trio
import trio.testing
from _streams import fail_the_next_enter, tcp_pair
from trio_uring._shim_cffi import ffi

import trio_uring
from trio_uring import _manager
from trio_uring._features import SETUP_FLAG_CANDIDATES
from trio_uring._manager import Multishot, current_manager
from trio_uring._prep import prep_accept, prep_nop, prep_recv

pytestmark = pytest.mark.skipif(
    not trio_uring.features().io_uring, reason="io_uring is not usable here"
)


def recv_args(sock: socket.socket, size: int = 64) -> tuple[object, int, int, int]:
    buf = ffi.new("char[]", size)
    return buf, sock.fileno(), int(ffi.cast("uintptr_t", buf)), size


async def stuck_receives(
    manager: trio_uring.IOManager, sock: socket.socket, nursery: trio.Nursery, n: int = 10
) -> None:
    """Start ``n`` tasks whose io_uring receives on ``sock`` wait for
    bytes that never come; return once they all wait."""

    async def stuck() -> None:
        _buf, *args = recv_args(sock)
        await manager.submit(prep_recv, *args)

    for _ in range(n):
        nursery.start_soon(stuck)
    await trio.testing.wait_all_tasks_blocked()


async def nops_from_many_tasks(manager: trio_uring.IOManager, tasks: int, each: int) -> None:
    """``tasks`` tasks submit ``each`` NOPs; every one must succeed."""
    results: list[int] = []

    async def worker() -> None:
        for _ in range(each):
            results.append(await manager.submit(prep_nop))

    async with trio.open_nursery() as nursery:
        for _ in range(tasks):
            nursery.start_soon(worker)
    assert results == [0] * (tasks * each)
    assert manager.ring is not None and manager.ring.table == {}


async def test_ten_thousand_nops_across_a_thousand_tasks() -> None:
    await nops_from_many_tasks(current_manager(), 1000, 10)


async def test_submit_is_a_checkpoint_even_when_completed_inline() -> None:
    manager = current_manager()
    with trio.testing.assert_checkpoints():
        await manager.submit(prep_nop)
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await manager.submit(prep_nop)
    assert manager.ring is not None and manager.ring.table == {}


async def test_cancelled_recv_resumes_with_cancelled_and_empties_the_table() -> None:
    manager = current_manager()
    a, b = socket.socketpair()
    with a, b:
        buf, *args = recv_args(a)
        with trio.move_on_after(0.05) as scope:
            await manager.submit(prep_recv, *args)
        assert scope.cancelled_caught
        assert manager.ring is not None and manager.ring.table == {}
        # The ring still works, and the socket's data was not eaten.
        b.send(b"after")
        assert await manager.submit(prep_recv, *args) == 5
        assert bytes(ffi.buffer(buf, 5)) == b"after"


async def test_cancel_racing_completion_returns_the_result() -> None:
    manager = current_manager()
    a, b = socket.socketpair()
    with a, b:
        buf, *args = recv_args(a)
        got: list[int] = []

        async def receiver(scope_box: list[trio.CancelScope]) -> None:
            with trio.CancelScope() as scope:
                scope_box.append(scope)
                got.append(await manager.submit(prep_recv, *args))

        box: list[trio.CancelScope] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver, box)
            await trio.testing.wait_all_tasks_blocked()
            # Data arrives and the cancel is requested in the same tick: either
            # the task sees the 4 bytes, or the bytes stay in the socket.
            b.send(b"race")
            box[0].cancel()
        if got:
            assert got == [4] and bytes(ffi.buffer(buf, 4)) == b"race"
        else:
            assert a.recv(4) == b"race"
        assert manager.ring is not None and manager.ring.table == {}


async def test_a_cancel_that_fails_to_enter_the_kernel_is_submitted_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """trio calls the abort callback of a cancelled wait from the scheduler
    (here, at a deadline), where an exception would crash the run.  Should
    entering the kernel with the ASYNC_CANCEL fail, the cancel stays staged
    and the socket check submits it again; the wait then ends as cancelled."""
    monkeypatch.setattr(_manager, "SOCKET_CHECK_INTERVAL", 0.05)
    manager = current_manager()
    ring = manager.ring
    assert ring is not None
    real = fail_the_next_enter(monkeypatch, ring, "submit")
    a, b = socket.socketpair()
    with a, b:
        _buf, *args = recv_args(a)
        with trio.fail_after(5):
            with trio.move_on_after(0.05) as scope:
                await manager.submit(prep_recv, *args)
        assert scope.cancelled_caught
        assert ring.submit == real  # the abort met the failure
        assert ring.table == {}


#: A run in which entering the kernel fails for good while a receive waits:
#: the receive is cancelled, its ASYNC_CANCEL cannot reach the kernel, the
#: socket check raises the error, and the run must end with it.
_REFUSING_KERNEL_RUN = """
import errno, socket, trio, trio_uring
from trio_uring import _manager

_manager.SOCKET_CHECK_INTERVAL = 0.05

def refused(*args):
    raise OSError(errno.ENOMEM, "io_uring_enter failed (injected)")

async def main():
    async with trio_uring.open_manager() as manager:
        a, b = socket.socketpair()
        stream = trio_uring.ZeroCopyStream(trio.socket.from_stdlib_socket(a))

        async def receive():
            with trio.move_on_after(0.1):
                await stream.receive_some(10)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            manager.ring.submit = manager.ring.submit_and_reap = refused

try:
    trio.run(main)
except BaseException as exc:
    print("ended with", repr(exc), exc.exceptions if hasattr(exc, "exceptions") else "")
"""


def test_a_run_whose_kernel_refuses_new_work_ends_with_the_error() -> None:
    """A wait whose cancel cannot enter the kernel waits for a CQE that will
    not come.  When the error persists and ends the manager, its shutdown
    ends those waits as cancelled: the run ends with the error instead of
    hanging (in a child process, so that a hang fails the test)."""
    proc = subprocess.run(
        [sys.executable, "-c", "import trio.testing\n" + _REFUSING_KERNEL_RUN],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "ended with ExceptionGroup" in proc.stdout, proc.stdout + proc.stderr
    assert "io_uring_enter failed (injected)" in proc.stdout
    assert "when the kernel refused new work at shutdown" in proc.stderr


@pytest.mark.parametrize("flags", SETUP_FLAG_CANDIDATES)
async def test_completions_wake_trio_under_every_setup_flag_set(flags: int) -> None:
    # A lost wake-up would hang here (bounded by fail_after).
    try:
        cm = trio_uring.open_manager(setup_flags=flags)
        manager = await cm.__aenter__()
    except trio_uring.RingSetupError:
        pytest.skip("this kernel rejects these setup flags")
    try:
        a, b = socket.socketpair()
        with a, b:
            _buf, *args = recv_args(a)

            async def later() -> None:
                await trio.sleep(0.05)
                b.send(b"wake")

            with trio.fail_after(5):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(later)
                    assert await manager.submit(prep_recv, *args) == 4
    finally:
        await cm.__aexit__(None, None, None)


async def test_multishot_accept_queues_results() -> None:
    manager = current_manager()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        accepted: list[int] = []
        ms = manager.start_multishot(
            prep_accept, listener.fileno(), 0, True, ms=Multishot(discard=accepted.append)
        )
        clients = [socket.create_connection(listener.getsockname()) for _ in range(3)]
        fds = [await manager.next_result(ms) for _ in range(3)]
        assert all(fd is not None and fd >= 0 for fd in fds)
        for fd in fds:
            socket.close(fd)  # type: ignore[arg-type]
        manager.close_multishot(ms)
        with trio.fail_after(5):
            while not ms.finished:
                await trio.sleep(0.01)
        assert manager.ring is not None and ms.user_data not in manager.ring.table
        for c in clients:
            c.close()


def test_run_ending_with_operations_in_flight_ends_cleanly() -> None:
    a, b = socket.socketpair()
    rings: list[object] = []

    async def main() -> None:
        manager = current_manager()
        rings.append(manager)
        async with trio.open_nursery() as nursery:
            await stuck_receives(manager, a, nursery)
            nursery.cancel_scope.cancel()

    with a, b:
        trio.run(main)
    manager = rings[0]
    assert manager.closed and manager.ring.closed and manager.ring.table == {}


class _TaskSteps(trio.abc.Instrument):
    """Counts the steps of the tasks with one name."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name == self.name:
            self.steps += 1


def test_socket_check_wakes_only_while_requests_are_in_flight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The socket check (``IOManager.check_sockets``) runs about once per
    ``SOCKET_CHECK_INTERVAL`` while requests wait, ``SOCKET_CHECK_BATCH`` of
    them per step (10 requests in batches of 4: three steps), and never
    while nothing is in flight: an idle run is not woken.  In virtual time
    (autojump)."""
    monkeypatch.setattr(_manager, "SOCKET_CHECK_BATCH", 4)
    steps = _TaskSteps("trio_uring socket check")
    interval = _manager.SOCKET_CHECK_INTERVAL
    counts: dict[str, int] = {}
    a, b = socket.socketpair()

    async def main() -> None:
        manager = current_manager()
        await trio.testing.wait_all_tasks_blocked()
        start = steps.steps
        await trio.sleep(100 * interval)
        counts["idle"] = steps.steps - start
        async with trio.open_nursery() as nursery:
            await stuck_receives(manager, a, nursery)
            start = steps.steps
            await trio.sleep(10 * interval)
            counts["waiting"] = steps.steps - start
            nursery.cancel_scope.cancel()

    with a, b:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0), instruments=[steps])
    assert counts["idle"] == 0
    assert 27 <= counts["waiting"] <= 34, counts  # 9 to 11 checks of 3 steps


def test_two_runs_in_two_threads_get_their_own_ring() -> None:
    fds: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    async def main() -> None:
        manager = current_manager()
        fds.append(manager.ring.fd)
        await trio.to_thread.run_sync(barrier.wait)
        for _ in range(1000):
            assert await manager.submit(prep_nop) == 0

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert len(fds) == 2
    # Both rings existed at once (the barrier), so their fds differ.
    assert fds[0] != fds[1]


async def test_open_manager_refuses_a_second_manager() -> None:
    async with trio_uring.open_manager() as manager:
        assert current_manager() is manager
        with pytest.raises(RuntimeError, match="already has a trio_uring I/O manager"):
            async with trio_uring.open_manager():
                pass  # pragma: no cover
    assert manager.closed


async def test_unknown_strategy_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown strategy"):
        async with trio_uring.open_manager(strategy="fast"):
            pass  # pragma: no cover


async def test_strategy_the_kernel_lacks_is_refused() -> None:
    if trio_uring.features().fixed_provided_send_zc:
        pytest.skip("this kernel has the fixed-provided send")
    with pytest.raises(ValueError, match="cannot run here"):
        async with trio_uring.open_manager(strategy="fixed-provided-bundle"):
            pass  # pragma: no cover


async def test_stats_count_enter_calls() -> None:
    manager = current_manager()
    before = manager.stats()["io_uring_enter_calls"]
    await manager.submit(prep_nop)
    assert manager.stats()["io_uring_enter_calls"] > before


async def test_stats_count_the_sends_of_live_closed_and_collected_streams() -> None:
    """A send updates its stream's counters only; the manager's totals add
    the live streams' counts to those of streams whose counters died."""
    manager = current_manager()
    before = manager.stats()
    (first, first_peer), (second, second_peer) = await tcp_pair(), await tcp_pair()
    await first.send_all(b"a" * 10)
    await second.send_all(b"b" * 20)
    await first.send_eof()
    await second.send_eof()
    assert await first_peer.receive_some(100) == b"a" * 10
    assert await second_peer.receive_some(100) == b"b" * 20
    await first.aclose()
    first_counters = weakref.ref(first.counters)
    dead_bytes = manager.dead_stream_counts.bytes
    del first
    gc.collect()
    assert first_counters() is None
    assert manager.dead_stream_counts.bytes == dead_bytes + 10  # folded in as they died
    after = manager.stats()
    assert after["bytes"] - before["bytes"] == 30
    assert after["sends"] - before["sends"] == 2
    assert second.stats().bytes_sent == 20
    await second.aclose()
    await first_peer.aclose()
    await second_peer.aclose()


async def test_streams_queued_in_one_tick_share_one_enter() -> None:
    """A hundred streams that each queue a message in the same tick are
    flushed together: a hundred send requests, one io_uring_enter."""
    async with trio_uring.open_manager(strategy="vectored-fixed") as manager:
        assert manager.ring is not None
        pairs = [await tcp_pair() for _ in range(100)]
        sent = trio.Event()
        ready = [0]

        async def send(stream: trio_uring.ZeroCopyStream) -> None:
            ready[0] += 1
            await sent.wait()
            await stream.send_all(b"x" * 100)

        async with trio.open_nursery() as nursery:
            for stream, _ in pairs:
                nursery.start_soon(send, stream)
            await trio.testing.wait_all_tasks_blocked()
            before = manager.stats()
            sent.set()
        after = manager.stats()
        assert after["sends"] - before["sends"] == 100
        assert after["io_uring_enter_calls"] - before["io_uring_enter_calls"] <= 2
        for stream, peer in pairs:
            assert await peer.receive_some(100) == b"x" * 100
            await stream.aclose()
            await peer.aclose()


async def test_refused_strategy_leaves_no_ring_behind() -> None:
    if trio_uring.features().fixed_provided_send_zc:
        pytest.skip("this kernel has the fixed-provided send")
    import os

    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with pytest.raises(ValueError, match="cannot run here"):
            async with trio_uring.open_manager(strategy="fixed-provided-bundle"):
                pass  # pragma: no cover
    assert len(os.listdir("/proc/self/fd")) == before


class _CountingLib:
    """The shim's ``lib``, recording the batch size of every ``tu_submit_staged``."""

    def __init__(self, real: object) -> None:
        self._real = real
        self.batches: list[int] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)

    def tu_submit_staged(self, *args: object) -> int:
        self.batches.append(args[2])  # type: ignore[arg-type]
        return self._real.tu_submit_staged(*args)  # type: ignore[attr-defined]


@pytest.mark.parametrize("streams", [1, 8, 40])
async def test_one_flush_of_k_streams_is_one_shim_call_and_one_enter(
    monkeypatch: pytest.MonkeyPatch, streams: int
) -> None:
    """Every stream's SQE is staged, then one shim call copies them into the
    SQ and enters the kernel once for all of them."""
    from trio_uring import _ring

    async with trio_uring.open_manager(strategy="vectored-fixed") as manager:
        ring = manager.ring
        assert ring is not None and streams <= ring.sq_entries
        pairs = [await tcp_pair() for _ in range(streams)]
        go = trio.Event()

        async def send(stream: trio_uring.ZeroCopyStream) -> None:
            await go.wait()
            await stream.send_all(b"y" * 100)

        counting = _CountingLib(_ring.lib)
        async with trio.open_nursery() as nursery:
            for stream, _ in pairs:
                nursery.start_soon(send, stream)
            await trio.testing.wait_all_tasks_blocked()
            monkeypatch.setattr(_ring, "lib", counting)
            enters = ring.enter_calls
            go.set()
        assert counting.batches == [streams]
        assert ring.enter_calls - enters == 1
        monkeypatch.undo()
        for stream, peer in pairs:
            assert await peer.receive_some(100) == b"y" * 100
            await stream.aclose()
            await peer.aclose()


async def test_requests_the_kernel_keeps_past_shutdown_keep_their_memory() -> None:
    """A request still in the table after the shutdown timeout keeps the
    arena and itself (with any caller bytes its segments hold) alive for
    the rest of the process, and shutdown says so."""
    held = b"bytes a request still reads" * 100

    class StuckRequest:
        """Stands for a request whose CQE never comes."""

        def __init__(self) -> None:
            self.segments = [[0, len(held), held]]

        def complete(self, res: int, flags: int) -> bool:
            return True

    manager = trio_uring.IOManager()  # no completion task: aclose alone reaps
    assert manager.ring is not None
    stuck = StuckRequest()
    manager.ring.table[2**62] = stuck  # type: ignore[assignment]
    with pytest.warns(RuntimeWarning, match="1 requests still held kernel references"):
        await manager.aclose(timeout=0.05)
    arena, requests = _manager._abandoned[-1]  # type: ignore[misc]
    assert arena is manager.arena and requests == [stuck]
    _manager._abandoned.pop()
