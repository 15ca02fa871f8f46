"""ZeroCopyStream: a ``trio.abc.HalfCloseableStream`` over io_uring."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import operator
import os
import socket as _stdlib_socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import trio

from . import _abi
from ._buffers import ProvidedRing
from ._content import RegisteredContent
from ._manager import (
    COPIED_SWITCH_THRESHOLD,
    FLUSH_THRESHOLD,
    IOManager,
    ManagerClosedError,
    Operation,
    current_manager,
)
from ._prep import prep_recv
from ._queue import OutboundQueue, Segment
from ._send import STRATEGY_IMPLS, SendRequest, SendStrategy
from ._sendfile import FileArg
from ._sendfile import send_file as _send_file
from ._shim_cffi import ffi
from ._util import ConflictDetector, byte_view

#: As trio's SocketStream: the receive size when ``max_bytes`` is omitted.
DEFAULT_RECEIVE_SIZE = 65536
#: Where a stream that left zero copy goes: plain nonblocking sends of the same queue.
COPIED_FALLBACK_STRATEGY = "copy"
#: A stream may hold at most 1/STREAM_ARENA_SHARE of the arena's slices.
STREAM_ARENA_SHARE = 4
#: The most one receive asks the kernel for; ``receive_some`` may always
#: return less than ``max_bytes``, so larger requests are capped, not refused.
MAX_RECEIVE_SIZE = 4 * 1024 * 1024

_ZERO_COPY_FAMILIES = (_stdlib_socket.AF_INET, _stdlib_socket.AF_INET6)
_STREAM_FAMILIES = (*_ZERO_COPY_FAMILIES, _stdlib_socket.AF_UNIX)
_MSG_NOSIGNAL = _stdlib_socket.MSG_NOSIGNAL
_NEVER = sys.maxsize
# Bound once: send_all and receive_some call them on every message.
_checkpoint_if_cancelled = trio.lowlevel.checkpoint_if_cancelled
_cancel_shielded_checkpoint = trio.lowlevel.cancel_shielded_checkpoint
# Every public call is a full checkpoint, failing too, as trio's
# SocketStream, whose socket send() yields before it raises: its
# cancellation point comes first (a pending cancellation wins over the
# error), and a call that fails without having waited (a flush that meets a
# reset, a socket other code closed) awaits _cancel_shielded_checkpoint()
# before the error leaves, in an ``except Exception`` block where the error
# is found part way (not for Cancelled, which comes from a checkpoint).
# After a real wait it is one schedule point more, which is harmless.


@dataclasses.dataclass(frozen=True)
class StreamStats:
    """What one stream has sent, and what the kernel said about it.

    ``notifications_copied`` counts send-zc notifications that carried
    ``IORING_NOTIF_USAGE_ZC_COPIED``: the kernel copied after all (loopback,
    veth, NICs without scatter-gather).  ``notifications_zerocopy`` counts
    the real zero-copy ones.

    ``sends`` counts the requests (or plain ``send()`` calls) that handed
    bytes to the kernel: one may carry many ``send_all`` calls' bytes.
    ``bytes_copied`` counts the bytes copied in user space into registered
    slices: every byte of a ``send_all`` copied into the queue, none of
    those produced in place by ``reserve()``, held by reference (``bytes``
    under ``copy``) or sent straight from the caller's buffer.

    A snapshot: bytes are sent after ``send_all`` has returned, and
    notifications arrive after that.  Once a stream whose strategy the
    library chose has left zero copy (the kernel kept copying), its later
    sends get no notification at all: ``strategy`` then reads ``"copy"``
    and ``notifications < sends`` for good.
    """

    strategy: str
    sends: int
    bytes_sent: int
    bytes_copied: int
    notifications: int
    notifications_copied: int
    notifications_zerocopy: int


def _unsent_bytes(fd: int) -> int:
    """How many bytes the socket holds that TCP has not sent yet (0 where
    the kernel cannot say)."""
    try:
        answer = fcntl.ioctl(fd, _abi.SIOCOUTQNSD, b"\0\0\0\0")
    except OSError:
        return 0
    return int.from_bytes(answer, sys.byteorder, signed=True)


def check_result(res: int) -> int:
    """A CQE's ``res`` as a count, or its ``-errno`` raised as ``OSError``."""
    if res < 0:
        raise OSError(-res, os.strerror(-res))
    return res


_SOCKET_GONE = (
    "the socket under this ZeroCopyStream was closed; close the stream with aclose() "
    "rather than closing its socket"
)


def _stream_error(
    stream: ZeroCopyStream, exc: OSError, what: str
) -> trio.ClosedResourceError | trio.BrokenResourceError:
    """The trio exception for ``exc``, raised ``from exc`` by the caller."""
    if exc.errno == errno.ECANCELED or stream._closed or stream._socket_gone():
        return trio.ClosedResourceError("the stream was closed while " + what)
    return trio.BrokenResourceError(f"{what} failed: {exc.strerror or exc}")


