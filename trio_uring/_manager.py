"""The trio I/O manager: one io_uring per trio run.

trio's own I/O manager is private and not pluggable, so this one lives beside
it: a ``RunVar`` holds one ``IOManager`` per ``trio.run``, created lazily on
first use (or explicitly by ``open_manager``).  While requests are in
flight, a task waits on the ring's fd with ``trio.lowlevel.wait_readable``
and dispatches completions; while none are, it parks, so requests that
complete during submission cost trio's epoll nothing.

Every operation is awaited through ``IOManager.submit``, which follows the
model of trio's IOCP backend (``trio/_core/_io_windows.py``,
``wait_overlapped``):

* it is a full trio checkpoint, even when the kernel completed the request
  inline during submission (that case never parks the task);
* a cancelled wait submits ``IORING_OP_ASYNC_CANCEL`` and returns
  ``Abort.FAILED``: the task resumes only when the request's own CQE arrives,
  so memory the kernel may touch stays alive until the kernel lets go.  If the
  request finished anyway (the race), its real result is returned and the
  cancellation is delivered at the next checkpoint, so no data is lost.
"""

from __future__ import annotations

import contextlib
import errno
import warnings
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Iterable
from typing import Any, Protocol

import trio

from . import _abi
from ._buffers import MemlockError, RegisteredArena
from ._content import ContentAllocation, RegisteredContent
from ._features import STRATEGIES, Features, features
from ._prep import prep_cancel, prep_cancel_any, prep_cancel_fd
from ._ring import Ring, RingSetupError
from ._shim_cffi import ffi
from ._tickcore import Ticker
from ._util import byte_view

DEFAULT_ENTRIES = 256
#: 16 KiB: 256 slices in the default arena.  Measured with 100 streams of
#: 4 KiB sends: 64 KiB slices (64 of them) made streams queue for slices,
#: 31k msg/s; 16 KiB slices ran 51k msg/s.
DEFAULT_SLICE_SIZE = 16 * 1024
#: 4 MiB: half of the common 8 MiB RLIMIT_MEMLOCK, leaving room for others.
DEFAULT_ARENA_SIZE = 4 * 1024 * 1024
#: "Copied" zero-copy notifications in a row, between one local and one
#: peer address, after which streams between them stop using zero copy
#: (when the library chose the strategy), as the kernel's MSG_ZEROCOPY
#: documentation advises.
COPIED_SWITCH_THRESHOLD = 32
#: 2 MiB for registered content (``register``), after the slices in the same
#: registered buffer: with the default arena, 6 MiB of the common 8 MiB
#: RLIMIT_MEMLOCK.
DEFAULT_CONTENT_SIZE = 2 * 1024 * 1024
#: With ``sqpoll=True``: how long the kernel's submission thread spins
#: without work before it sleeps (and the next submission must wake it).
SQPOLL_IDLE_MS = 50
#: How long shutdown waits for outstanding notifications before giving up.
SHUTDOWN_TIMEOUT = 5.0
#: Queued bytes past which a stream is flushed at once rather than held for
#: more messages (see ``IOManager.flush_tick``).  Measured with the lean
#: loop: packing 64 4 KiB messages per send() ran 181k msg/s, 16 ran 161k.
FLUSH_THRESHOLD = 256 * 1024
#: Seconds between two checks for sockets that other code closed under
#: requests in flight (``IOManager.check_sockets``): how long a task
#: waiting on a silent peer can go on waiting after such a close.
SOCKET_CHECK_INTERVAL = 1.0
#: Requests checked between two checkpoints of that check: a server with
#: tens of thousands of requests in flight (about half a microsecond each)
#: is checked in steps of well under a millisecond, not in one long stall.
SOCKET_CHECK_BATCH = 1000

_reschedule = trio.lowlevel.reschedule

#: Arenas whose memory the kernel still referenced at shutdown, with the
#: requests that did (and through their segments any caller's ``bytes`` they
#: hold by reference).  Kept until the process exits rather than handed back
#: to the allocator.
_abandoned: list[object] = []


class SocketOwner(Protocol):
    """What a request's socket belongs to: a stream or a listener."""

    def socket_lost(self) -> bool:
        """True once other code closed the socket (its fd number is stale).

        Called by ``IOManager.check_sockets`` while a request of the owner
        is in flight; the owner forgets the socket and wakes its waiters,
        and the manager cancels the requests.
        """


class Operation:
    """A request awaited by one task: the first CQE carries its result.

    ``owner``: whose socket the request names, if anyone's, so that the
    manager's socket check can end the request once other code closed it.
    """

    __slots__ = ("owner", "raise_cancel", "res", "task")

    def __init__(self, owner: SocketOwner | None = None) -> None:
        self.owner = owner
        self.task: Any = None
        self.res: int | None = None
        self.raise_cancel: Callable[[], Any] | None = None

    def complete(self, res: int, flags: int) -> bool:
        self.res = res
        if self.task is not None:
            _reschedule(self.task)
            self.task = None
        return not flags & _abi.IORING_CQE_F_MORE


