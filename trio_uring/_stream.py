"""ZeroCopyStream: a ``trio.abc.HalfCloseableStream`` over io_uring."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import operator
import socket as _stdlib_socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import trio

from . import _abi
from ._buffers import ProvidedEntry, ProvidedRing, SliceLease
from ._manager import IOManager, SendCounters, current_manager
from ._prep import prep_poll_add, prep_recv
from ._send import STRATEGY_IMPLS, SendStrategy, check_result
from ._sendfile import FileArg
from ._sendfile import send_file as _send_file
from ._shim_cffi import ffi
from ._util import ConflictDetector

#: As trio's SocketStream: the receive size when ``max_bytes`` is omitted.
DEFAULT_RECEIVE_SIZE = 65536
#: Consecutive "copied" zero-copy notifications after which a stream whose
#: strategy the library chose stops using zero copy, as the kernel's
#: MSG_ZEROCOPY documentation advises.
COPIED_SWITCH_THRESHOLD = 32
#: Where such a stream goes: plain nonblocking sends from the same slices.
#: Measured on loopback (4 KiB send_all): 0.60x trio against 0.47x staying
#: on zero copy and 0.49x with io_uring SEND ("copy"); echo 0.48x / 0.42x.
COPIED_FALLBACK_STRATEGY = "socket"
#: A stream may hold at most 1/STREAM_ARENA_SHARE of the arena's slices.
STREAM_ARENA_SHARE = 4
#: The most one receive asks the kernel for; ``receive_some`` may always
#: return less than ``max_bytes``, so larger requests are capped, not refused.
MAX_RECEIVE_SIZE = 4 * 1024 * 1024

_ZERO_COPY_FAMILIES = (_stdlib_socket.AF_INET, _stdlib_socket.AF_INET6)
_STREAM_FAMILIES = (*_ZERO_COPY_FAMILIES, _stdlib_socket.AF_UNIX)
_POLLOUT = 0x004


@dataclasses.dataclass(frozen=True)
class StreamStats:
    """What one stream has sent, and what the kernel said about it.

    ``notifications_copied`` counts send-zc notifications that carried
    ``IORING_NOTIF_USAGE_ZC_COPIED``: the kernel copied after all (loopback,
    veth, NICs without scatter-gather).  ``notifications_zerocopy`` counts
    the real zero-copy ones.

    A snapshot: notifications arrive after ``send_all`` has returned, so
    right after a send ``notifications`` may still trail ``sends``.  And
    once a stream whose strategy the library chose has left zero copy (the
    kernel kept copying), its later sends get no notification at all:
    ``strategy`` then reads ``"socket"`` and ``notifications < sends`` for good.
    """

    strategy: str
    sends: int
    bytes_sent: int
    notifications: int
    notifications_copied: int
    notifications_zerocopy: int


def _stream_error(
    stream: ZeroCopyStream, exc: OSError, what: str
) -> trio.ClosedResourceError | trio.BrokenResourceError:
    """The trio exception for ``exc``, raised ``from exc`` by the caller."""
    if exc.errno == errno.ECANCELED or stream._closed or stream._socket_gone():
        return trio.ClosedResourceError("the stream was closed while " + what)
    return trio.BrokenResourceError(f"{what} failed: {exc.strerror or exc}")


def _byte_view(data: object) -> memoryview:
    try:
        view = memoryview(data)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"send_all() needs a bytes-like object (bytes, bytearray, memoryview), "
            f"not {type(data).__name__}"
        ) from None
    if not view.c_contiguous:
        raise ValueError(
            "send_all() needs a contiguous buffer; pass bytes(view) or a "
            "contiguous copy of this strided memoryview"
        )
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


class ZeroCopyStream(trio.abc.HalfCloseableStream):
    """A TCP or Unix stream whose sends go through registered memory.

    ``send_all`` copies the data into registered slices of the run's arena,
    publishes them as provided-buffer entries and sends them with the best
    strategy the kernel supports (see ``trio_uring.features()``).  It returns
    as soon as the kernel has accepted every byte; the slices come back to
    the arena when the kernel's zero-copy notifications say it no longer
    reads them, so the caller's buffer is free at once, as with any trio
    stream.

    Semantics follow ``trio.SocketStream``: one task sends and one receives
    at a time (``trio.BusyResourceError`` otherwise); after ``aclose``,
    ``trio.ClosedResourceError``; network errors raise
    ``trio.BrokenResourceError`` with the ``OSError`` as ``__cause__``.

    Cancelling ``send_all`` leaves the stream *broken*: some prefix of the
    data may have been sent, so every later ``send_all`` raises
    ``BrokenResourceError``.  Receiving still works, and the slices the
    cancelled send used return to the arena once their notifications arrive.
    """

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
        self.fd: int = socket.fileno()
        self.manager: IOManager = current_manager()
        if socket.family in _ZERO_COPY_FAMILIES:
            with contextlib.suppress(OSError):
                socket.setsockopt(_stdlib_socket.IPPROTO_TCP, _stdlib_socket.TCP_NODELAY, True)
        self.strategy: SendStrategy = STRATEGY_IMPLS[self._choose_strategy()]
        # With the strategy left to the library, a zero-copy stream whose
        # notifications keep saying "copied" switches to plain sends: the
        # kernel copies anyway, and zero copy only adds its own overhead.
        self._adaptive = self.manager.adaptive and self.strategy.zero_copy
        arena = self.manager.arena
        # A stream holds at most a quarter of the arena: slices sent to a peer
        # that stopped reading stay pinned until it reads (or the connection
        # dies), and one stalled peer must not starve every other stream.
        self._slice_limit = max(1, arena.n_slices // STREAM_ARENA_SHARE)
        self._max_batch = min(self._slice_limit, _abi.UIO_MAXIOV)
        self._held = 0
        self._slices_returned = trio.lowlevel.ParkingLot()
        self._slice_wait: trio.CancelScope | None = None
        # At most one batch is published at a time.
        self.provided_ring = ProvidedRing(
            ProvidedRing.entries_for(self._max_batch),
            fixed=self.strategy.zero_copy,
        )
        self.bgid: int | None = None
        if self.manager.ring is not None:
            self.bgid = self.manager.register_buf_ring(
                self.provided_ring.address, self.provided_ring.entries
            )
        self.counters = SendCounters(self.manager.counters)
        self._iov = ffi.new("uint64_t[]", 2 * self._max_batch)
        self.msghdr = ffi.new("struct tu_msghdr *")
        self.msghdr.msg_iov = ffi.cast("struct tu_iovec *", self._iov)
        self._msghdr_address = int(ffi.cast("uintptr_t", self.msghdr))
        self._recv_buffer = ffi.new("char[]", 0)
        self._recv_address = 0
        self._closed = False
        self._eof_sent = False
        self._send_broken: BaseException | None = None
        self._send_conflict = ConflictDetector(
            "another task is currently sending data on this ZeroCopyStream"
        )
        self._receive_conflict = ConflictDetector(
            "another task is currently receiving data on this ZeroCopyStream"
        )

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

    # -- used by the strategies ---------------------------------------------

    def fill_msghdr(self, entries: list[ProvidedEntry]) -> int:
        """Point the stream's msghdr at ``entries``; return its address."""
        words, base, j = self._iov, self.manager.arena.base, 0
        for e in entries:
            words[j] = base + e.offset
            words[j + 1] = e.length
            j += 2
        self.msghdr.msg_iovlen = len(entries)
        return self._msghdr_address

    # -- sending --------------------------------------------------------------

    def _socket_gone(self) -> bool:
        """True once other code closed the socket: its fd number is stale and
        may already name another socket, so it must never be used again."""
        return self.socket.fileno() != self.fd

    def check_open(self) -> None:
        """Raise ``ClosedResourceError`` once the stream or its socket is closed."""
        if self._closed:
            raise trio.ClosedResourceError("this ZeroCopyStream was closed")
        if self._socket_gone():
            raise trio.ClosedResourceError(
                "the socket under this ZeroCopyStream was closed; close the stream with "
                "aclose() rather than closing its socket"
            )

    def _check_can_send(self) -> None:
        self.check_open()
        if self._eof_sent:
            raise trio.ClosedResourceError("can't send data after sending EOF")
        if self._send_broken is not None:
            raise trio.BrokenResourceError(
                "an earlier send_all on this stream failed or was cancelled part way; "
                "the peer may have received a prefix of that data, so the stream is broken"
            ) from self._send_broken

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data``; return when the kernel has accepted it.

        Waits while the arena has no free slice (backpressure): slices are
        freed by the kernel's notifications of earlier sends.
        """
        with self._send_conflict:
            view = _byte_view(data)
            self._check_can_send()
            if not view.nbytes:
                await trio.lowlevel.checkpoint()
                return
            await self._send_guarded(self._send_view, view)

    async def _send_guarded(self, send: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run a send; one that fails or is cancelled part way breaks the
        stream, since the peer may have received a prefix of the data."""
        try:
            await send(*args)
        except OSError as exc:
            if self._send_broken is None:
                self._send_broken = exc
            raise _stream_error(self, exc, "sending") from exc
        except BaseException as exc:
            if self._send_broken is None:
                self._send_broken = exc
            raise

    async def _lease(self, needed: int) -> SliceLease:
        """Slices for up to ``needed`` more slices of data, within this
        stream's share of the arena, waiting for them if there are none."""
        self.check_open()
        arena = self.manager.arena
        room = self._slice_limit - self._held
        slices = arena.acquire(min(needed, self._max_batch, room)) if room > 0 else []
        if not slices:
            slices = await self._wait_for_slices(needed)
        self._held += len(slices)
        return SliceLease(arena, slices, self._lease_released)

    async def _publish_and_send(self, lease: SliceLease, lengths: list[int]) -> None:
        if self._adaptive and self.counters.consecutive_copied >= COPIED_SWITCH_THRESHOLD:
            self.strategy = STRATEGY_IMPLS[COPIED_FALLBACK_STRATEGY]
            self._adaptive = False
        self.provided_ring.publish(self.manager.arena, lease.slices, lengths)
        await self.strategy.send(self, lease)

    async def _send_view(self, view: memoryview) -> None:
        arena = self.manager.arena
        slice_size = arena.slice_size
        arena_view = arena.view
        total = view.nbytes
        pos = 0
        while pos < total:
            lease = await self._lease(-(-(total - pos) // slice_size))
            try:
                lengths = []
                for slice_id in lease.slices:
                    n = min(slice_size, total - pos)
                    offset = slice_id * slice_size
                    arena_view[offset : offset + n] = view[pos : pos + n]
                    lengths.append(n)
                    pos += n
                await self._publish_and_send(lease, lengths)
            finally:
                lease.seal()

    @contextlib.asynccontextmanager
    async def reserve(self, nbytes: int) -> AsyncIterator[memoryview]:
        """Write ``nbytes`` straight into registered memory, then send them.

        ::

            async with stream.reserve(4096) as view:
                view[:] = produce()        # or sock.recv_into(view), file.readinto(view)

        The block gets a writable memoryview of one arena slice; when it
        ends normally, all ``nbytes`` are sent as by ``send_all``.  Data
        produced in place is never copied in user space, which is what makes
        zero copy a saving rather than a second copy.  ``nbytes`` is at most
        the manager's ``slice_size``: send larger data in pieces, or open the
        manager with larger slices.

        The whole block counts as a send in progress (``BusyResourceError``
        for a concurrent ``send_all``).  Entering it is a cancellation point
        and may wait for a free slice; the send at the end is a checkpoint.
        If the block raises, nothing is sent and the stream stays usable; a
        send that fails or is cancelled breaks the stream, as with
        ``send_all``.  The view is released when the block ends: keep no
        other reference to it, because the slice is reused afterwards.
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
            self._check_can_send()
            await trio.lowlevel.checkpoint_if_cancelled()
            lease = await self._lease(1)
            offset = lease.slices[0] * slice_size
            view = self.manager.arena.view[offset : offset + nbytes]
            try:
                try:
                    yield view
                finally:
                    view.release()
            except BufferError:
                # Something still exports the view and could write into the
                # slice later: it must never go back to the arena.  It no
                # longer counts against this stream's share either.
                self._held -= 1
                raise RuntimeError(
                    "an object made from the reserve() view (numpy.frombuffer, "
                    "ffi.from_buffer) was still alive when the block ended; drop it inside "
                    "the block. The slice is retired and nothing was sent"
                ) from None
            except BaseException:
                lease.seal()
                raise
            try:
                self._check_can_send()
                await self._send_guarded(self._publish_and_send, lease, [nbytes])
            finally:
                lease.seal()

    async def send_file(self, file: FileArg, offset: int = 0, count: int | None = None) -> int:
        """Send ``count`` bytes of a file from ``offset`` (to its end if
        ``count`` is None); return how many were sent.

        ``file`` is a path, a file object with ``fileno()`` or an fd, of a
        regular file; ``offset`` is absolute, and a file object's position
        is neither used nor moved.  The bytes never pass through Python,
        and with io_uring the event loop never waits for the disk: large
        counts are spliced file -> pipe -> socket, small ones read into
        registered slices.  Returns once every byte is handed to the kernel.
        """
        return await _send_file(self, file, offset, count)

    async def _drain(self) -> None:
        """Send everything queued; return when the kernel has accepted it."""
        await trio.lowlevel.checkpoint()

    async def _wait_for_slices(self, needed: int) -> list[int]:
        """Backpressure: wait until this stream may hold more slices and the
        arena has some.  ``aclose`` from another task ends the wait."""
        with trio.CancelScope() as scope:
            self._slice_wait = scope
            try:
                while self._held >= self._slice_limit:
                    await self._slices_returned.park()
                wanted = min(needed, self._max_batch, self._slice_limit - self._held)
                return await self.manager.acquire_slices(wanted)
            finally:
                self._slice_wait = None
        raise trio.ClosedResourceError("the stream was closed while send_all waited for slices")

    def _lease_released(self, lease: SliceLease) -> None:
        self._held -= len(lease.slices)
        self._slices_returned.unpark_all()

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until the socket has room (a checkpoint)."""
        with self._send_conflict:
            self.check_open()
            if self.manager.ring is None:
                await self.socket.wait_writable()
                return
            res = await self.manager.submit(prep_poll_add, self.fd, _POLLOUT)
            if res < 0 and self._closed:
                raise trio.ClosedResourceError("the stream was closed while waiting")

    async def send_eof(self) -> None:
        """Shut down the sending side (``shutdown(SHUT_WR)``); idempotent."""
        with self._send_conflict:
            await trio.lowlevel.checkpoint()
            self.check_open()
            if self._eof_sent:
                return
            self._eof_sent = True
            try:
                self.socket.shutdown(_stdlib_socket.SHUT_WR)
            except OSError as exc:
                raise _stream_error(self, exc, "sending EOF") from exc

    # -- receiving --------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Receive up to ``max_bytes`` bytes; ``b""`` at end of stream."""
        with self._receive_conflict:
            if max_bytes is None:
                max_bytes = DEFAULT_RECEIVE_SIZE
            else:
                try:
                    max_bytes = int(max_bytes.__index__())
                except AttributeError:
                    raise TypeError(
                        f"max_bytes must be an int, not {type(max_bytes).__name__}"
                    ) from None
                if max_bytes < 1:
                    raise ValueError("max_bytes must be >= 1")
            self.check_open()
            size = min(max_bytes, MAX_RECEIVE_SIZE)
            try:
                if self.manager.ring is None:
                    return await self.socket.recv(size)
                if len(self._recv_buffer) < size:
                    self._recv_buffer = ffi.new("char[]", size)
                    self._recv_address = int(ffi.cast("uintptr_t", self._recv_buffer))
                res = await self.manager.submit(prep_recv, self.fd, self._recv_address, size)
                self.check_open()
                return ffi.buffer(self._recv_buffer, check_result(res))[:]
            except OSError as exc:
                raise _stream_error(self, exc, "receiving") from exc

    # -- lifetime ---------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the stream; requests in flight end with ClosedResourceError.

        Slices of sends still awaiting notifications are returned to the
        arena when those arrive, after the socket is gone.
        """
        if not self._closed:
            self._closed = True
            if self._slice_wait is not None:
                self._slice_wait.cancel()
            if not self._socket_gone():
                self.manager.cancel_fd(self.fd)
            if self.bgid is not None:
                self.manager.unregister_buf_ring(self.bgid)
                self.bgid = None
            self.socket.close()
        await trio.lowlevel.checkpoint()

    def stats(self) -> StreamStats:
        """Counts of sends and notifications so far, and the strategy in use."""
        c = self.counters
        return StreamStats(
            strategy=self.strategy.name,
            sends=c.sends,
            bytes_sent=c.bytes,
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
