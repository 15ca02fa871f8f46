"""Send strategies: how published slices reach the kernel.

``send_all`` copies the caller's bytes into registered slices and publishes
them as entries of the stream's ``ProvidedRing``.  A strategy then sends
those entries in ring order and returns once the kernel accepted every byte.
Slices stay held by the batch's ``SliceLease`` until each send that read them
has delivered its notification.

==========================  =====================================================
``fixed-provided-bundle``   SEND_ZC + IOSQE_BUFFER_SELECT + FIXED_BUF|BUNDLE: the
                            kernel picks the published entries itself (kernels
                            with the provided-registered-buffers patchset)
``vectored-fixed``          SENDMSG_ZC + FIXED_BUF, one iovec per entry (6.15+)
``fixed-single``            one SEND_ZC + FIXED_BUF per entry (6.0+)
``copy``                    SENDMSG of the entries, the kernel copies them
``socket``                  trio socket sends: no io_uring at all
==========================  =====================================================
"""

from __future__ import annotations

import os
import socket as _stdlib_socket
from typing import TYPE_CHECKING, Protocol

from . import _abi
from ._buffers import ProvidedEntry, SliceLease
from ._manager import ZeroCopySend
from ._prep import prep_send, prep_send_zc, prep_sendmsg, prep_sendmsg_zc
from ._ring import Completion, Ring

if TYPE_CHECKING:
    from ._stream import ZeroCopyStream

#: Every send asks the kernel to finish the whole length (no short sends on
#: stream sockets except on error) and never to raise SIGPIPE.
SEND_MSG_FLAGS = _stdlib_socket.MSG_WAITALL | _stdlib_socket.MSG_NOSIGNAL

ZC_FIXED_FLAGS = _abi.IORING_RECVSEND_FIXED_BUF | _abi.IORING_SEND_ZC_REPORT_USAGE


def check_result(res: int) -> int:
    """A CQE's ``res`` as a count, or its ``-errno`` raised as ``OSError``."""
    if res < 0:
        raise OSError(-res, os.strerror(-res))
    return res


def remaining_after(entries: list[ProvidedEntry], sent: int) -> list[ProvidedEntry]:
    """The part of ``entries`` not covered by the first ``sent`` bytes."""
    out = []
    for e in entries:
        if sent >= e.length:
            sent -= e.length
            continue
        out.append(e._replace(offset=e.offset + sent, length=e.length - sent))
        sent = 0
    return out


class SendStrategy(Protocol):
    """Sends what is published on a stream's ring.

    Every request names the stream's fd, so before each one (a short send
    is continued with another) a strategy calls ``stream.check_open()``:
    once the socket is closed its fd number may already belong to another.
    """

    name: str
    zero_copy: bool

    async def send(self, stream: ZeroCopyStream, lease: SliceLease) -> None:
        """Send everything published on ``stream``'s ring."""


class VectoredFixed:
    """SENDMSG_ZC with ``IORING_RECVSEND_FIXED_BUF``: one SQE per batch.

    Every iovec lies inside the arena, which is one registered buffer, so the
    kernel skips page pinning; each short send (rare: MSG_WAITALL) is resent
    from where it stopped as a new request with its own notification.
    """

    name = "vectored-fixed"
    zero_copy = True

    async def send(self, stream: ZeroCopyStream, lease: SliceLease) -> None:
        arena = stream.manager.arena
        entries = stream.provided_ring.consume(arena)
        while entries:
            stream.check_open()
            msg = stream.fill_msghdr(entries)
            op = ZeroCopySend(lease, stream.counters)
            res = check_result(
                await stream.manager.submit(
                    prep_sendmsg_zc,
                    stream.fd,
                    msg,
                    SEND_MSG_FLAGS,
                    ZC_FIXED_FLAGS,
                    arena.buf_index,
                    op=op,
                )
            )
            stream.counters.sent(res)
            entries = remaining_after(entries, res)


async def send_fixed_entry(stream: ZeroCopyStream, lease: SliceLease, entry: ProvidedEntry) -> None:
    """Send one entry with SEND_ZC + FIXED_BUF, continuing short sends."""
    arena = stream.manager.arena
    offset, length = entry.offset, entry.length
    while length:
        stream.check_open()
        op = ZeroCopySend(lease, stream.counters)
        res = check_result(
            await stream.manager.submit(
                prep_send_zc,
                stream.fd,
                arena.base + offset,
                length,
                SEND_MSG_FLAGS,
                ZC_FIXED_FLAGS,
                entry.buf_index,
                op=op,
            )
        )
        stream.counters.sent(res)
        offset += res
        length -= res


