"""Ring: one io_uring instance, its SQ/CQ bookkeeping and the waiter table.

This layer knows nothing about trio or streams.  Every submission carries a
``user_data`` that names an entry in the waiter table; reaping a CQE calls
that entry's ``complete(res, flags)``, which returns True once the entry
expects no further CQEs (so multishot operations and zero-copy sends, which
post a notification after their result, stay in the table until they are
really finished).

SQEs are staged, not written into the ring one by one: ``push`` packs
each into a 64-byte image in the ring's staging buffer (one
``struct.Struct.pack_into``, laid out as ``struct io_uring_sqe`` in
_shim.h), and ``submit``/``submit_and_reap`` hand every staged image to the
shim in one call, which copies them into the SQ, enters the kernel once and
reaps.  A prepared request is thus one Python call, and a flush of many
streams one shim call.

Two kernel situations are handled here rather than surfaced as errors:

* a full SQ: the shim submits what the SQ holds and copies the rest after
  it; should the kernel take nothing, the CQ is drained and submission
  retried;
* a CQ overflow: with ``IORING_FEAT_NODROP`` the kernel keeps overflowed
  CQEs on a list and sets ``IORING_SQ_CQ_OVERFLOW``; reaping then calls
  ``io_uring_enter(GETEVENTS)`` to flush them into the CQ, so no completion
  is lost.
"""

from __future__ import annotations

import errno
import itertools
import os
import struct
from typing import Protocol

from . import _abi
from ._shim_cffi import ffi, lib

_REAP_BATCH = 256
_TRANSIENT_ENTER_ERRORS = (errno.EINTR, errno.EAGAIN, errno.EBUSY)
#: sq_flags saying the kernel holds completions not yet in the CQ.
_MORE_IN_KERNEL = _abi.IORING_SQ_CQ_OVERFLOW | _abi.IORING_SQ_TASKRUN

#: ``user_data`` of SQEs whose CQEs nobody waits for (cancel requests).
IGNORED_USER_DATA = 0
#: The kernel's limit on SQ entries (IORING_MAX_ENTRIES).
MAX_ENTRIES = 32768

#: The fields of ``struct io_uring_sqe`` in the order _shim.h declares them,
#: which is the order ``Ring.push`` and ``Ring.start`` pass them to the
#: packing Struct.
SQE_FIELDS = (
    "opcode",
    "flags",
    "ioprio",
    "fd",
    "off",
    "addr",
    "len",
    "op_flags",
    "user_data",
    "buf_index",
    "personality",
    "file_index",
    "addr3",
    "pad2",
)
_STRUCT_CODES = {"uint8_t": "B", "uint16_t": "H", "uint32_t": "I", "int32_t": "i", "uint64_t": "Q"}


def sqe_struct() -> struct.Struct:
    """The Struct that packs one SQE image, derived from the cffi declaration.

    _shim.h stays the one definition of the layout: each field's code and
    offset come from cffi, and any gap is padding.  Byte order and sizes are
    the host's, without alignment, as the kernel reads the SQE.  Raises
    ImportError when the declaration no longer matches ``SQE_FIELDS``, since
    ``push`` would then write fields into the wrong slots.
    """
    fields = ffi.typeof("struct io_uring_sqe").fields
    names = tuple(name for name, _ in fields)
    if names != SQE_FIELDS:
        raise ImportError(f"struct io_uring_sqe in _shim.h has fields {names}, not {SQE_FIELDS}")
    fmt, end = "=", 0
    for _, field in fields:
        if field.offset > end:
            fmt += f"{field.offset - end}x"
        fmt += _STRUCT_CODES[field.type.cname]
        end = field.offset + ffi.sizeof(field.type)
    size = ffi.sizeof("struct io_uring_sqe")
    if size > end:
        fmt += f"{size - end}x"
    packer = struct.Struct(fmt)
    if packer.size != size:
        raise ImportError(f"SQE Struct {fmt!r} packs {packer.size} bytes, not {size}")
    return packer


SQE_SIZE = ffi.sizeof("struct io_uring_sqe")
_pack_sqe = sqe_struct().pack_into


class Completion(Protocol):
    """An entry of the waiter table."""

    def complete(self, res: int, flags: int) -> bool:
        """Take one CQE; return True when no more CQEs will follow."""


