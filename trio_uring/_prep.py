"""One small function per io_uring operation, as liburing has.

Each registers ``entry`` in the ring's waiter table, stages one SQE with the
fields that operation uses (``Ring.start``: one ``pack_into``, no C call)
and returns the SQE's ``user_data``.  No policy lives here: which flags to
pass is the caller's decision.

The sends, which every flush prepares, pass the SQE fields by position, in
``Ring.start``'s order (addr, length, off, op_flags, ioprio, sqe_flags,
buf_index): keywords cost a few hundred instructions per call there.
"""

from __future__ import annotations

from . import _abi
from ._ring import Completion, Ring


def prep_nop(ring: Ring, entry: Completion) -> int:
    return ring.start(entry, _abi.IORING_OP_NOP, -1)


def prep_send(
    ring: Ring, entry: Completion, fd: int, addr: int, length: int, msg_flags: int
) -> int:
    return ring.start(entry, _abi.IORING_OP_SEND, fd, addr, length, 0, msg_flags)


def prep_recv(
    ring: Ring,
    entry: Completion,
    fd: int,
    addr: int,
    length: int,
    msg_flags: int = 0,
    *,
    ioprio: int = 0,
    sqe_flags: int = 0,
    buf_group: int = 0,
) -> int:
    return ring.start(
        entry,
        _abi.IORING_OP_RECV,
        fd,
        addr=addr,
        length=length,
        op_flags=msg_flags,
        ioprio=ioprio,
        sqe_flags=sqe_flags,
        buf_index=buf_group,
    )


def prep_send_zc(
    ring: Ring,
    entry: Completion,
    fd: int,
    addr: int,
    length: int,
    msg_flags: int,
    zc_flags: int = 0,
    buf_index: int = 0,
    sqe_flags: int = 0,
) -> int:
    """SEND_ZC; ``zc_flags`` are IORING_RECVSEND_* / IORING_SEND_ZC_* bits.

    With ``IOSQE_BUFFER_SELECT`` in ``sqe_flags``, ``buf_index`` is the
    buffer group to pick from (the SQE field is a union).
    """
    return ring.start(
        entry,
        _abi.IORING_OP_SEND_ZC,
        fd,
        addr,
        length,
        0,
        msg_flags,
        zc_flags,
        sqe_flags,
        buf_index,
    )


def prep_sendmsg(ring: Ring, entry: Completion, fd: int, msghdr: int, msg_flags: int) -> int:
    return ring.start(entry, _abi.IORING_OP_SENDMSG, fd, msghdr, 1, 0, msg_flags)


def prep_sendmsg_zc(
    ring: Ring,
    entry: Completion,
    fd: int,
    msghdr: int,
    msg_flags: int,
    zc_flags: int = 0,
    buf_index: int = 0,
) -> int:
    return ring.start(
        entry, _abi.IORING_OP_SENDMSG_ZC, fd, msghdr, 1, 0, msg_flags, zc_flags, 0, buf_index
    )


def prep_accept(
    ring: Ring, entry: Completion, fd: int, accept_flags: int, multishot: bool = False
) -> int:
    ioprio = _abi.IORING_ACCEPT_MULTISHOT if multishot else 0
    return ring.start(entry, _abi.IORING_OP_ACCEPT, fd, op_flags=accept_flags, ioprio=ioprio)


def prep_connect(ring: Ring, entry: Completion, fd: int, sockaddr: int, addrlen: int) -> int:
    return ring.start(entry, _abi.IORING_OP_CONNECT, fd, addr=sockaddr, off=addrlen)


def prep_poll_add(ring: Ring, entry: Completion, fd: int, poll_mask: int) -> int:
    return ring.start(entry, _abi.IORING_OP_POLL_ADD, fd, op_flags=poll_mask)


def prep_read_fixed(
    ring: Ring, entry: Completion, fd: int, addr: int, length: int, offset: int, buf_index: int
) -> int:
    return ring.start(
        entry,
        _abi.IORING_OP_READ_FIXED,
        fd,
        addr=addr,
        length=length,
        off=offset,
        buf_index=buf_index,
    )


def prep_splice(
    ring: Ring,
    entry: Completion,
    fd_in: int,
    off_in: int,
    fd_out: int,
    off_out: int,
    nbytes: int,
    splice_flags: int = 0,
    sqe_flags: int = 0,
) -> int:
    """SPLICE ``nbytes`` from ``fd_in`` to ``fd_out``; one of them a pipe.

    An offset of -1 means "none" (required for the pipe end; for a file it
    means its current position).  The kernel always runs a splice in its
    io-wq workers, so a splice that waits for the disk or the socket never
    blocks the submitting thread.
    """
    return ring.start(
        entry,
        _abi.IORING_OP_SPLICE,
        fd_out,
        addr=off_in & _abi.SPLICE_NO_OFFSET,  # sqe->splice_off_in
        length=nbytes,
        off=off_out & _abi.SPLICE_NO_OFFSET,
        op_flags=splice_flags,  # sqe->splice_flags
        sqe_flags=sqe_flags,
        file_index=fd_in,  # sqe->splice_fd_in
    )


def prep_openat(
    ring: Ring, entry: Completion, dfd: int, path: int, open_flags: int, mode: int = 0
) -> int:
    """OPENAT of the NUL-terminated path at address ``path``; res is the new fd.

    The path's memory must stay alive until the CQE: the kernel may copy it
    only when a worker runs the request.
    """
    return ring.start(
        entry, _abi.IORING_OP_OPENAT, dfd, addr=path, length=mode, op_flags=open_flags
    )


def prep_close(ring: Ring, entry: Completion, fd: int) -> int:
    return ring.start(entry, _abi.IORING_OP_CLOSE, fd)


def prep_cancel(ring: Ring, target_user_data: int, cancel_flags: int = 0) -> None:
    """ASYNC_CANCEL of one request; its own CQE is ignored."""
    ring.push(_abi.IORING_OP_ASYNC_CANCEL, -1, addr=target_user_data, op_flags=cancel_flags)


def prep_cancel_fd(ring: Ring, fd: int) -> None:
    """ASYNC_CANCEL of every request on ``fd``; its own CQE is ignored."""
    ring.push(
        _abi.IORING_OP_ASYNC_CANCEL,
        fd,
        op_flags=_abi.IORING_ASYNC_CANCEL_FD | _abi.IORING_ASYNC_CANCEL_ALL,
    )


def prep_cancel_any(ring: Ring) -> None:
    """ASYNC_CANCEL of every request in the ring (shutdown)."""
    ring.push(_abi.IORING_OP_ASYNC_CANCEL, -1, op_flags=_abi.IORING_ASYNC_CANCEL_ANY)
