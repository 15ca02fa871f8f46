"""Send strategies: how a stream's outbound queue reaches the kernel.

``send_all`` copies bytes into the stream's ``OutboundQueue`` and returns;
once per scheduler tick (or when a queue passes its threshold) the manager
asks each stream's strategy to ``flush`` it: to prepare one request covering
the queued bytes.  Every prepared request goes to the kernel in the same
``io_uring_enter``.  A stream has at most one send request in flight, so its
bytes can never overtake each other; what a short send leaves goes back to
the front of the queue.

==========================  =====================================================
``fixed-provided-bundle``   queued runs published as fixed-provided entries, then
                            SEND_ZC + IOSQE_BUFFER_SELECT + FIXED_BUF|BUNDLE: the
                            kernel picks them itself (kernels with the
                            provided-registered-buffers patchset)
``vectored-fixed``          SENDMSG_ZC + FIXED_BUF, one iovec per queued run (6.15+)
``fixed-single``            SEND_ZC + FIXED_BUF of the contiguous runs at the front
``copy``                    plain nonblocking ``send()`` of the queue (the kernel
                            copies); what the socket cannot take now goes to an
                            io_uring SEND that completes when it drains.  Large
                            payloads skip the copy: sent from the caller's buffer,
                            or, for ``bytes`` in a flow, queued by reference
``socket``                  no io_uring: every ``send_all`` sends from the caller's
                            buffer itself, waiting for writability in between
==========================  =====================================================
"""

from __future__ import annotations

import itertools
import socket as _stdlib_socket
import sys
from typing import TYPE_CHECKING, Protocol

from . import _abi
from ._prep import prep_send, prep_send_zc, prep_sendmsg, prep_sendmsg_zc
from ._queue import Segment

if TYPE_CHECKING:
    from ._stream import ZeroCopyStream

#: Every request asks the kernel to finish the whole length (no short sends
#: on stream sockets except on error) and never to raise SIGPIPE.
SEND_MSG_FLAGS = _stdlib_socket.MSG_WAITALL | _stdlib_socket.MSG_NOSIGNAL

ZC_FIXED_FLAGS = _abi.IORING_RECVSEND_FIXED_BUF | _abi.IORING_SEND_ZC_REPORT_USAGE

#: ``send_all`` payloads at least this large skip the queue under the
#: copying strategies and are sent from the caller's buffer: the kernel
#: copies them anyway, so a copy into slices would be a second one.
DIRECT_SEND_MIN = 64 * 1024

_NEVER = sys.maxsize
_MSG_NOSIGNAL = _stdlib_socket.MSG_NOSIGNAL


class SendRequest:
    """One send request of a stream: its result CQE, then (zero copy) a
    notification CQE.  The segments it read stay counted until the kernel
    says it is done with them: at the notification, or at the result when
    none will follow (no ``IORING_CQE_F_MORE``)."""

    __slots__ = ("nbytes", "segments", "stream")

    def __init__(self, stream: ZeroCopyStream, segments: list[Segment]) -> None:
        self.stream = stream
        self.segments = segments
        self.nbytes = sum(s[1] for s in segments)

    def complete(self, res: int, flags: int) -> bool:
        stream = self.stream
        if flags & _abi.IORING_CQE_F_NOTIF:
            stream.notified(bool(res & _abi.IORING_NOTIF_USAGE_ZC_COPIED))
            stream.queue.release(self.segments)
            return True
        self.sent(res)
        if flags & _abi.IORING_CQE_F_MORE:
            return False
        stream.queue.release(self.segments)
        return True

    def sent(self, res: int) -> None:
        self.stream.send_completed(self, res)

    @property
    def owner(self) -> ZeroCopyStream:
        """The stream (``SocketOwner``): a task may wait on the result, or
        for the slices the notification gives back."""
        return self.stream


