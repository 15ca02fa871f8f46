"""io_uring UAPI constants this project uses, named as the kernel names them.

This is the one place these numbers live.  The C shim takes them as arguments
(it only knows struct layouts, syscall numbers and mmap offsets), so the
build machine's ``<linux/io_uring.h>`` is never consulted.
"""

from __future__ import annotations

from typing import NamedTuple

# enum io_uring_op
IORING_OP_NOP = 0
IORING_OP_READ_FIXED = 4
IORING_OP_POLL_ADD = 6
IORING_OP_SENDMSG = 9
IORING_OP_ACCEPT = 13
IORING_OP_ASYNC_CANCEL = 14
IORING_OP_CONNECT = 16
IORING_OP_OPENAT = 18
IORING_OP_CLOSE = 19
IORING_OP_SEND = 26
IORING_OP_RECV = 27
IORING_OP_SPLICE = 30
IORING_OP_SHUTDOWN = 34
IORING_OP_SEND_ZC = 47
IORING_OP_SENDMSG_ZC = 48

OP_NAMES = {
    IORING_OP_NOP: "NOP",
    IORING_OP_READ_FIXED: "READ_FIXED",
    IORING_OP_POLL_ADD: "POLL_ADD",
    IORING_OP_SENDMSG: "SENDMSG",
    IORING_OP_ACCEPT: "ACCEPT",
    IORING_OP_ASYNC_CANCEL: "ASYNC_CANCEL",
    IORING_OP_CONNECT: "CONNECT",
    IORING_OP_OPENAT: "OPENAT",
    IORING_OP_CLOSE: "CLOSE",
    IORING_OP_SEND: "SEND",
    IORING_OP_RECV: "RECV",
    IORING_OP_SPLICE: "SPLICE",
    IORING_OP_SHUTDOWN: "SHUTDOWN",
    IORING_OP_SEND_ZC: "SEND_ZC",
    IORING_OP_SENDMSG_ZC: "SENDMSG_ZC",
}

# sqe->flags
IOSQE_BUFFER_SELECT = 1 << 5

# io_uring_setup flags
IORING_SETUP_SQPOLL = 1 << 1
IORING_SETUP_CQSIZE = 1 << 3
IORING_SETUP_SUBMIT_ALL = 1 << 7
IORING_SETUP_COOP_TASKRUN = 1 << 8
IORING_SETUP_TASKRUN_FLAG = 1 << 9
IORING_SETUP_SINGLE_ISSUER = 1 << 12
IORING_SETUP_DEFER_TASKRUN = 1 << 13

# io_uring_params.features
IORING_FEAT_SINGLE_MMAP = 1 << 0
IORING_FEAT_NODROP = 1 << 1

# io_uring_enter flags
IORING_ENTER_GETEVENTS = 1 << 0
IORING_ENTER_SQ_WAKEUP = 1 << 1
IORING_ENTER_SQ_WAIT = 1 << 2

# sq_flags in the shared ring
IORING_SQ_NEED_WAKEUP = 1 << 0
IORING_SQ_CQ_OVERFLOW = 1 << 1
IORING_SQ_TASKRUN = 1 << 2

# cqe->flags
IORING_CQE_F_BUFFER = 1 << 0
IORING_CQE_F_MORE = 1 << 1
IORING_CQE_F_SOCK_NONEMPTY = 1 << 2
IORING_CQE_F_NOTIF = 1 << 3
IORING_CQE_BUFFER_SHIFT = 16

# send/recv flags, carried in sqe->ioprio
IORING_RECVSEND_POLL_FIRST = 1 << 0
IORING_RECV_MULTISHOT = 1 << 1
IORING_RECVSEND_FIXED_BUF = 1 << 2
IORING_SEND_ZC_REPORT_USAGE = 1 << 3
IORING_RECVSEND_BUNDLE = 1 << 4

# the res of a send-zc notification, with IORING_SEND_ZC_REPORT_USAGE
IORING_NOTIF_USAGE_ZC_COPIED = 1 << 31

# accept flags, carried in sqe->ioprio
IORING_ACCEPT_MULTISHOT = 1 << 0

# openat(2)'s "relative to the current directory" (<linux/fcntl.h>); Python's
# os module does not export it.
AT_FDCWD = -100

# ioctl(2) on a TCP socket (<linux/sockios.h>): bytes in the send queue that
# have not been sent yet.  Python's socket module does not export it.
SIOCOUTQNSD = 0x894B

# sqe->splice_flags: the splice(2) SPLICE_F_* bits, plus io_uring's own
# flag saying splice_fd_in is an index into the registered file table.
SPLICE_F_MOVE = 1 << 0
SPLICE_F_NONBLOCK = 1 << 1
SPLICE_F_MORE = 1 << 2
SPLICE_F_FD_IN_FIXED = 1 << 31
#: sqe->off / sqe->splice_off_in for "no offset" (a pipe, or the file position).
SPLICE_NO_OFFSET = (1 << 64) - 1

# sqe->cancel_flags
IORING_ASYNC_CANCEL_ALL = 1 << 0
IORING_ASYNC_CANCEL_FD = 1 << 1
IORING_ASYNC_CANCEL_ANY = 1 << 2

# io_uring_register opcodes
IORING_REGISTER_BUFFERS = 0
IORING_UNREGISTER_BUFFERS = 1
IORING_REGISTER_EVENTFD = 4
IORING_REGISTER_PROBE = 8
IORING_REGISTER_PBUF_RING = 22
IORING_UNREGISTER_PBUF_RING = 23

# io_uring_probe_op.flags
IO_URING_OP_SUPPORTED = 1 << 0


# Fixed-provided buffer encoding of the seed patchset (an RFC, never merged):
# a provided-buffer entry's addr names (registered buffer index, offset)
# instead of a pointer, as addr = (offset << index_bits) | index.  Two splits
# exist and a kernel decodes exactly one of them, so ``_features`` probes
# which.  Keyed by the shift, ``index_bits``:
#
# - 32/32, the RFC as posted (include/uapi/linux/io_uring.h,
#   IOU_BUF_REGBUF_BITS = IOU_BUF_OFFSET_BITS = 32); its io_ubuf_from_buf()
#   keeps the index in a u16, so only 16 of the 32 index bits are honoured
#   and a larger index silently names another buffer.
# - 20/44, the split its author changed to after review.
class FixedProvidedSplit(NamedTuple):
    """One layout of a fixed-provided entry's addr."""

    name: str
    #: the shift: addr = (offset << index_bits) | index
    index_bits: int
    #: the largest registered buffer index the kernel decodes as written
    max_index: int
    #: the largest offset the addr can carry
    max_offset: int


FIXED_PROVIDED_SPLITS: dict[int, FixedProvidedSplit] = {
    20: FixedProvidedSplit("20/44", 20, (1 << 20) - 1, (1 << 44) - 1),
    32: FixedProvidedSplit("32/32", 32, (1 << 16) - 1, (1 << 32) - 1),
}
#: The split written where none was probed (no kernel reads the entries then;
#: the library decodes them itself, so any split works; 20/44 has the room).
FIXED_PROVIDED_DEFAULT_INDEX_BITS = 20

# Limits the kernel enforces that the library's policy has to respect.
MAX_BUF_RING_ENTRIES = 1 << 15
MAX_REGISTERED_BUFFER = 1 << 30
UIO_MAXIOV = 1024