class ZeroCopyStream(trio.abc.HalfCloseableStream):
    """A TCP or Unix stream whose sends go through registered memory.

    ``send_all`` copies the data into this stream's *outbound queue*:
    registered slices of the run's arena, appended densely, so that small
    messages pack into one slice.  It returns as soon as the bytes are
    queued, and the caller's buffer is free at once.  Once per trio
    scheduler tick every stream with queued bytes gets one send request
    covering them, and all of those go to the kernel in one
    ``io_uring_enter``; a slice is rewritten only after the kernel's
    zero-copy notification says it no longer reads it.  The queue is
    bounded by the stream's share of the arena: when it is full,
    ``send_all`` waits (the backpressure), and ``wait_send_all_might_not_block``
    waits for the same thing.  A stream never waits for slices other
    streams hold (their peers may have stopped reading): with none free it
    sends without the arena, as a plain socket would.

    Where the kernel copies anyway (loopback, veth, AF_UNIX) the stream
    sends with plain nonblocking ``send()`` calls, payloads of
    ``DIRECT_SEND_MIN`` bytes or more straight from the caller's buffer; a
    flow of such payloads that are ``bytes`` (immutable) is queued by
    reference instead, uncopied, and leaves several per ``send()``.

    Semantics follow ``trio.SocketStream``: one task sends and one receives
    at a time (``trio.BusyResourceError`` otherwise); after ``aclose``,
    ``trio.ClosedResourceError``; network errors raise
    ``trio.BrokenResourceError`` with the ``OSError`` as ``__cause__``,
    including an error the kernel reported for bytes queued by an earlier
    ``send_all``: the next ``send_all``, ``wait_send_all_might_not_block``,
    ``send_eof`` or ``aclose`` raises it.

    Cancelling ``send_all`` before it queued anything leaves the stream
    usable.  Cancelling it once it queued part of the data (it was waiting
    for room) leaves the stream *broken*, as trio's streams are after a
    cancelled ``send_all``: the peer gets some prefix of the bytes sent, and
    every later ``send_all`` raises ``BrokenResourceError``.  Receiving
    still works, and ``aclose`` closes at once, dropping what is queued.
    A graceful ``aclose`` or ``send_eof`` first sends everything queued;
    ``trio.aclose_forcefully`` (a cancelled ``aclose``) drops it.
    """

    # Slots, not a dict: the interpreter reads a slot at a fixed offset,
    # and send_all and receive_some read a dozen attributes per call.
    __slots__ = (
        "_adaptive",
        "_busy_without_a_message",
        "_closed",
        "_eof_sent",
        "_error_unreported",
        "_iov",
        "_msghdr_address",
        "_parked",
        "_progress",
        "_receive_conflict",
        "_recv_address",
        "_recv_buffer",
        "_requests_cancelled",
        "_route",
        "_send_broken",
        "_send_conflict",
        "bgid",
        "counters",
        "direct_min",
        "fd",
        "flush_pending",
        "flush_slices",
        "flush_threshold",
        "hold_tick",
        "in_flight",
        "last_tick",
        "lone_max",
        "manager",
        "msghdr",
        "provided_ring",
        "queue",
        "socket",
        "stdlib_socket",
        "strategy",
        "ticker",
        "unpublished_head",
    )

    def __init__(self, socket: trio.socket.SocketType) -> None:
        if not isinstance(socket, trio.socket.SocketType):
            raise TypeError(
                "ZeroCopyStream needs a connected trio socket; wrap a standard socket with "
                f"trio.socket.from_stdlib_socket(), got {type(socket).__name__}"
            )
        if socket.fileno() < 0:
            raise ValueError("ZeroCopyStream needs an open socket; this one is closed")
        if socket.type != _stdlib_socket.SOCK_STREAM:
            raise ValueError(
                f"ZeroCopyStream needs a SOCK_STREAM socket, got {socket.type!r}; "
                "datagram sockets (UDP) have no byte stream to send into"
            )
        if socket.family not in _STREAM_FAMILIES:
            raise ValueError(
                f"ZeroCopyStream supports AF_INET, AF_INET6 and AF_UNIX, not {socket.family!r}"
            )
        self.socket = socket
        # The standard library socket under the trio one (trio keeps it
        # nonblocking): its send() completes or raises BlockingIOError at
        # once, without the async layers of trio's socket send.
        self.stdlib_socket: _stdlib_socket.socket = socket._sock  # type: ignore[attr-defined]
        self.fd: int = socket.fileno()
        self.manager: IOManager = current_manager()
        if socket.family in _ZERO_COPY_FAMILIES:
            with contextlib.suppress(OSError):
                socket.setsockopt(_stdlib_socket.IPPROTO_TCP, _stdlib_socket.TCP_NODELAY, True)
        self.strategy: SendStrategy = STRATEGY_IMPLS[self._choose_strategy()]
        # With the strategy left to the library, a zero-copy stream whose
        # notifications keep saying "copied" switches to plain sends: the
        # kernel copies anyway, and zero copy only adds its own overhead.
        # The manager counts those notifications per route, and streams on
        # a route known to copy skip the trial (see ``notified``).
        self._adaptive = self.manager.adaptive and self.strategy.zero_copy
        self._route: tuple[str, str] | None = None
        if self._adaptive:
            with contextlib.suppress(OSError):
                self._route = (str(socket.getsockname()[0]), str(socket.getpeername()[0]))
            if self._route in self.manager.copying:
                self.strategy = STRATEGY_IMPLS[COPIED_FALLBACK_STRATEGY]
                self._adaptive = False
        arena = self.manager.arena
        # A stream holds at most a quarter of the arena: slices sent to a peer
        # that stopped reading stay pinned until it reads (or the connection
        # dies), and one stalled peer must not starve every other stream.
        self.queue = OutboundQueue(arena, max(1, arena.n_slices // STREAM_ARENA_SHARE))
        #: The send request in flight (at most one, so bytes keep their order).
        self.in_flight: SendRequest | None = None
        self.counters = self.manager.stream_counters()
        self.provided_ring: ProvidedRing | None = None
        self.bgid: int | None = None
        #: fixed-provided-bundle: the queue starts with the rest of an entry
        #: the kernel consumed in part, which must go out on its own.
        self.unpublished_head = False
        if self.strategy.name == "fixed-provided-bundle":
            # Only this strategy's kernel reads provided entries.
            self.provided_ring = ProvidedRing(
                ProvidedRing.entries_for(min(self.queue.limit * 2, _abi.MAX_BUF_RING_ENTRIES))
            )
            self.bgid = self.manager.register_buf_ring(
                self.provided_ring.address, self.provided_ring.entries
            )
        # Sizes that follow the strategy, set again whenever it changes:
        # ``flush_threshold`` and ``flush_slices``, the queued bytes and
        # slices past which this stream is flushed at once and not held for
        # more messages at the tick (see ``IOManager.flush_tick``);
        # ``direct_min``, the strategy's; ``lone_max``, the size under which
        # a lone message is sent at once (0: never).
        self._set_strategy_limits()
        if self.strategy.after_plain_sends is not None and _unsent_bytes(self.fd):
            # Bytes written before the socket was wrapped (a greeting, a
            # protocol's preface) still wait in it: plain socket data.
            self._before_plain_sends()
        self._iov = ffi.new("uint64_t[]", 2 * _abi.UIO_MAXIOV)
        self.msghdr = ffi.new("struct tu_msghdr *")
        self.msghdr.msg_iov = ffi.cast("struct tu_iovec *", self._iov)
        self._msghdr_address = int(ffi.cast("uintptr_t", self.msghdr))
        self._recv_buffer = ffi.new("char[]", 0)
        self._recv_address = 0
        self._closed = False
        self._eof_sent = False
        #: Its requests in flight were cancelled: by ``aclose``, or by the
        #: manager's socket check once other code closed the socket.
        self._requests_cancelled = False
        #: Why send_all may not be used any more: it failed or was cancelled
        #: part way, or the kernel failed bytes queued earlier.
        self._send_broken: BaseException | None = None
        #: The kernel failed queued bytes and no call has raised it yet.
        self._error_unreported = False
        #: Send-side tasks waiting for room, a send to finish, or an error.
        self._progress = trio.lowlevel.ParkingLot()
        #: Tasks parked in ``_progress``: a plain count, because asking the
        #: ParkingLot (a Python ``__len__``) on every freed slice is not free.
        self._parked = 0
        # Coalescing state for the manager's per-tick flush: whether the
        # stream is on the ticker's pending list, the last tick it queued bytes in,
        # and the tick at whose end its queue may be held for more messages
        # (see ``_queued``; any other value: none).
        self.flush_pending = False
        #: The manager's tick counter, at hand for every send_all.
        self.ticker = self.manager.ticker
        self.last_tick = -2
        self.hold_tick = -2
        self._send_conflict = ConflictDetector(
            "another task is currently sending data on this ZeroCopyStream"
        )
        self._receive_conflict = ConflictDetector(
            "another task is currently receiving data on this ZeroCopyStream"
        )
        #: The send side is busy with a call that queues nothing of its own
        #: (see ``_sending_no_message``).
        self._busy_without_a_message = False

    @classmethod
    def from_socket(cls, sock: trio.socket.SocketType) -> ZeroCopyStream:
        """Wrap any connected trio TCP or ``AF_UNIX`` stream socket."""
        return cls(sock)

    def _choose_strategy(self) -> str:
        name = self.manager.strategy
        if STRATEGY_IMPLS[name].zero_copy and self.socket.family not in _ZERO_COPY_FAMILIES:
            # The kernel supports zero copy only for inet sockets.
            return "copy"
        return name

    # -- used by the strategies and the manager ------------------------------

    def fill_msghdr(self, segments: list[Segment]) -> int:
        """Point the stream's msghdr at ``segments``; return its address."""
        words, base, j = self._iov, self.manager.arena.base, 0
        for segment in segments:
            if segment[2].__class__ is bytes:
                words[j] = self.queue.segment_address(segment)
            else:
                words[j] = base + segment[0]
            words[j + 1] = segment[1]
            j += 2
        self.msghdr.msg_iovlen = len(segments)
        return self._msghdr_address

    def begin(self, request: SendRequest) -> None:
        """``request`` was prepared; it is the stream's send in flight."""
        self.in_flight = request
        self.manager.sends_in_flight += 1

    def send_completed(self, request: SendRequest, res: int) -> None:
        """The result CQE of the send in flight."""
        self.in_flight = None
        self.manager.sends_in_flight -= 1
        if res < 0:
            if not self._closed:
                self.fail(OSError(-res, os.strerror(-res)))
            return
        self.counters.sent(res)
        if self._closed:
            return
        if res < request.nbytes:
            self.queue.requeue(request.segments, res)
        if self.queue.nbytes and not self.flush_pending:
            self.manager.schedule_flush(self)
        self._wake()

    def notified(self, copied: bool) -> None:
        """A zero-copy notification of one of this stream's sends."""
        counters = self.counters
        counters.notified(copied)
        if not self._adaptive:
            return
        if self._route is not None:
            switch = self.manager.copying.note(self._route, copied)
        else:
            switch = counters.consecutive_copied >= COPIED_SWITCH_THRESHOLD
        if switch:
            self.strategy = STRATEGY_IMPLS[COPIED_FALLBACK_STRATEGY]
            self._set_strategy_limits()
            self._adaptive = False

    def _set_strategy_limits(self) -> None:
        """Take the sizes ``send_all`` and the flush compare with from the
        stream's strategy, which was just chosen or changed: read on every
        message, they are the stream's own attributes, one lookup each.

        The flush threshold is ``FLUSH_THRESHOLD`` bytes for a strategy that
        sends slices.  A strategy that holds callers' bytes by reference
        holds up to the stream's share of them, as long as its slices stay under
        ``FLUSH_THRESHOLD``: held bytes cost neither a copy nor a slice while
        they wait, and every message more per ``send()`` saves a system
        call, where slices are the arena's, shared by every stream.  (Such a
        strategy's slices go back to the arena as soon as ``send()`` copied
        them, so the slices it holds are the ones queued, and the tail.)
        """
        strategy = self.strategy
        self.direct_min = strategy.direct_min
        self.lone_max = strategy.direct_min if strategy.sends_at_once else 0
        queue = self.queue
        if strategy.holds_bytes:
            self.flush_threshold = queue.byte_limit
            self.flush_slices = max(1, FLUSH_THRESHOLD // queue.slice_size)
        else:
            self.flush_threshold = FLUSH_THRESHOLD
            self.flush_slices = _NEVER

    def break_sending(self, exc: BaseException) -> None:
        """A send failed or stopped part way: the peer may see a prefix, so
        no later send may follow it.  The first cause is kept."""
        if self._send_broken is None:
            self._send_broken = exc

    def fail(self, exc: BaseException) -> None:
        """The kernel failed queued bytes: drop the rest, break the stream."""
        if self._send_broken is None:
            self._send_broken = exc
            self._error_unreported = True
        self.queue.clear()
        self._wake()

    def flush(self) -> None:
        """Hand the front of the queue to the strategy, if no send is in flight.

        The request names the socket's fd number, so this is where a socket
        closed by other code is caught for queued bytes: the number may
        already be another socket's.  Those bytes cannot be sent; they are
        dropped and the next call says so.
        """
        if self.in_flight is not None or not self.queue.nbytes or self._closed:
            return
        if self._socket_gone():
            self._forget_socket()
            return
        try:
            self.strategy.flush(self)
        except Exception as exc:
            self.fail(exc)

    def _wake(self) -> None:
        if self._parked:
            self._progress.unpark_all()
            self.manager.woke_tasks = True

    # -- sending --------------------------------------------------------------

    def _socket_gone(self) -> bool:
        """True once other code closed the socket: its fd number is stale and
        may already name another socket, so it must never be used again."""
        return self.socket.fileno() != self.fd

    def _forget_socket(self) -> None:
        """Other code closed the socket: never use its fd number again.

        Bytes still queued cannot be sent any more.  They are dropped, and
        the next call says how many (``aclose`` included); every later
        ``send_all`` raises before it queues.
        """
        if self.queue.nbytes:
            self.fail(
                trio.ClosedResourceError(
                    f"{_SOCKET_GONE}; {self.queue.nbytes} bytes queued then were not sent"
                )
            )
        elif self._send_broken is None:
            self._send_broken = trio.ClosedResourceError(_SOCKET_GONE)

    def socket_lost(self) -> bool:
        """``SocketOwner``: True, once, when other code closed the socket
        while requests of this open stream were in flight.  The stream forgets the
        socket (as ``check_open`` does) and wakes a ``send_all`` waiting for
        room or for its slices; the manager cancels the requests, which ends
        a receive.  No request names the fd number after that."""
        if self._requests_cancelled or not self._socket_gone():
            return False
        self._requests_cancelled = True
        self._forget_socket()
        self._wake()
        return True

    def check_open(self) -> None:
        """Raise ``ClosedResourceError`` once the stream or its socket is closed."""
        if self._closed:
            raise trio.ClosedResourceError("this ZeroCopyStream was closed")
        if self._socket_gone():
            self._forget_socket()
            if self._error_unreported and isinstance(self._send_broken, trio.ClosedResourceError):
                self._raise_if_broken()  # how many queued bytes were dropped
            raise trio.ClosedResourceError(_SOCKET_GONE)

    def _raise_if_broken(self) -> None:
        exc = self._send_broken
        if exc is None:
            return
        self._error_unreported = False
        if isinstance(exc, OSError):
            raise _stream_error(self, exc, "sending queued data") from exc
        if isinstance(exc, trio.ClosedResourceError):
            raise trio.ClosedResourceError(str(exc)) from exc  # its socket was closed
        raise trio.BrokenResourceError(
            "an earlier send_all on this stream failed or was cancelled part way; "
            "the peer may have received a prefix of that data, so the stream is broken"
        ) from exc

    def _check_can_send(self) -> None:
        self.check_open()
        if self._eof_sent:
            raise trio.ClosedResourceError("can't send data after sending EOF")
        self._raise_if_broken()
        if self.manager.closed:
            raise ManagerClosedError(
                "the trio_uring I/O manager this stream was opened under has shut down; "
                "use the stream inside the open_manager() block that created it"
            )

    async def _check_can_send_at_checkpoint(self) -> None:
        """A cancellation point, then ``_check_can_send``: its error comes at
        a full checkpoint, as from trio's SocketStream, whose socket send()
        yields before it raises, and a pending cancellation comes first."""
        await _checkpoint_if_cancelled()
        try:
            self._check_can_send()
        except BaseException:
            await _cancel_shielded_checkpoint()
            raise

    async def send_all(self, data: bytes | bytearray | memoryview | RegisteredContent) -> None:
        """Queue all of ``data`` for sending; return once it is queued.

        Waits only while this stream's share of the arena is full of bytes
        the kernel has not finished with (the backpressure).  ``data`` may
        be a :class:`RegisteredContent` handle (``trio_uring.register``):
        its bytes are queued by reference, without a copy.
        """
        # The common case (bytes that fit at the queue's tail) runs inline:
        # every call saved here is a measurable share of a small send_all.
        conflict = self._send_conflict
        if conflict.busy:
            conflict.acquire()  # raises BusyResourceError
        conflict.busy = True
        try:
            cls = data.__class__
            if cls is bytes:
                view: bytes | memoryview = data  # type: ignore[assignment]
            elif cls is RegisteredContent:
                await self._send_content(data)  # type: ignore[arg-type]
                return
            else:
                view = byte_view(data, "send_all()")
            if (
                self._closed
                or self._eof_sent
                or self._send_broken is not None
                or self.manager.closed
            ):
                await self._check_can_send_at_checkpoint()
            await _checkpoint_if_cancelled()
            nbytes = len(view)
            tick = self.ticker.tick
            sent = 0
            if tick > self.last_tick + 1 and 0 < nbytes < self.lone_max:
                # A lone small message (a response, not a flow): one plain
                # send() now, unless bytes queued earlier must go first.
                # Holding it for the tick's flush would cost the queue's
                # bookkeeping and batch nothing.  The tick is recorded
                # either way, so the next message of a flow is queued.  A
                # socket closed under the stream fails this send() (EBADF):
                # it goes through the stream's own socket object.
                self.last_tick = tick
                if not self.queue.nbytes and self.in_flight is None:
                    try:
                        sent = self.stdlib_socket.send(view, _MSG_NOSIGNAL)
                    except BlockingIOError:
                        pass
                    except OSError as exc:
                        # A full checkpoint before the error, as trio's
                        # socket send(): the cancellation point above is
                        # only half of one.
                        await _cancel_shielded_checkpoint()
                        self.check_open()  # its socket closed: not a broken stream
                        self.break_sending(exc)
                        raise _stream_error(self, exc, "sending") from exc
                    else:
                        # ``counters.sent(sent)`` written out: the call was
                        # a seventh of a lone message's send_all.
                        counters = self.counters
                        counters.sends += 1
                        counters.bytes += sent
                        if sent == nbytes:
                            await _cancel_shielded_checkpoint()
                            return
                        view = memoryview(view)[sent:]
                        nbytes -= sent
            queue = self.queue
            if nbytes >= self.direct_min:
                if not (
                    cls is bytes
                    and self.strategy.holds_bytes
                    and nbytes < FLUSH_THRESHOLD
                    and tick <= self.last_tick + 1
                ):
                    await self._send_direct(memoryview(view))
                    # When it finished, not when it began: a message right
                    # after it continues a flow however long it waited.
                    self.last_tick = self.ticker.tick
                    self.hold_tick = -2
                    await _cancel_shielded_checkpoint()
                    return
                # A producer in full flow under a copying strategy: its
                # bytes are held by reference, to go out several per
                # send(), up to the stream's share.
                if queue.nbytes >= queue.byte_limit:
                    await self._wait_for_share()
                    tick = self.ticker.tick
                queue.hold(view)  # type: ignore[arg-type]
            elif nbytes:
                try:
                    queued = queue.write(view)
                except BaseException as exc:
                    # A prefix of the message was sent or queued (write
                    # stopped at write_pos): the stream cannot carry another.
                    if sent or queue.write_pos:
                        self.break_sending(exc)
                    raise
                if queued < nbytes:
                    await self._write_waiting(memoryview(view), queued, prefix_sent=sent > 0)
                    tick = self.ticker.tick
            else:
                await _cancel_shielded_checkpoint()
                return
            # ``_queued(tick)`` written out for the message of a flow,
            # which needs no more than its tick bookkeeping: the call
            # alone was 2 % of a 4 KiB send_all.
            last = self.last_tick
            if last != tick:
                self.last_tick = tick
                self.hold_tick = tick if last == tick - 1 else -2
            if (
                queue.nbytes >= self.flush_threshold
                or queue.held > self.flush_slices
                or not self.flush_pending
            ):
                self._flush_or_schedule()
            await _cancel_shielded_checkpoint()
        finally:
            conflict.busy = False

    async def _send_content(self, content: RegisteredContent) -> None:
        """Queue a reference to registered content, waiting while the queue
        already holds a share's worth of unsent bytes."""
        if content.manager is not self.manager:
            raise ValueError(
                "this RegisteredContent was registered with another trio run's manager; "
                "register the data again in this run"
            )
        content.segment()
        await self._check_can_send_at_checkpoint()
        queue = self.queue
        if len(content):
            if queue.nbytes >= queue.byte_limit:
                await self._wait_for_share()
            queue.append_content(*content.segment())
            await self._queued_outside_send_all()
        await _cancel_shielded_checkpoint()

    async def _wait_for_share(self) -> None:
        """Flush, then wait while the queue holds a share's worth of unsent
        bytes (bytes held by reference or content, which take no slice).
        Raises at a schedule point (see ``_cancel_shielded_checkpoint``)."""
        queue = self.queue
        try:
            self._flush_now()
            await self._wait_for(lambda: queue.nbytes < queue.byte_limit)
            self._raise_if_broken()
        except Exception:
            await _cancel_shielded_checkpoint()
            raise

    async def _queued_outside_send_all(self) -> None:
        """``reserve()`` or content queued bytes: without a ring nothing
        flushes the queue at the tick, so send them here."""
        if self.manager.ring is not None:
            self._queued(self.ticker.tick)
            return
        try:
            await self._drain()
        except BaseException as exc:
            self.break_sending(exc)
            raise

    def _queued(self, tick: int) -> None:
        """Bytes were queued in scheduler tick ``tick`` (``ticker.tick``, which
        the caller has at hand): flush now past the thresholds, else at the
        tick.

        A stream that queued bytes in the tick before this one as well is a
        producer in full flow: the tick's flush may hold its queue for more
        messages (``hold_tick`` is this tick), unless the queue is past its
        thresholds.  The decision is made here, where the queue just changed,
        so that the flush only compares one number per stream.  ``send_all``
        writes this out for the message of a flow: a change to the rule
        belongs in both.
        """
        last = self.last_tick
        if last != tick:
            self.last_tick = tick
            self.hold_tick = tick if last == tick - 1 else -2
        self._flush_or_schedule()

    def _flush_or_schedule(self) -> None:
        """Flush now when the queue is past its thresholds (and hold it no
        longer); otherwise see that the tick's flush will find it."""
        queue = self.queue
        if queue.nbytes >= self.flush_threshold or queue.held > self.flush_slices:
            self.hold_tick = -2
            if self.in_flight is None:
                self._flush_now()
        if queue.nbytes and not self.flush_pending:
            self.manager.schedule_flush(self)

    def _flush_now(self) -> None:
        """Flush this stream from a task, entering the kernel at once."""
        if self.manager.closed:
            self.fail(ManagerClosedError("the trio_uring I/O manager for this run has shut down"))
            return
        self.flush()
        if self.manager.ring is not None and self.manager.ring.sq_pending:
            try:
                self.manager.submit_prepared()
            except OSError as exc:
                # As at the tick's flush: the request's bytes are lost to the
                # stream, and the next call says so (BrokenResourceError).
                self.fail(exc)

    async def _park(self) -> None:
        """Wait in ``_progress`` until ``_wake``.

        Only while a task waits does the queue report freed slices (its
        ``on_free``): a call per slice is not free, and nobody else listens.
        """
        if not self._parked:
            self.queue.on_free = self._wake
        self._parked += 1
        try:
            await self._progress.park()
        finally:
            self._parked -= 1
            if not self._parked:
                self.queue.on_free = None

    async def _wait_for(self, ready: Callable[[], bool]) -> None:
        """Park until ``ready()`` or an error; ``ClosedResourceError`` once
        another task closes the stream.  A checkpoint only when it parks."""
        while True:
            if self._closed:
                raise trio.ClosedResourceError("the stream was closed while a send waited")
            if ready() or self._send_broken is not None:
                return
            await self._park()

    async def _wait_for_room(self) -> bool:
        """Backpressure: flush, then wait while this stream holds its whole
        share of the arena, for its own slices to come back (as its peer
        takes its bytes).  True once ``write`` can make progress.

        False when the share has room but the arena has no free slice: other
        streams hold them all, maybe for peers that stopped reading, and
        waiting for them would tie this stream to their peers.  The caller
        then sends without the arena, from plain memory, as a socket would
        (the kernel copies), after the bytes queued before.
        """
        queue = self.queue
        try:
            self._flush_now()
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("the stream was closed while a send waited")
                if queue.writable or self._send_broken is not None or not queue.at_limit:
                    break
                await self._park()
            self._raise_if_broken()
        except Exception:
            await _cancel_shielded_checkpoint()
            raise
        return queue.writable

    def _going_without_the_arena(self) -> None:
        """Other streams hold every free slice, and this stream is about to
        send with plain ``send()`` (or splice) calls: count it
        (``arena_full_sends``).  Those calls leave the strategy themselves
        (``_before_plain_sends``)."""
        self.manager.arena_full_sends += 1

    def _before_plain_sends(self) -> None:
        """The stream is about to put bytes into its socket with plain
        ``send()``, ``sendfile()`` or splice calls: leave a strategy that
        does not mix with those for its ``after_plain_sends`` successor.
        Each of those sends (``_send_direct`` and send_file's splice and
        ``sendfile``) calls this first, whatever led to it."""
        successor = self.strategy.after_plain_sends
        if successor is not None:
            self.strategy = STRATEGY_IMPLS[successor]
            self._set_strategy_limits()

    async def _write_waiting(
        self, view: memoryview, pos: int, *, prefix_sent: bool = False
    ) -> None:
        """Queue ``view[pos:]``, waiting for room as often as it takes.

        ``prefix_sent``: bytes of this message before ``view`` already left.
        """
        try:
            while pos < view.nbytes:
                if not await self._wait_for_room():
                    self._going_without_the_arena()
                    await self._send_direct(view[pos:])
                    return
                self.check_open()
                try:
                    pos = self.queue.write(view, pos)
                except BaseException:
                    pos = self.queue.write_pos  # what it queued before it raised
                    raise
        except BaseException as exc:
            # Part of the data is queued and will be sent: the peer would see
            # a prefix, so the stream cannot carry another message.
            if pos or prefix_sent:
                self.break_sending(exc)
            raise

    async def _send_direct(self, view: memoryview) -> None:
        """Send from the caller's buffer, after everything queued before."""
        self._before_plain_sends()
        if self.queue.nbytes or self.in_flight is not None:
            await self._drain()
        sock, nbytes, sent = self.stdlib_socket, view.nbytes, 0
        try:
            while True:
                try:
                    sent += sock.send(view[sent:] if sent else view, _MSG_NOSIGNAL)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self.fd)
                    continue
                if sent == nbytes:
                    break
        except OSError as exc:
            # A full checkpoint before the error, as trio's socket send(),
            # even when the first send() failed before any wait.
            await _cancel_shielded_checkpoint()
            self.check_open()  # its socket closed (EBADF): not a broken stream
            self.break_sending(exc)
            raise _stream_error(self, exc, "sending") from exc
        except BaseException as exc:
            if sent:
                self.break_sending(exc)
            raise
        finally:
            if sent:
                self.counters.sent(sent)

    async def _drain(self) -> None:
        """Send everything queued; return when the kernel has accepted it.

        Raises what the kernel reported for queued bytes, at a schedule
        point (see ``_cancel_shielded_checkpoint``).  Returning, a checkpoint
        only when something had to be waited for.
        """
        queue = self.queue
        try:
            while (queue.nbytes or self.in_flight is not None) and self._send_broken is None:
                self.check_open()
                self._flush_now()
                if self.manager.ring is None and queue.nbytes:
                    # No ring to finish the send: wait for the socket here.
                    await trio.lowlevel.wait_writable(self.fd)
                elif self.in_flight is not None:
                    await self._wait_for(lambda: self.in_flight is None)
            self._raise_if_broken()
        except Exception:
            await _cancel_shielded_checkpoint()
            raise

    @contextlib.asynccontextmanager
    async def reserve(self, nbytes: int) -> AsyncIterator[memoryview]:
        """Write ``nbytes`` straight into registered memory, then send them.

        ::

            async with stream.reserve(4096) as view:
                view[:] = produce()        # or sock.recv_into(view), file.readinto(view)

        The block gets a writable memoryview of free bytes at the end of the
        stream's outbound queue; when the block ends normally, all ``nbytes``
        are queued as by ``send_all``.  Data produced in place is never
        copied in user space, which is what makes zero copy a saving rather
        than a second copy.  ``nbytes`` is at most the manager's
        ``slice_size``: send larger data in pieces, or open the manager with
        larger slices.

        The whole block counts as a send in progress (``BusyResourceError``
        for a concurrent ``send_all``).  Entering it is a cancellation point
        and may wait for room; leaving it is a checkpoint.  If the block
        raises, nothing is sent and the stream stays usable.  If the stream
        broke or was closed meanwhile, leaving raises that error and sends
        nothing.  The view is released when the block ends: keep no other
        reference to it, because the memory is reused afterwards.

        When other streams hold every free slice, the block gets plain
        memory instead, once the bytes queued before it are out and the
        socket has room; leaving then sends the bytes from there and may
        wait for the socket, and a cancellation there breaks the stream, as
        for a ``send_all`` cancelled part way.
        """
        with self._send_conflict:
            try:
                nbytes = operator.index(nbytes)
            except TypeError:
                raise TypeError(
                    f"reserve() takes a byte count (int), not {type(nbytes).__name__}"
                ) from None
            slice_size = self.manager.arena.slice_size
            if not 1 <= nbytes <= slice_size:
                raise ValueError(
                    f"reserve() takes 1 to slice_size ({slice_size}) bytes, not {nbytes}; "
                    "send larger data in pieces, or open_manager(slice_size=...) larger"
                )
            await self._check_can_send_at_checkpoint()
            view = self.queue.reserve(nbytes)
            while view is None:
                if not await self._wait_for_room():
                    # Every slice is held by other streams: the block writes
                    # into plain memory, sent from there when it ends.  The
                    # waits come first, where a cancellation loses nothing.
                    self._going_without_the_arena()
                    await self._drain()
                    await trio.lowlevel.wait_writable(self.fd)
                    unregistered = memoryview(bytearray(nbytes))
                    yield unregistered
                    try:
                        self.check_open()
                        await self._send_direct(unregistered)
                    except BaseException as exc:
                        self.break_sending(exc)  # the block's bytes are lost
                        raise
                    await _cancel_shielded_checkpoint()
                    return
                self.check_open()
                view = self.queue.reserve(nbytes)
            try:
                yield view
            except BaseException:
                self._release_reserved(view)
                self.queue.unreserve()
                raise
            self._release_reserved(view)
            if self._closed or self._send_broken is not None:
                # Closing, or the kernel failing queued bytes, cleared the
                # queue: the reserved bytes cannot follow what was lost.
                self.queue.unreserve()
                await _cancel_shielded_checkpoint()
                self.check_open()
                self._raise_if_broken()
            self.queue.commit(nbytes)
            await self._queued_outside_send_all()
            await _cancel_shielded_checkpoint()

    def _release_reserved(self, view: memoryview) -> None:
        try:
            view.release()
        except BufferError:
            # Something still exports the view and could write into the
            # slice later: it must never go back to the arena.
            self.queue.retire_tail()
            raise RuntimeError(
                "an object made from the reserve() view (numpy.frombuffer, "
                "ffi.from_buffer) was still alive when the block ended; drop it inside "
                "the block. The slice is retired and nothing was sent"
            ) from None

    async def send_file(self, file: FileArg, offset: int = 0, count: int | None = None) -> int:
        """Send ``count`` bytes of a file from ``offset`` (to its end if
        ``count`` is None); return how many were sent.

        ``file`` is a path, a file object with ``fileno()`` or an fd, of a
        regular file; ``offset`` is absolute, and a file object's position
        is neither used nor moved.  The bytes never pass through Python,
        and with io_uring the event loop never waits for the disk: large
        counts are spliced file -> pipe -> socket after everything queued
        before; small ones are read into the outbound queue like a
        ``send_all`` (so a small body goes out with its headers).  Returns
        once every byte is queued or handed to the kernel; semantics as
        ``send_all``.
        """
        return await _send_file(self, file, offset, count)

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until ``send_all`` could queue at least one byte (a checkpoint).

        That is: until the stream's share of the arena has room, and while
        other streams hold every free slice (or under the ``socket``
        strategy) until the socket is writable.  Raises
        ``BrokenResourceError`` once the kernel failed queued bytes.
        """
        with self._sending_no_message():
            # A full checkpoint even when the call fails at once, as
            # send_all (``_check_can_send_at_checkpoint``).
            await _checkpoint_if_cancelled()
            if self._closed or self._send_broken is not None or self._socket_gone():
                await _cancel_shielded_checkpoint()
                self.check_open()
                self._raise_if_broken()
            if self.manager.ring is None:
                await trio.lowlevel.wait_writable(self.fd)
                return
            if not self.queue.writable and not await self._wait_for_room():
                # send_all would send without the arena: wait for the socket.
                await trio.lowlevel.wait_writable(self.fd)
                return
            await _cancel_shielded_checkpoint()

    async def send_eof(self) -> None:
        """Send everything queued, then shut down the sending side
        (``shutdown(SHUT_WR)``); idempotent.

        Cancelled while the queue drains, it leaves the stream as it was:
        the queued bytes stay queued, in order, and sending may go on."""
        with self._sending_no_message():
            await _checkpoint_if_cancelled()
            if (
                self._eof_sent
                or self._send_broken is not None
                or self._closed
                or self._socket_gone()
            ):
                # Nothing to drain: EOF was sent, or the call fails at once.
                # A full checkpoint all the same, as send_all.
                await _cancel_shielded_checkpoint()
                self.check_open()
                if self._eof_sent:
                    return
                self._raise_if_broken()
            await self._drain()
            self._eof_sent = True
            try:
                self.socket.shutdown(_stdlib_socket.SHUT_WR)
            except OSError as exc:
                # A reset connection with nothing queued: the drain waited
                # for nothing.
                await _cancel_shielded_checkpoint()
                raise _stream_error(self, exc, "sending EOF") from exc
            await _cancel_shielded_checkpoint()

    @contextlib.contextmanager
    def _sending_no_message(self) -> Iterator[None]:
        """The send side, held (``BusyResourceError`` for a concurrent send)
        by a call that queues nothing of its own: ``aclose`` meanwhile still
        sends what is queued (``_busy_without_a_message``)."""
        with self._send_conflict:
            self._busy_without_a_message = True
            try:
                yield
            finally:
                self._busy_without_a_message = False

    # -- receiving --------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Receive up to ``max_bytes`` bytes; ``b""`` at end of stream.

        Bytes already waiting are taken with a plain nonblocking ``recv()``;
        otherwise an io_uring RECV waits for them (cancelled with
        ``ASYNC_CANCEL`` if the call is), so a cancelled call loses no data.
        """
        conflict = self._receive_conflict
        if conflict.busy:
            conflict.acquire()  # raises BusyResourceError
        conflict.busy = True
        try:
            if max_bytes is None:
                size = DEFAULT_RECEIVE_SIZE
            elif max_bytes.__class__ is int and 0 < max_bytes <= MAX_RECEIVE_SIZE:
                size = max_bytes
            else:
                try:
                    max_bytes = int(max_bytes.__index__())
                except AttributeError:
                    raise TypeError(
                        f"max_bytes must be an int, not {type(max_bytes).__name__}"
                    ) from None
                if max_bytes < 1:
                    raise ValueError("max_bytes must be >= 1")
                size = min(max_bytes, MAX_RECEIVE_SIZE)
            # A full checkpoint even when the call fails at once (a closed
            # stream, a reset connection), as trio's SocketStream, whose
            # socket recv() yields before it raises.
            await _checkpoint_if_cancelled()
            if self._closed:
                await _cancel_shielded_checkpoint()
                self.check_open()
            try:
                # Data already waiting is taken with one plain recv(): no
                # request, no completion, no scheduler round trip.  A socket
                # closed under the stream fails it (EBADF): it goes through
                # the stream's own socket object.
                try:
                    data = self.stdlib_socket.recv(size)
                except BlockingIOError:
                    return await self._receive_waiting(size)
                except OSError:
                    await _cancel_shielded_checkpoint()
                    raise
                await _cancel_shielded_checkpoint()
                return data
            except OSError as exc:
                raise _stream_error(self, exc, "receiving") from exc
        finally:
            conflict.busy = False

    async def __anext__(self) -> bytes:
        """``async for data in stream``: what ``receive_some()`` returns,
        until the end of the stream.

        trio's generic ``__anext__`` awaits ``receive_some()``; this one is
        ``receive_some()`` written out, so that each chunk costs one
        coroutine rather than two (about 2 % of an echo server's request).
        """
        conflict = self._receive_conflict
        if conflict.busy:
            conflict.acquire()  # raises BusyResourceError
        conflict.busy = True
        try:
            await _checkpoint_if_cancelled()
            if self._closed:
                await _cancel_shielded_checkpoint()
                self.check_open()
            try:
                try:
                    data = self.stdlib_socket.recv(DEFAULT_RECEIVE_SIZE)
                except BlockingIOError:
                    data = await self._receive_waiting(DEFAULT_RECEIVE_SIZE)
                except OSError:
                    await _cancel_shielded_checkpoint()
                    raise
                else:
                    await _cancel_shielded_checkpoint()
            except OSError as exc:
                raise _stream_error(self, exc, "receiving") from exc
        finally:
            conflict.busy = False
        if not data:
            raise StopAsyncIteration
        return data

    async def _receive_waiting(self, size: int) -> bytes:
        """Wait for bytes: an io_uring RECV (trio's ``recv`` without a ring)."""
        if self.manager.ring is None:
            return await self.socket.recv(size)
        self.check_open()  # the request names the fd number: still this socket's?
        if len(self._recv_buffer) < size:
            self._recv_buffer = ffi.new("char[]", size)
            self._recv_address = int(ffi.cast("uintptr_t", self._recv_buffer))
        res = await self.manager.submit(
            prep_recv, self.fd, self._recv_address, size, op=Operation(self)
        )
        self.check_open()
        return ffi.buffer(self._recv_buffer, check_result(res))[:]

    # -- lifetime ---------------------------------------------------------------

    async def aclose(self) -> None:
        """Send everything queued, then close the stream.

        Waits while the peer is not reading, like ``trio.SSLStream``'s
        graceful close; bound it with a timeout or use
        ``trio.aclose_forcefully`` where the peer may be gone.  Cancelled
        (``trio.aclose_forcefully``), it drops the queued bytes and closes at
        once, and so it does while another task is inside ``send_all``,
        ``reserve`` or ``send_file`` (that message is incomplete anyway; the
        other task gets ``ClosedResourceError``).  A task waiting in
        ``wait_send_all_might_not_block`` or ``send_eof`` queues nothing of
        its own: the queue is sent, and that task returns or gets
        ``ClosedResourceError``.  A stream whose sending side broke (a
        ``send_all`` cancelled part way, or failed) closes at once, as
        ``trio.SSLStream``'s does: the peer has a prefix of what was sent,
        and what is still queued is dropped.  Should another task close the
        stream meanwhile, this call returns: the stream is closed.  Requests
        in flight end with ``ClosedResourceError``.

        Raises ``BrokenResourceError`` if queued bytes were lost (the kernel
        failed them: a reset, ``EPIPE``; or other code closed the socket)
        and no other call has said so yet, so that a graceful close never
        loses data silently: wrap ``async with stream:`` in the ``try`` that
        handles the stream's errors.  It raises no such error when
        cancelled (its caller chose to drop what was queued), nor while an
        exception is handled or on its way out (in an ``except`` or
        ``finally`` block, or leaving an ``async with`` whose body raised),
        which it must not replace: Python cannot tell a ``finally`` that a
        ``Cancelled`` passes through from an ``except`` block, so both count.
        The stream is closed either way.  Slices of
        sends still awaiting notifications return to the arena when those
        arrive, after the socket is gone.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        lost: trio.BrokenResourceError | None = None
        try:
            if self._socket_gone():
                self._forget_socket()
            elif (
                self._send_broken is None
                and (not self._send_conflict.busy or self._busy_without_a_message)
                and (self.queue.nbytes or self.in_flight is not None)
            ):
                await _checkpoint_if_cancelled()
                try:
                    await self._drain()
                except trio.BrokenResourceError as exc:
                    lost = exc  # new: nothing was broken when the drain began
                except trio.ClosedResourceError:
                    if not self._closed:
                        raise
                    # Another task closed the stream meanwhile (a forceful
                    # close, or a second aclose): closed it is.
            if lost is None and self._error_unreported:
                lost = self._loss_error()
        finally:
            self._close_now()
        await trio.lowlevel.checkpoint()  # a cancelled close raises Cancelled here
        if lost is not None and sys.exc_info()[1] is None:
            raise lost

    def _loss_error(self) -> trio.BrokenResourceError:
        """What ``aclose`` raises for queued bytes lost without a word."""
        exc = self._send_broken
        assert exc is not None
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        error = trio.BrokenResourceError(f"queued bytes were not sent: {why}")
        error.__cause__ = exc
        return error

    def _close_now(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._error_unreported = False
        self.queue.clear()
        if not self._socket_gone():
            self.manager.cancel_fd(self.fd, self)
        elif not self._requests_cancelled:
            # Other code closed the socket: its fd number may be another
            # socket's by now, so the requests are cancelled one by one.
            self.manager.cancel_requests_of({self})
        self._requests_cancelled = True
        if self.bgid is not None:
            self.manager.unregister_buf_ring(self.bgid)
            self.bgid = None
        self.socket.close()
        self._wake()

    def stats(self) -> StreamStats:
        """Counts of sends and notifications so far, and the strategy in use."""
        c = self.counters
        return StreamStats(
            strategy=self.strategy.name,
            sends=c.sends,
            bytes_sent=c.bytes,
            bytes_copied=self.queue.copied,
            notifications=c.notifications,
            notifications_copied=c.copied,
            notifications_zerocopy=c.notifications - c.copied,
        )

    def setsockopt(self, level: int, option: int, value: int | bytes) -> None:
        """Set an option on the underlying socket (as ``trio.SocketStream``)."""
        self.socket.setsockopt(level, option, value)

    def getsockopt(self, level: int, option: int, buffersize: int = 0) -> Any:
        """Read an option of the underlying socket (as ``trio.SocketStream``)."""
        if buffersize == 0:
            return self.socket.getsockopt(level, option)
        return self.socket.getsockopt(level, option, buffersize)