class SendStrategy(Protocol):
    """Turns a stream's queued bytes into one request.

    ``flush`` is called only while the stream has queued bytes and no send
    in flight; it prepares an SQE (``stream.begin`` records the request) or
    sends at once, and raises ``OSError`` for an error of the socket.  A
    flush that raises after taking segments from the queue releases them
    first: the stream then fails, and nothing else would.
    ``direct_min`` is the payload size from which ``send_all`` skips the
    queue and sends from the caller's buffer.  ``sends_at_once``: a small
    message of a stream that is not in a flow of messages goes out with a
    plain ``send()`` inside ``send_all`` instead of waiting for the flush.
    ``holds_bytes``: the kernel copies at send time, so a flow of such large
    ``bytes`` payloads is queued by reference (``OutboundQueue.hold``) and
    goes out several per ``send()``: the flush reads segments through
    ``segment_view`` / ``segment_address``.  ``after_plain_sends``: the
    strategy a stream moves to when its socket gets bytes without a request
    of its own (plain ``send()`` calls when other streams hold every slice,
    a ``send_file`` splice, or unsent bytes written before it was wrapped),
    or None when this one mixes with them.
    """

    name: str
    zero_copy: bool
    direct_min: int
    sends_at_once: bool
    holds_bytes: bool
    after_plain_sends: str | None

    def flush(self, stream: ZeroCopyStream) -> None:
        """Hand the front of ``stream``'s queue to the kernel."""


class VectoredFixed:
    """SENDMSG_ZC with ``IORING_RECVSEND_FIXED_BUF``: one SQE for the whole
    queue.  Every iovec lies inside the arena, one registered buffer, so the
    kernel skips pinning pages."""

    name = "vectored-fixed"
    zero_copy = True
    direct_min = _NEVER
    sends_at_once = False
    holds_bytes = False
    after_plain_sends = None

    def flush(self, stream: ZeroCopyStream) -> None:
        segments = stream.queue.take(_abi.UIO_MAXIOV)
        request = SendRequest(stream, segments)
        try:
            prep_sendmsg_zc(
                stream.manager.ring,
                request,
                stream.fd,
                stream.fill_msghdr(segments),
                SEND_MSG_FLAGS,
                ZC_FIXED_FLAGS,
                stream.manager.arena.buf_index,
            )
        except BaseException:
            stream.queue.release(segments)
            raise
        stream.begin(request)


def send_fixed_run(stream: ZeroCopyStream, request: SendRequest) -> None:
    """Prepare SEND_ZC + FIXED_BUF of ``request``, one contiguous arena range."""
    arena = stream.manager.arena
    try:
        prep_send_zc(
            stream.manager.ring,
            request,
            stream.fd,
            arena.base + request.segments[0][0],
            request.nbytes,
            SEND_MSG_FLAGS,
            ZC_FIXED_FLAGS,
            arena.buf_index,
        )
    except BaseException:
        stream.queue.release(request.segments)
        raise
    stream.begin(request)


class FixedSingle:
    """SEND_ZC with ``IORING_RECVSEND_FIXED_BUF`` of the queued runs that lie
    back to back in the arena (usually all of them: slices are handed out
    in order); the rest goes in the next request."""

    name = "fixed-single"
    zero_copy = True
    direct_min = _NEVER
    sends_at_once = False
    holds_bytes = False
    after_plain_sends = None

    def flush(self, stream: ZeroCopyStream) -> None:
        send_fixed_run(stream, SendRequest(stream, stream.queue.take_run()))


class _BundleRequest(SendRequest):
    """A bundle send: the kernel consumed every entry it touched."""

    __slots__ = ()

    def sent(self, res: int) -> None:
        stream = self.stream
        if res >= 0:
            consumed, rest = 0, res
            for seg in self.segments:
                if rest <= 0:
                    break
                consumed += 1
                rest -= seg[1]
            stream.provided_ring.advance(consumed)
            # An entry sent in part has been consumed all the same: what is
            # left of it must go out on its own, before the next bundle.
            stream.unpublished_head = rest < 0
        stream.send_completed(self, res)


class _HeadRequest(SendRequest):
    """The rest of an entry a short bundle send consumed in part."""

    __slots__ = ()

    def sent(self, res: int) -> None:
        self.stream.unpublished_head = 0 <= res < self.nbytes
        self.stream.send_completed(self, res)