class SendCounters:
    """Counts of sends and notifications of one stream; see ``StreamStats``.

    A send updates its own stream's counters only.  The manager's totals
    are the sum of the counters of its live streams (``IOManager.stats``)
    and of ``totals``, into which a stream's counts are folded when its
    counters die: one object updated per send, not two.
    """

    __slots__ = (
        "__weakref__",
        "bytes",
        "consecutive_copied",
        "copied",
        "notifications",
        "sends",
        "totals",
    )

    def __init__(self, totals: SendCounters | None = None) -> None:
        self.sends = 0
        self.bytes = 0
        self.notifications = 0
        self.copied = 0
        self.consecutive_copied = 0
        self.totals = totals

    def sent(self, nbytes: int) -> None:
        self.sends += 1
        self.bytes += nbytes

    def notified(self, copied: bool) -> None:
        self.notifications += 1
        self.copied += copied
        self.consecutive_copied = self.consecutive_copied + 1 if copied else 0

    def add_to(self, other: SendCounters) -> None:
        """Add these counts to ``other``'s."""
        other.sends += self.sends
        other.bytes += self.bytes
        other.notifications += self.notifications
        other.copied += self.copied

    def __del__(self) -> None:
        if self.totals is not None:
            self.add_to(self.totals)


class Multishot:
    """A multishot request (accept): results are queued until taken.

    ``discard`` is called on results that arrive after ``close`` (for
    accept, the new fds, which must not leak).
    """

    __slots__ = ("closed", "discard", "finished", "owner", "results", "task", "user_data")

    def __init__(
        self, discard: Callable[[int], None] | None = None, owner: SocketOwner | None = None
    ) -> None:
        self.owner = owner
        self.results: deque[int] = deque()
        self.finished = False
        self.closed = False
        self.task: Any = None
        self.user_data = 0
        self.discard = discard

    def complete(self, res: int, flags: int) -> bool:
        last = not flags & _abi.IORING_CQE_F_MORE
        if last:
            self.finished = True
        if self.closed:
            if res >= 0 and self.discard is not None:
                self.discard(res)
        else:
            self.results.append(res)
        if self.task is not None:
            _reschedule(self.task)
            self.task = None
        return last


class IoUringUnavailableWarning(RuntimeWarning):
    """io_uring cannot be used here; trio_uring serves with trio sockets."""


_fallback_warned = False


def _warn_fallback_once(f: Features) -> None:
    """One warning per process when io_uring is missing, saying why."""
    global _fallback_warned
    if _fallback_warned:
        return
    _fallback_warned = True
    warnings.warn(
        f"trio_uring: io_uring is unavailable ({f.unavailable_reason}); streams use the "
        "'socket' strategy (trio socket sends, same API, no zero copy). "
        "Run `python -m trio_uring` for the full report.",
        IoUringUnavailableWarning,
        stacklevel=3,
    )


def _nothing() -> None:
    """Queued with ``run_sync_soon`` only to wake trio's I/O wait."""


class CopyingRoutes:
    """The routes (local address, peer address) on which the kernel copies
    zero-copy sends (loopback, veth, a NIC without scatter-gather), learnt
    from the notifications of every stream on them.

    The two addresses decide the route and so the egress device: once
    ``threshold`` notifications in a row on a route said "copied",
    whichever of its streams sent them, every stream on it may as well
    send plainly: those opened later start so, and those open switch at
    their next notification.  Counting per route rather than per stream
    makes a hundred streams that each send a little leave zero copy as
    soon as one stream that sends a lot; counting per local address alone
    would let a local client of a NIC address (which goes over loopback)
    take zero copy away from every remote peer of that address.
    """

    def __init__(self, threshold: int = COPIED_SWITCH_THRESHOLD) -> None:
        self.threshold = threshold
        self.routes: set[tuple[str, str]] = set()
        self._in_a_row: dict[tuple[str, str], int] = {}

    def __contains__(self, route: object) -> bool:
        return route in self.routes

    def note(self, route: tuple[str, str], copied: bool) -> bool:
        """Count one notification of a stream on ``route``; True when the
        route is copying (now or already)."""
        if route in self.routes:
            return True
        if not copied:
            self._in_a_row[route] = 0
            return False
        count = self._in_a_row.get(route, 0) + 1
        if count < self.threshold:
            self._in_a_row[route] = count
            return False
        self._in_a_row.pop(route, None)
        self.routes.add(route)
        return True