def _closed_ring() -> RuntimeError:
    # The shim unmapped the rings: touching them would crash the process.
    return RuntimeError(
        "this io_uring ring is closed: nothing can be submitted to or reaped from it"
    )


class RingSetupError(OSError):
    """io_uring_setup (or mapping the ring) failed; ``errno`` says why."""


class Ring:
    """An io_uring instance owned by one thread.

    ``entries`` is the SQ size; the CQ is ``cq_entries`` (default: twice the
    SQ, as the kernel does).  ``flags`` are io_uring_setup flags; the caller
    decides them (``features().setup_flags`` is the probed best).  With
    ``IORING_SETUP_SQPOLL`` a kernel thread takes submissions from the SQ
    itself, and goes to sleep after ``sq_thread_idle`` ms without any;
    ``submit`` then enters the kernel only to wake it.
    """

    def __init__(
        self, entries: int = 256, *, cq_entries: int = 0, flags: int = 0, sq_thread_idle: int = 0
    ) -> None:
        if not isinstance(entries, int) or not 1 <= entries <= MAX_ENTRIES:
            raise ValueError(
                f"entries must be an int from 1 to {MAX_ENTRIES} (the submission queue "
                f"size; the kernel rounds it up to a power of two), not {entries!r}"
            )
        self._ring = ffi.new("struct tu_ring *")
        self.closed = True
        if cq_entries:
            flags |= _abi.IORING_SETUP_CQSIZE
        rc = lib.tu_setup(self._ring, entries, cq_entries, flags, sq_thread_idle)
        if rc < 0:
            raise RingSetupError(-rc, f"io_uring_setup failed: {os.strerror(-rc)}")
        self.closed = False
        self.fd: int = self._ring.fd
        self.features: int = self._ring.features
        self.sq_entries: int = self._ring.sq_entries
        self.cq_entries: int = self._ring.cq_entries
        self.table: dict[int, Completion] = {}
        self._next_user_data = itertools.count(1).__next__
        self._ud = ffi.new("uint64_t[]", _REAP_BATCH)
        self._res = ffi.new("int32_t[]", _REAP_BATCH)
        self._flags = ffi.new("uint32_t[]", _REAP_BATCH)
        # out[0]: staged images the shim copied into the SQ; out[1]: sq_flags.
        self._out = ffi.new("uint32_t[2]")
        # Staged SQE images, in submission order; grows when a batch
        # outgrows it.
        self._staging = ffi.new("struct io_uring_sqe[]", self.sq_entries)
        self._staging_view = ffi.buffer(self._staging)
        self._staging_capacity = self.sq_entries
        self._staged = 0
        # With DEFER_TASKRUN, completions wait for the task to enter the
        # kernel, and polling the ring fd does not wake anyone: an eventfd
        # registered with the ring is signalled instead.
        self._defer = bool(flags & _abi.IORING_SETUP_DEFER_TASKRUN)
        self._eventfd = -1
        if self._defer:
            try:
                self._eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            except OSError:
                self.close()
                raise
            arg = ffi.new("int *", self._eventfd)
            rc = lib.tu_register(self.fd, _abi.IORING_REGISTER_EVENTFD, arg, 1)
            if rc < 0:
                self.close()
                raise RingSetupError(-rc, f"registering an eventfd failed: {os.strerror(-rc)}")
        self._enter_flags = _abi.IORING_ENTER_GETEVENTS if self._defer else 0
        self.sqpoll = bool(flags & _abi.IORING_SETUP_SQPOLL)

    # -- submission -------------------------------------------------------

    @property
    def wait_fd(self) -> int:
        """The fd that becomes readable when completions may be waiting."""
        return self._eventfd if self._defer else self.fd

    @property
    def enter_calls(self) -> int:
        return int(self._ring.enter_calls)

    def push(
        self,
        opcode: int,
        fd: int,
        addr: int = 0,
        length: int = 0,
        off: int = 0,
        op_flags: int = 0,
        ioprio: int = 0,
        sqe_flags: int = 0,
        buf_index: int = 0,
        file_index: int = 0,
        user_data: int = IGNORED_USER_DATA,
    ) -> None:
        """Stage one SQE; the next ``submit`` or ``submit_and_reap`` hands it
        to the kernel, after every SQE staged before it."""
        if self.closed:
            raise _closed_ring()
        n = self._staged
        if n == self._staging_capacity:
            self._grow_staging()
        _pack_sqe(
            self._staging_view,
            n * SQE_SIZE,
            opcode,
            sqe_flags,
            ioprio,
            fd,
            off,
            addr,
            length,
            op_flags,
            user_data,
            buf_index,
            0,
            file_index,
            0,
            0,
        )
        self._staged = n + 1

    def start(
        self,
        entry: Completion,
        opcode: int,
        fd: int,
        addr: int = 0,
        length: int = 0,
        off: int = 0,
        op_flags: int = 0,
        ioprio: int = 0,
        sqe_flags: int = 0,
        buf_index: int = 0,
        file_index: int = 0,
    ) -> int:
        """Register ``entry`` in the table and stage its SQE; return its user_data."""
        user_data = self._next_user_data()
        self.push(
            opcode,
            fd,
            addr,
            length,
            off,
            op_flags,
            ioprio,
            sqe_flags,
            buf_index,
            file_index,
            user_data,
        )
        self.table[user_data] = entry
        return user_data

    def _grow_staging(self) -> None:
        old, capacity = self._staging, self._staging_capacity
        self._staging = ffi.new("struct io_uring_sqe[]", 2 * capacity)
        ffi.memmove(self._staging, old, capacity * SQE_SIZE)
        self._staging_view = ffi.buffer(self._staging)
        self._staging_capacity = 2 * capacity

    def _unstage(self, copied: int) -> None:
        """Drop the first ``copied`` staged images: the shim moved them into the SQ."""
        left = self._staged - copied
        if left:
            ffi.memmove(self._staging, self._staging + copied, left * SQE_SIZE)
        self._staged = left

    def submit(self) -> None:
        """Hand every staged SQE to the kernel, and any a short submit left
        in the SQ.  With SQPOLL, publish them to the kernel's thread instead."""
        if self.closed:
            raise _closed_ring()
        if self.sqpoll:
            self._publish_staged()
            return
        while True:
            rc = lib.tu_submit_staged(
                self._ring,
                self._staging,
                self._staged,
                self._enter_flags,
                self._ud,
                self._res,
                self._flags,
                0,
                self._out,
            )
            self._unstage(self._out[0])
            if rc >= 0:
                if not self._staged:
                    return
                # The SQ is full and the kernel took nothing: it refuses new
                # work until its overflow list drains.
                self.reap(force_enter=True)
                continue
            if -rc not in _TRANSIENT_ENTER_ERRORS:
                raise OSError(-rc, f"io_uring_enter failed: {os.strerror(-rc)}")
            if -rc != errno.EINTR:
                # EBUSY/EAGAIN: the CQ overflowed or the kernel is short of
                # memory; reaping makes room.  What is left stays staged.
                self.reap(force_enter=True)
                return

    def _publish_staged(self) -> None:
        """SQPOLL: copy the staged SQEs into the SQ and publish them, waking
        the kernel thread if it sleeps; while the SQ is full, wait for the
        thread to make room."""
        ring = self._ring
        while True:
            self._unstage(lib.tu_copy_staged(ring, self._staging, self._staged))
            lib.tu_publish_sq(ring)
            if lib.tu_sq_flags(ring) & _abi.IORING_SQ_NEED_WAKEUP:
                lib.tu_enter(ring, 0, 0, _abi.IORING_ENTER_SQ_WAKEUP)
            if not self._staged:
                return
            lib.tu_enter(ring, 0, 0, _abi.IORING_ENTER_SQ_WAKEUP | _abi.IORING_ENTER_SQ_WAIT)

    @property
    def sq_pending(self) -> int:
        """SQEs the kernel has not taken yet: staged, or left in the SQ."""
        if self.closed:
            raise _closed_ring()
        return self._staged + lib.tu_sq_pending(self._ring)

    # -- completion -------------------------------------------------------

    @property
    def cq_ready(self) -> int:
        """Completions waiting in the CQ."""
        if self.closed:
            raise _closed_ring()
        return lib.tu_cq_ready(self._ring)

    def _flush_kernel_side(self) -> None:
        rc = lib.tu_enter(self._ring, 0, 0, _abi.IORING_ENTER_GETEVENTS)
        if rc < 0 and -rc not in _TRANSIENT_ENTER_ERRORS:
            raise OSError(-rc, f"io_uring_enter(GETEVENTS) failed: {os.strerror(-rc)}")

    def _kernel_has_more(self) -> bool:
        return bool(lib.tu_sq_flags(self._ring) & _MORE_IN_KERNEL)

    def reap(self, *, force_enter: bool = False, run_task_work: bool = True) -> int:
        """Dispatch every available CQE to its table entry; return the count.

        Runs deferred task work and flushes the kernel's overflow list when
        the ring says there is some, so nothing the kernel completed is left
        behind.  ``run_task_work=False`` skips the syscall that runs
        DEFER_TASKRUN work, for callers that just entered the kernel.
        """
        if self.closed:
            raise _closed_ring()
        if run_task_work and self._eventfd >= 0:
            try:
                os.eventfd_read(self._eventfd)
            except BlockingIOError:
                pass
        if force_enter or (run_task_work and self._defer) or self._kernel_has_more():
            self._flush_kernel_side()
        total = 0
        while True:
            n = lib.tu_reap(self._ring, self._ud, self._res, self._flags, _REAP_BATCH)
            self._dispatch(n)
            total += n
            if n == _REAP_BATCH:
                continue
            if self._kernel_has_more():
                self._flush_kernel_side()
                if lib.tu_cq_ready(self._ring):
                    continue
            return total

    def submit_and_reap(self) -> None:
        """``submit`` then ``reap(run_task_work=False)``, in one shim call
        when nothing unusual happens: the path every request and every flush
        takes."""
        if self.closed:
            raise _closed_ring()
        if self.sqpoll:
            self.submit()
            self.reap(run_task_work=False)
            return
        out = self._out
        n = lib.tu_submit_staged(
            self._ring,
            self._staging,
            self._staged,
            self._enter_flags,
            self._ud,
            self._res,
            self._flags,
            _REAP_BATCH,
            out,
        )
        self._unstage(out[0])
        if n >= 0:
            more = n == _REAP_BATCH or out[1] & _MORE_IN_KERNEL
            self._dispatch(n)
            if not self._staged:
                if more:
                    self.reap(run_task_work=False)
                return
        # A transient enter error, or a full SQ the kernel took nothing
        # from: the general path retries and reaps.
        self.submit()
        self.reap(run_task_work=False)

    def _dispatch(self, n: int, start: int = 0) -> None:
        """Hand the reaped CQEs ``start`` to ``n`` to their table entries.

        The CQ head is already past them all, so should an entry's
        ``complete`` raise, the CQEs after its own are dispatched before the
        error propagates (a later entry's error propagates with the first
        as its context): they exist nowhere else, and their tasks would
        wait forever.  An entry that raised at its last CQE (no
        ``IORING_CQE_F_MORE``) leaves the table, as the kernel is done with
        it."""
        ud, res, flags, table = self._ud, self._res, self._flags, self.table
        i = start
        try:
            for i in range(start, n):
                user_data = ud[i]
                entry = table.get(user_data)
                if entry is not None and entry.complete(res[i], flags[i]):
                    del table[user_data]
        except BaseException:
            if not flags[i] & _abi.IORING_CQE_F_MORE:
                table.pop(ud[i], None)
            self._dispatch(n, i + 1)
            raise

    # -- registration -----------------------------------------------------

    def register(self, opcode: int, arg: object, nr_args: int) -> int:
        """io_uring_register; returns the result, ``-errno`` on failure."""
        return lib.tu_register(self.fd, opcode, arg, nr_args)

    def last_sqe(self) -> object:
        """The most recently staged SQE, a ``struct io_uring_sqe *`` into the
        staging buffer, valid until the next ``push`` or submit: for tests
        that check SQE bytes."""
        if not self._staged:
            raise IndexError("no SQE is staged")
        return self._staging + (self._staged - 1)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        # Staged SQEs go with the ring, as SQEs left in its SQ do.
        self._staged = 0
        lib.tu_close(self._ring)
        if self._eventfd >= 0:
            os.close(self._eventfd)
            self._eventfd = -1