class FixedProvidedBundle:
    """SEND_ZC that picks the stream's published fixed-provided entries itself.

    ``IOSQE_BUFFER_SELECT`` with ``IORING_RECVSEND_FIXED_BUF |
    IORING_RECVSEND_BUNDLE`` on the stream's buffer group: one SQE, no
    iovec; the kernel resolves each entry's (buffer index, offset).  Entries
    are published only here, at flush time, one per queued run.  After a
    short send the kernel has consumed every entry it touched, including one
    it sent in part, while the entries after it stay published: the rest of
    the partly sent entry goes out on its own (SEND_ZC from its address)
    before the next bundle takes the others.  Never out of order, never twice.
    """

    name = "fixed-provided-bundle"
    zero_copy = True
    direct_min = _NEVER
    sends_at_once = False
    holds_bytes = False
    #: The seed patchset gives an entry that starts exactly one page into
    #: the registered buffer a zero-length first segment, and TCP fails the
    #: send with EFAULT when it appends such a bundle to unsent bytes that
    #: plain ``send()`` calls or a splice left in the socket
    #: (docs/kernel-support.rst, and the guest's
    #: ``test_bundles_after_plain_sends_arrive_intact``).
    #: ``fixed-single`` names its slices in the SQE, and stays zero copy.
    after_plain_sends = "fixed-single"

    def flush(self, stream: ZeroCopyStream) -> None:
        queue, ring = stream.queue, stream.provided_ring
        if stream.unpublished_head:
            send_fixed_run(stream, _HeadRequest(stream, queue.take(1)))
            return
        segments = queue.take(ring.entries)
        request = _BundleRequest(stream, segments)
        try:
            # Entries a short send left published lead the queue: publish the rest.
            ring.publish(stream.manager.arena, segments[ring.published :])
            prep_send_zc(
                stream.manager.ring,
                request,
                stream.fd,
                0,
                0,
                SEND_MSG_FLAGS,
                ZC_FIXED_FLAGS | _abi.IORING_RECVSEND_BUNDLE,
                stream.bgid,
                _abi.IOSQE_BUFFER_SELECT,
            )
        except BaseException:
            queue.release(segments)
            raise
        stream.begin(request)


def send_now(stream: ZeroCopyStream) -> None:
    """Plain nonblocking ``send()``/``sendmsg()`` of the queue, until it is
    empty or the socket is full."""
    queue, sock = stream.queue, stream.stdlib_socket
    unsent = queue.unsent
    while unsent:
        try:
            if len(unsent) == 1:
                offered = unsent[0][1]
                sent = sock.send(queue.segment_view(unsent[0]), _MSG_NOSIGNAL)
            else:
                views = queue.views(_abi.UIO_MAXIOV)
                offered = (
                    queue.nbytes
                    if len(views) == len(unsent)
                    else sum(s[1] for s in itertools.islice(unsent, len(views)))
                )
                sent = sock.sendmsg(views, (), _MSG_NOSIGNAL)
        except BlockingIOError:
            return
        queue.consume(sent)
        stream.counters.sent(sent)
        if sent < offered:
            return


class Copy:
    """Plain nonblocking ``send()``/``sendmsg()`` of the queue: the kernel copies.

    Used where zero copy cannot work (AF_UNIX), or where a stream left it
    because the kernel kept copying (loopback, veth, NICs without
    scatter-gather).  Measured on loopback, a ``send()`` that completes at
    once costs about half an io_uring SEND request, and it needs no
    completion.  What the socket cannot take now goes to an io_uring SEND
    (or SENDMSG) with ``MSG_WAITALL``: the kernel finishes it when the
    socket drains, and no task has to wait for that.
    """

    name = "copy"
    zero_copy = False
    direct_min = DIRECT_SEND_MIN
    sends_at_once = True
    holds_bytes = True
    after_plain_sends = None

    def flush(self, stream: ZeroCopyStream) -> None:
        send_now(stream)
        if not stream.queue.nbytes:
            return
        segments = stream.queue.take(_abi.UIO_MAXIOV)
        request = SendRequest(stream, segments)
        ring = stream.manager.ring
        try:
            if len(segments) == 1:
                address = stream.queue.segment_address(segments[0])
                prep_send(ring, request, stream.fd, address, request.nbytes, SEND_MSG_FLAGS)
            else:
                prep_sendmsg(ring, request, stream.fd, stream.fill_msghdr(segments), SEND_MSG_FLAGS)
        except BaseException:
            stream.queue.release(segments)
            raise
        stream.begin(request)


class SocketSend:
    """No io_uring: ``send_all`` sends from the caller's buffer with plain
    nonblocking ``send()`` calls, waiting for writability when the kernel
    pushes back, one trio checkpoint per ``send_all``.  Only ``reserve()``
    queues bytes; the stream drains them inline with ``flush``, waiting for
    writability between calls."""

    name = "socket"
    zero_copy = False
    direct_min = 0
    sends_at_once = True
    holds_bytes = False
    after_plain_sends = None

    def flush(self, stream: ZeroCopyStream) -> None:
        send_now(stream)


STRATEGY_IMPLS: dict[str, SendStrategy] = {
    s.name: s for s in (FixedProvidedBundle(), VectoredFixed(), FixedSingle(), Copy(), SocketSend())
}