class _TickFlush(trio.abc.Instrument):
    """Ends each scheduler tick with the manager's ``Ticker``.

    ``before_io_wait`` is trio's public hook that runs exactly once per
    tick, after every runnable task has run and before trio waits for I/O:
    the one moment at which a tick's queued bytes are all known.
    """

    def __init__(self, manager: IOManager) -> None:
        # The C method itself, not a Python method that calls it: trio calls
        # the hook on every tick, once per message in a producer's flow, and
        # a Python frame there is a measurable share of a small send_all.
        self.before_io_wait = manager.ticker.before_io_wait


class ManagerClosedError(trio.ClosedResourceError):
    """The I/O manager of this run has shut down."""


class IOManager:
    """Owns the ring, the registered arena and the send strategy of one run.

    Create one with ``open_manager`` to choose its sizes, or let the first
    stream create a default one.  ``strategy`` forces a send strategy (for
    tests and benchmarks); by default the best one ``features()`` found.
    """

    def __init__(
        self,
        *,
        entries: int = DEFAULT_ENTRIES,
        arena_size: int = DEFAULT_ARENA_SIZE,
        slice_size: int = DEFAULT_SLICE_SIZE,
        strategy: str | None = None,
        setup_flags: int | None = None,
        sqpoll: bool = False,
        content_size: int = DEFAULT_CONTENT_SIZE,
    ) -> None:
        self.features: Features = features()
        if strategy is not None and strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
        self.strategy = strategy if strategy is not None else self.features.strategy
        #: True when the library chose the strategy and may adapt it per stream.
        self.adaptive = strategy is None
        #: Routes whose streams the kernel kept copying.
        self.copying = CopyingRoutes()
        # Refuse a strategy this kernel lacks before any ring or memory exists.
        self._check_strategy()
        self.arena = RegisteredArena(arena_size, slice_size, content_size=content_size)
        self.ring: Ring | None = None
        if not self.features.io_uring and strategy is None:
            _warn_fallback_once(self.features)
        if self.features.io_uring and strategy != "socket":
            flags = self.features.setup_flags if setup_flags is None else setup_flags
            idle = 0
            if sqpoll:
                # The kernel refuses COOP_TASKRUN (and so TASKRUN_FLAG) and
                # DEFER_TASKRUN with SQPOLL: its thread runs the task work.
                flags &= ~(
                    _abi.IORING_SETUP_DEFER_TASKRUN
                    | _abi.IORING_SETUP_COOP_TASKRUN
                    | _abi.IORING_SETUP_TASKRUN_FLAG
                )
                flags |= _abi.IORING_SETUP_SQPOLL
                idle = SQPOLL_IDLE_MS
            try:
                self.ring = Ring(entries, flags=flags, sq_thread_idle=idle)
            except RingSetupError as exc:
                if not sqpoll:
                    raise
                raise RingSetupError(
                    exc.errno,
                    f"io_uring_setup with SQPOLL failed ({exc.strerror}); this kernel or "
                    "process may not allow a submission thread: open the manager without "
                    "sqpoll=True",
                ) from exc
            try:
                self._register_arena()
            except BaseException:
                self.ring.close()
                raise
        #: The counts of streams whose counters died; ``stats`` adds the live ones.
        self.dead_stream_counts = SendCounters()
        self._stream_counters: weakref.WeakSet[SendCounters] = weakref.WeakSet()
        self.closed = False
        self._free_bgids = deque(range(1, 1 << 16))
        self._registered_bgids: set[int] = set()
        #: The scheduler tick's number (``ticker.tick``) and the streams with
        #: queued bytes to flush at the end of a tick (``ticker.pending``).
        self.ticker = Ticker(self.flush_tick)
        #: Stream send requests whose result CQE has not arrived.
        self.sends_in_flight = 0
        #: Sends that found every free slice taken by other streams and went
        #: without the arena (``ZeroCopyStream._going_without_the_arena``).
        self.arena_full_sends = 0
        #: Set when a completion or flush made a task runnable.
        self.woke_tasks = False
        self._instrument: _TickFlush | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._completer: Any = None
        self._completer_parked = False
        self._watcher: Any = None
        self._watcher_parked = False

    def _check_strategy(self) -> None:
        f = self.features
        needs = {
            "fixed-provided-bundle": (
                f.fixed_provided_send_zc,
                f"SEND_ZC from fixed-provided buffers is {f.fixed_provided_detail}",
            ),
            "vectored-fixed": (
                f.sendmsg_zc_fixed_vectored,
                "this kernel lacks SENDMSG_ZC with fixed buffers",
            ),
            "fixed-single": (f.send_zc_fixed, "this kernel lacks SEND_ZC with fixed buffers"),
            "copy": (f.io_uring, "io_uring is unavailable"),
            "socket": (True, ""),
        }
        ok, why = needs[self.strategy]
        if not ok:
            reason = f.unavailable_reason or why
            raise ValueError(
                f"send strategy {self.strategy!r} cannot run here: {reason}; leave strategy "
                f"unset to use the best one available ({f.strategy!r})"
            )

    def _register_arena(self) -> None:
        assert self.ring is not None
        arena = self.arena
        iov = ffi.new(
            "struct tu_iovec *", {"iov_base": arena.cdata, "iov_len": arena.registered_size}
        )
        rc = self.ring.register(_abi.IORING_REGISTER_BUFFERS, iov, 1)
        if rc == 0:
            return
        err = -rc
        if err in (errno.ENOMEM, errno.EPERM, errno.EFAULT):
            import resource

            soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
            limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft // 1024} KiB"
            raise MemlockError(
                err,
                f"registering the {arena.registered_size // 1024} KiB send arena failed "
                f"({errno.errorcode.get(err, err)}): RLIMIT_MEMLOCK is {limit}. Raise the "
                "limit (ulimit -l, LimitMEMLOCK= in a systemd unit, --ulimit memlock for "
                "containers) or pass a smaller arena_size (or content_size) to "
                "trio_uring.open_manager()",
            )
        raise OSError(err, f"registering the send arena failed: {errno.errorcode.get(err, err)}")

    # -- the one primitive -------------------------------------------------

    def _require_ring(self) -> Ring:
        if self.closed:
            raise ManagerClosedError("the trio_uring I/O manager for this run has shut down")
        assert self.ring is not None, "io_uring operation under the socket strategy"
        return self.ring

    async def submit(
        self, prep: Callable[..., int], *args: Any, op: Operation | None = None
    ) -> int:
        """Prepare one request with ``prep(ring, op, *args)``, submit it and
        return its result (``res`` of its CQE: a count, or ``-errno``).

        A checkpoint.  On cancellation the request is cancelled in the kernel
        and this returns only once the kernel is done with it; if it
        completed anyway its result is returned (and the cancellation comes
        at the next checkpoint), else ``Cancelled`` is raised.
        """
        try:
            ring = self._require_ring()
            await trio.lowlevel.checkpoint_if_cancelled()
        except BaseException:
            if op is not None:
                # The request never reached the kernel and no CQE will come:
                # end it here, so a zero-copy send drops its slice reference.
                op.complete(-errno.ECANCELED, 0)
            raise
        if op is None:
            op = Operation()
        try:
            user_data = prep(ring, op, *args)
        except BaseException:
            op.complete(-errno.ECANCELED, 0)  # never reached the kernel
            raise
        # If entering the kernel fails, the request stays in the table:
        # should the kernel take it later, its CQE still ends it.
        self.submit_prepared()
        if op.res is not None:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return op.res
        op.task = trio.lowlevel.current_task()

        def abort(raise_cancel: Callable[[], Any]) -> trio.lowlevel.Abort:
            op.raise_cancel = raise_cancel
            if not ring.closed:
                prep_cancel(ring, user_data)
                # trio calls this from inside its scheduler, where an
                # exception would crash the run.  Should entering the kernel
                # fail, the cancel stays staged: the socket check
                # (``_watch_sockets``) submits it again, and raises there an
                # error that persists.
                with contextlib.suppress(OSError):
                    ring.submit()
            return trio.lowlevel.Abort.FAILED

        await trio.lowlevel.wait_task_rescheduled(abort)
        res = op.res
        assert res is not None
        if res == -errno.ECANCELED and op.raise_cancel is not None:
            op.raise_cancel()
        return res

    def start_multishot(self, prep: Callable[..., int], *args: Any, ms: Multishot) -> Multishot:
        """Start the multishot request ``prep(ring, ms, *args)``; return ``ms``.

        Should entering the kernel fail, the OSError is raised and ``ms``
        closed: the request stays staged and in the table, and the next
        submission would start it with nobody to take its results (for
        accept, connections whose fds would leak).  Its cancel, staged after
        it, ends it, and ``ms.discard`` closes what it took meanwhile."""
        ring = self._require_ring()
        ms.user_data = prep(ring, ms, *args)
        try:
            ring.submit()
        except OSError:
            self.close_multishot(ms)
            raise
        finally:
            # Even after a failure: the completion task reaps the request's
            # last CQE, and the socket check submits what is still staged.
            self._wake_completer()
        return ms

    async def next_result(self, ms: Multishot) -> int | None:
        """The next result of ``ms``; None once the request has ended.

        A checkpoint.  Cancelling the wait leaves the request running: its
        results stay queued for the next call.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if not ms.results and not ms.finished:
            ring = self._require_ring()
            if ring.cq_ready:
                ring.reap()
        if ms.results or ms.finished:
            await trio.lowlevel.cancel_shielded_checkpoint()
        else:
            ms.task = trio.lowlevel.current_task()

            def abort(_: object) -> trio.lowlevel.Abort:
                ms.task = None
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
        return ms.results.popleft() if ms.results else None

    def close_multishot(self, ms: Multishot) -> None:
        """Stop ``ms``; results queued or still to come go to ``ms.discard``.

        No error: the caller closes the socket next whatever happens here.
        Should entering the kernel fail, the cancel (by ``user_data``, so
        still right once the socket is closed) stays staged for the next
        submission, which reports an error that persists."""
        ms.closed = True
        while ms.results:
            res = ms.results.popleft()
            if res >= 0 and ms.discard is not None:
                ms.discard(res)
        if not ms.finished and self.ring is not None and not self.ring.closed:
            prep_cancel(self.ring, ms.user_data)
            with contextlib.suppress(OSError):
                self.ring.submit()

    def cancel_fd(self, fd: int, owner: SocketOwner) -> None:
        """Cancel every request on ``fd``, whose owner ``owner`` closes it
        next (``aclose``); no wait, and no error: the owner closes the
        socket whatever happens here.

        With SQPOLL the kernel's thread may read the cancel only once the fd
        is closed, when its number names nothing (or another socket) and the
        requests would wait on: there they are cancelled one by one, by
        ``user_data``.  So they are too when the cancel is still staged after
        entering the kernel (the enter failed, or the kernel refused new
        work for a moment), to be read after the close as well; the next
        submission reports an error that persists."""
        ring = self.ring
        if ring is None or ring.closed or self.closed:
            return
        if ring.sqpoll:
            self.cancel_requests_of({owner})
            return
        prep_cancel_fd(ring, fd)
        with contextlib.suppress(OSError):
            ring.submit()
        if ring.sq_pending:
            self.cancel_requests_of({owner})

    # -- provided-buffer groups ---------------------------------------------

    def register_buf_ring(self, address: int, entries: int) -> int:
        """Register a provided-buffer ring; return its new buffer group id."""
        ring = self._require_ring()
        if not self._free_bgids:
            raise RuntimeError("all 65535 provided-buffer groups are in use; close some streams")
        bgid = self._free_bgids.popleft()
        reg = ffi.new(
            "struct io_uring_buf_reg *",
            {"ring_addr": address, "ring_entries": entries, "bgid": bgid},
        )
        rc = ring.register(_abi.IORING_REGISTER_PBUF_RING, reg, 1)
        if rc < 0:
            self._free_bgids.appendleft(bgid)
            raise OSError(-rc, f"registering a provided-buffer ring failed: errno {-rc}")
        self._registered_bgids.add(bgid)
        return bgid

    def unregister_buf_ring(self, bgid: int) -> None:
        if bgid not in self._registered_bgids:
            return
        self._registered_bgids.discard(bgid)
        if self.ring is not None and not self.ring.closed:
            reg = ffi.new("struct io_uring_buf_reg *", {"bgid": bgid})
            self.ring.register(_abi.IORING_UNREGISTER_PBUF_RING, reg, 1)
        self._free_bgids.append(bgid)

    # -- arena --------------------------------------------------------------

    def register(self, data: bytes | bytearray | memoryview) -> RegisteredContent:
        """Copy ``data`` once into registered memory; return a handle that
        ``send_all`` sends to any number of streams without copying again.

        The content region holds ``content_size`` bytes (``open_manager``);
        ``ContentFullError`` says how much is free when ``data`` does not
        fit.  Close the handle when done: its memory returns once every send
        of it has been notified.
        """
        view = byte_view(data, "register()")
        nbytes = view.nbytes
        if self.closed:
            raise ManagerClosedError("the trio_uring I/O manager for this run has shut down")
        arena = self.arena
        offset = arena.content.allocate(nbytes) if nbytes else arena.content.start
        arena.view[offset : offset + nbytes] = view
        arena.copied[0] += nbytes
        return RegisteredContent(self, ContentAllocation(arena, offset, nbytes), offset, nbytes)

    # -- the outbound queues' flush -------------------------------------------

    def schedule_flush(self, stream: Any) -> None:
        """Flush ``stream``'s queue at the end of this scheduler tick."""
        stream.flush_pending = True
        self.ticker.pending.append(stream)

    def submit_prepared(self) -> None:
        """Enter the kernel with every staged SQE and dispatch what
        completed meanwhile (one shim call, ``Ring.submit_and_reap``); make
        the completion task watch the ring while anything is left in flight."""
        ring = self.ring
        assert ring is not None
        ring.submit_and_reap()
        if ring.table:
            self._wake_completer()

    def flush_tick(self, tick: int, timeout: float) -> None:
        """At the end of scheduler tick ``tick``, before trio waits for I/O:
        one request per stream with queued bytes, all in one
        ``io_uring_enter``.

        Coalescing: a stream that queued bytes in this tick *and* the one
        before (a producer in full flow) is held for another tick while its
        queue is under its flush thresholds (``FLUSH_THRESHOLD``, or the
        stream's share for bytes held by reference), so its messages go out
        together; the stream decides that as it queues (``hold_tick``, see
        ``ZeroCopyStream._queued``).  Anything else is flushed now: a stream
        whose producer queued once (a response) goes out at the end of the
        very tick it was queued in, and when trio is about to sleep
        (``timeout > 0``) nothing is held at all.  The ``Ticker`` calls this
        only for a tick in which some pending stream is not held, and skips
        it for the common tick of a flow.  Runs inside trio's scheduler, so
        it never raises: a stream whose flush fails is failed instead.
        """
        if self.closed:
            return
        # No stream's hold_tick is ever -1: about to sleep, none is held.
        hold = tick if timeout <= 0 else -1
        pending = self.ticker.pending
        self.ticker.pending = held = []
        self.woke_tasks = False
        started = []
        for stream in pending:
            if stream.hold_tick == hold:
                held.append(stream)
                continue
            stream.flush_pending = False
            in_flight = stream.in_flight
            stream.flush()
            if stream.in_flight is not in_flight:
                started.append(stream)
        if started and self.ring is not None and self.ring.sq_pending:
            try:
                self.submit_prepared()
            except OSError as exc:
                # Only the requests started in this tick met the error: a
                # stream whose request went to the kernel earlier (its flush
                # found it in flight) is not failed for it.
                for stream in started:
                    stream.fail(exc)
        if timeout > 0 and self.woke_tasks and self._token is not None:
            # trio chose to sleep before this hook made tasks runnable:
            # wake its I/O wait so that they run now.
            self._token.run_sync_soon(_nothing)

    # -- sockets closed under requests -----------------------------------------

    def check_sockets(self, entries: Iterable[object]) -> None:
        """End the requests whose socket other code closed, asking the
        owners of ``entries`` (waiter-table entries).

        A request holds its socket's file open in the kernel, so closing the
        socket directly (``stream.socket.close()``, not ``aclose``) ends no
        request: a receive from a silent peer, a send the peer does not
        read, an accept would wait forever.  trio's epoll hears of such a
        close (``notify_closing``); io_uring cannot, so the manager looks.
        Each in-flight request's owner says whether its socket is gone; the
        owner then forgets the socket and wakes its waiters, and the request
        is cancelled by its ``user_data`` (never by fd: the number may
        already be another socket's).  Once the cancelled requests let go of
        the file, the close takes effect and the peer sees it.
        """
        ring = self.ring
        if ring is None or ring.closed or self.closed:
            return
        owners = {getattr(entry, "owner", None) for entry in entries}
        owners.discard(None)
        lost = {owner for owner in owners if owner.socket_lost()}
        if lost:
            self.cancel_requests_of(lost)

    def cancel_requests_of(self, owners: Collection[SocketOwner]) -> None:
        """Cancel, by ``user_data``, every request in flight whose owner is
        one of ``owners`` (a socket closed by other code: the fd number
        cannot name it any more); no wait."""
        ring = self.ring
        if ring is None or ring.closed or self.closed:
            return
        for user_data, entry in list(ring.table.items()):
            if getattr(entry, "owner", None) in owners:
                prep_cancel(ring, user_data)
        if ring.sq_pending:
            # Should entering the kernel fail, the cancellations stay staged
            # for the next submission, which reports the error to its task.
            with contextlib.suppress(OSError):
                self.submit_prepared()

    async def _watch_sockets(self) -> None:
        """Run ``check_sockets`` every ``SOCKET_CHECK_INTERVAL`` seconds while
        requests are in flight, ``SOCKET_CHECK_BATCH`` of them between two
        checkpoints; park while none are.  ``_wake_completer`` wakes it, at
        most once per interval.

        It also hands the kernel SQEs that are still staged: an
        ``io_uring_enter`` that failed for a moment (``EBUSY`` with a full
        CQ, ``EAGAIN`` with the kernel short of memory) leaves them staged,
        and otherwise only the next flush or request would submit them, which
        may never come.  An error that is not transient raises here, ending
        the run: a ring that refuses submissions cannot finish anything."""

        def abort(_: object) -> trio.lowlevel.Abort:
            self._watcher_parked = False
            return trio.lowlevel.Abort.SUCCEEDED

        ring = self.ring
        if ring is None:
            return
        self._watcher = trio.lowlevel.current_task()
        while True:
            if not ring.table:
                self._watcher_parked = True
                await trio.lowlevel.wait_task_rescheduled(abort)
            await trio.sleep(SOCKET_CHECK_INTERVAL)
            if not ring.closed and ring.sq_pending:
                self.submit_prepared()
            entries = list(ring.table.values())
            for start in range(0, len(entries), SOCKET_CHECK_BATCH):
                if start:
                    await trio.lowlevel.checkpoint()
                self.check_sockets(entries[start : start + SOCKET_CHECK_BATCH])

    # -- lifetime -------------------------------------------------------------

    def start_tasks(self, spawn: Callable[..., object]) -> None:
        """Start the manager's tasks with ``spawn`` (a nursery's
        ``start_soon``, or ``spawn_system_task`` for the lazy manager)."""
        spawn(self.run, name="trio_uring completions")
        spawn(self._watch_sockets, name="trio_uring socket check")
        self._token = trio.lowlevel.current_trio_token()
        self._instrument = _TickFlush(self)
        trio.lowlevel.add_instrument(self._instrument)

    def _wake_completer(self) -> None:
        if self._completer_parked:
            self._completer_parked = False
            _reschedule(self._completer)
            self.woke_tasks = True
        if self._watcher_parked:
            self._watcher_parked = False
            _reschedule(self._watcher)
            self.woke_tasks = True

    async def run(self) -> None:
        """Dispatch completions until cancelled, then shut down.

        While nothing is in flight this task parks instead of polling the
        ring fd: requests that complete during submission (most sends) then
        cost trio's epoll nothing, and ``submit`` wakes it when one does not.
        """

        def abort(_: object) -> trio.lowlevel.Abort:
            self._completer_parked = False
            return trio.lowlevel.Abort.SUCCEEDED

        try:
            if self.ring is None:
                await trio.sleep_forever()
            ring = self.ring
            self._completer = trio.lowlevel.current_task()
            while True:
                if not ring.table:
                    self._completer_parked = True
                    await trio.lowlevel.wait_task_rescheduled(abort)
                    continue
                await trio.lowlevel.wait_readable(ring.wait_fd)
                ring.reap()
        finally:
            with trio.CancelScope(shield=True):
                await self.aclose()

    async def aclose(self, timeout: float = SHUTDOWN_TIMEOUT) -> None:
        """Hand every queued byte to the kernel, then cancel what is in
        flight, wait for every CQE and notification, undo registrations and
        close the ring.  Idempotent.

        Queued bytes are flushed and their sends awaited for up to
        ``timeout`` seconds (a peer that does not read holds them back);
        what is still in flight after that is cancelled.
        """
        if self.closed:
            return
        if self._instrument is not None:
            # trio removes an instrument whose hook raised; it may be gone.
            with contextlib.suppress(KeyError):
                trio.lowlevel.remove_instrument(self._instrument)
            self._instrument = None
        ring = self.ring
        if ring is None:
            self.closed = True
            return
        refused: OSError | None = None
        try:
            with trio.move_on_after(timeout):
                while self.ticker.pending or self.sends_in_flight:
                    pending = self.ticker.pending
                    self.ticker.pending = []
                    for stream in pending:
                        stream.flush_pending = False
                        stream.flush()
                    self.submit_prepared()
                    if self.sends_in_flight:
                        await trio.lowlevel.wait_readable(ring.wait_fd)
                        ring.reap()
        except OSError as exc:
            refused = exc
        self.closed = True
        try:
            if ring.table and refused is None:
                prep_cancel_any(ring)
                ring.submit()
                ring.reap()
                with trio.move_on_after(timeout):
                    while ring.table:
                        await trio.lowlevel.wait_readable(ring.wait_fd)
                        ring.reap()
        except OSError as exc:
            refused = exc
        if refused is not None:
            self._end_waits(ring)
        leftover = len(ring.table)
        for bgid in list(self._registered_bgids):
            self.unregister_buf_ring(bgid)
        if leftover:
            _abandoned.append((self.arena, list(ring.table.values())))
            why = (
                f"when the kernel refused new work at shutdown ({refused})"
                if refused is not None
                else f"after {timeout:.0f} s at shutdown"
            )
            warnings.warn(
                f"trio_uring: {leftover} requests still held kernel references {why}; "
                "their memory stays mapped until exit",
                RuntimeWarning,
                stacklevel=1,
            )
        else:
            ring.register(_abi.IORING_UNREGISTER_BUFFERS, ffi.NULL, 0)
        trio.lowlevel.notify_closing(ring.wait_fd)
        ring.close()

    def _end_waits(self, ring: Ring) -> None:
        """Entering the kernel failed at shutdown, so no request left in
        the table will complete here: end the waits on them as cancelled,
        or no task waiting on one (a receive, an accept, a stream's send in
        flight) would ever be resumed, and the run would hang instead of
        ending with the error.  The entries stay in the table, and so in
        ``_abandoned`` with the arena: the kernel may still use their
        memory until it tears the requests down with the ring."""
        closed = ManagerClosedError(
            "the trio_uring I/O manager shut down when the kernel refused new work"
        )
        for entry in list(ring.table.values()):
            if isinstance(entry, (Operation, Multishot)):
                if entry.task is not None:
                    entry.complete(-errno.ECANCELED, 0)
                continue
            stream = getattr(entry, "stream", None)
            if stream is not None and stream.in_flight is entry:
                stream.fail(closed)

    def stream_counters(self) -> SendCounters:
        """New counters for a stream, counted in this manager's ``stats``."""
        counters = SendCounters(self.dead_stream_counts)
        self._stream_counters.add(counters)
        return counters

    def stats(self) -> dict[str, object]:
        """Ring-wide counters: strategy, sends, notifications, enter calls,
        and the routes (local address, peer address) on which streams left
        zero copy because the kernel copied anyway."""
        # The live counters first: a collection while the WeakSet is copied
        # folds a dying stream's counts into dead_stream_counts, which must
        # be read after that.
        live = list(self._stream_counters)
        c = SendCounters()
        self.dead_stream_counts.add_to(c)
        for counters in live:
            counters.add_to(c)
        return {
            "strategy": self.strategy,
            "sends": c.sends,
            "bytes": c.bytes,
            "bytes_copied": self.arena.copied[0],
            "notifications": c.notifications,
            "notifications_copied": c.copied,
            "notifications_zerocopy": c.notifications - c.copied,
            "io_uring_enter_calls": self.ring.enter_calls if self.ring else 0,
            "in_flight": len(self.ring.table) if self.ring else 0,
            "arena_free_slices": self.arena.free_count,
            "arena_slices": self.arena.n_slices,
            "arena_full_sends": self.arena_full_sends,
            "copying_routes": sorted(self.copying.routes),
        }