class FixedSingle:
    """One SEND_ZC with ``IORING_RECVSEND_FIXED_BUF`` per entry, in order."""

    name = "fixed-single"
    zero_copy = True

    async def send(self, stream: ZeroCopyStream, lease: SliceLease) -> None:
        for entry in stream.provided_ring.consume(stream.manager.arena):
            await send_fixed_entry(stream, lease, entry)


class Copy:
    """SEND/SENDMSG of the published entries: the kernel copies them.

    Used where zero copy cannot work (AF_UNIX), is not available, or keeps
    being copied anyway.  A single entry goes out as SEND, which spares the
    kernel importing a msghdr (measured: the cheaper request on loopback).
    """

    name = "copy"
    zero_copy = False

    async def send(self, stream: ZeroCopyStream, lease: SliceLease) -> None:
        arena = stream.manager.arena
        entries = stream.provided_ring.consume(arena)
        while entries:
            stream.check_open()
            if len(entries) == 1:
                entry = entries[0]
                res = await stream.manager.submit(
                    prep_send, stream.fd, arena.base + entry.offset, entry.length, SEND_MSG_FLAGS
                )
            else:
                msg = stream.fill_msghdr(entries)
                res = await stream.manager.submit(prep_sendmsg, stream.fd, msg, SEND_MSG_FLAGS)
            stream.counters.sent(check_result(res))
            entries = remaining_after(entries, res)


class SocketSend:
    """trio's own socket sends of the published slices, one ``send`` each.

    The strategy without io_uring, and also where a stream goes when zero
    copy keeps being copied: measured here, a plain ``send()`` that
    completes at once costs about half an io_uring SEND request.  (One
    ``sendmsg`` per batch measured slower at 1 MiB than a ``send`` per
    slice: 0.86x trio against 1.10x.)
    """

    name = "socket"
    zero_copy = False

    async def send(self, stream: ZeroCopyStream, lease: SliceLease) -> None:
        view = stream.manager.arena.view
        for entry in stream.provided_ring.consume(stream.manager.arena):
            start, end = entry.offset, entry.offset + entry.length
            while start < end:
                res = await stream.socket.send(view[start:end])
                stream.counters.sent(res)
                start += res


class FixedProvidedBundle:
    """SEND_ZC that picks the stream's published fixed-provided entries itself.

    ``IOSQE_BUFFER_SELECT`` with ``IORING_RECVSEND_FIXED_BUF |
    IORING_RECVSEND_BUNDLE`` on the stream's buffer group: one SQE, no iovec,
    and the kernel resolves each entry's (buffer index, offset).  After a
    short send the kernel has consumed every entry it touched, including one
    it sent only in part, while the entries after it stay published.  The
    rest of that partly sent entry therefore goes out on its own (SEND_ZC
    from its address) before the next bundle send takes the others: never
    out of order, never twice.
    """

    name = "fixed-provided-bundle"
    zero_copy = True

    @staticmethod
    def prep(ring: Ring, op: Completion, fd: int, bgid: int) -> int:
        return prep_send_zc(
            ring,
            op,
            fd,
            0,
            0,
            SEND_MSG_FLAGS,
            ZC_FIXED_FLAGS | _abi.IORING_RECVSEND_BUNDLE,
            bgid,
            _abi.IOSQE_BUFFER_SELECT,
        )

    async def send(self, stream: ZeroCopyStream, lease: SliceLease) -> None:
        # The kernel consumes the entries itself; consume() keeps our head
        # in step with what it will have taken once everything is sent.
        entries = stream.provided_ring.consume(stream.manager.arena)
        while entries:
            stream.check_open()
            op = ZeroCopySend(lease, stream.counters)
            res = check_result(
                await stream.manager.submit(self.prep, stream.fd, stream.bgid, op=op)
            )
            stream.counters.sent(res)
            rest = remaining_after(entries, res)
            if rest and rest[0] != entries[len(entries) - len(rest)]:
                await send_fixed_entry(stream, lease, rest[0])
                rest = rest[1:]
            entries = rest


STRATEGY_IMPLS: dict[str, SendStrategy] = {
    s.name: s for s in (FixedProvidedBundle(), VectoredFixed(), FixedSingle(), Copy(), SocketSend())
}