_MANAGER: trio.lowlevel.RunVar[IOManager] = trio.lowlevel.RunVar("trio_uring.manager")


def register(data: bytes | bytearray | memoryview) -> RegisteredContent:
    """Copy ``data`` once into this run's registered memory; ``send_all``
    the returned handle to any number of streams without another copy.
    See ``IOManager.register``."""
    return current_manager().register(data)


def current_manager() -> IOManager:
    """The I/O manager of the current trio run, created on first use."""
    try:
        manager = _MANAGER.get()
    except LookupError:
        manager = IOManager()
        _MANAGER.set(manager)
        manager.start_tasks(trio.lowlevel.spawn_system_task)
    if manager.closed:
        raise ManagerClosedError("the trio_uring I/O manager for this run has shut down")
    return manager


@contextlib.asynccontextmanager
async def open_manager(
    *,
    entries: int = DEFAULT_ENTRIES,
    arena_size: int = DEFAULT_ARENA_SIZE,
    slice_size: int = DEFAULT_SLICE_SIZE,
    strategy: str | None = None,
    setup_flags: int | None = None,
    sqpoll: bool = False,
    content_size: int = DEFAULT_CONTENT_SIZE,
) -> AsyncIterator[IOManager]:
    """Run a configured I/O manager for the enclosed block.

    ``entries`` sizes the SQ; the registered arena is ``arena_size`` bytes
    in slices of ``slice_size``, plus ``content_size`` bytes for content
    made with ``register``.  ``strategy`` forces a send strategy (no
    adaptation), ``setup_flags`` the io_uring setup flags.  ``sqpoll``
    gives the ring a kernel submission thread (``IORING_SETUP_SQPOLL``),
    which spins on another core for ``SQPOLL_IDLE_MS`` after each
    submission: submissions then cost no syscall, at the price of that core
    (see the performance notes; off by default).

    Streams created inside use it.  On exit, queued bytes are handed to the
    kernel, in-flight requests cancelled, outstanding notifications awaited
    and the ring closed.  Only
    one manager serves a run at a time: open it before creating streams.
    """
    try:
        _MANAGER.get()
    except LookupError:
        pass
    else:
        raise RuntimeError(
            "this trio run already has a trio_uring I/O manager; open_manager() must come "
            "before any stream is created, and cannot be nested"
        )
    manager = IOManager(
        entries=entries,
        arena_size=arena_size,
        slice_size=slice_size,
        strategy=strategy,
        setup_flags=setup_flags,
        sqpoll=sqpoll,
        content_size=content_size,
    )
    token = _MANAGER.set(manager)
    try:
        async with trio.open_nursery() as nursery:
            manager.start_tasks(nursery.start_soon)
            try:
                yield manager
            finally:
                nursery.cancel_scope.cancel()
    finally:
        _MANAGER.reset(token)
