"""Ring: one io_uring instance, its SQ/CQ bookkeeping and the waiter table.

This layer knows nothing about trio or streams.  Every submission carries a
``user_data`` that names an entry in the waiter table; reaping a CQE calls
that entry's ``complete(res, flags)``, which returns True once the entry
expects no further CQEs (so multishot operations and zero-copy sends, which
post a notification after their result, stay in the table until they are
really finished).

Two kernel situations are handled here rather than surfaced as errors:

* a full SQ: the pending SQEs are submitted and preparation retried;
* a CQ overflow: with ``IORING_FEAT_NODROP`` the kernel keeps overflowed
  CQEs on a list and sets ``IORING_SQ_CQ_OVERFLOW``; reaping then calls
  ``io_uring_enter(GETEVENTS)`` to flush them into the CQ, so no completion
  is lost.
"""

from __future__ import annotations

import errno
import itertools
import os
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


class Completion(Protocol):
    """An entry of the waiter table."""

    def complete(self, res: int, flags: int) -> bool:
        """Take one CQE; return True when no more CQEs will follow."""


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
        self._sq_flags = ffi.new("uint32_t[1]")
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
        *,
        addr: int = 0,
        length: int = 0,
        off: int = 0,
        op_flags: int = 0,
        ioprio: int = 0,
        sqe_flags: int = 0,
        buf_index: int = 0,
        user_data: int = IGNORED_USER_DATA,
    ) -> None:
        """Prepare one SQE; if the SQ is full, submit what is queued first."""
        while (
            lib.tu_prep(
                self._ring,
                opcode,
                sqe_flags,
                ioprio,
                fd,
                addr,
                length,
                off,
                op_flags,
                user_data,
                buf_index,
            )
            < 0
        ):
            self._make_sq_room()

    def start(self, entry: Completion, opcode: int, fd: int, **sqe: int) -> int:
        """Register ``entry`` in the table and prepare its SQE; return its user_data."""
        user_data = self._next_user_data()
        self.push(opcode, fd, user_data=user_data, **sqe)
        self.table[user_data] = entry
        return user_data

    def _make_sq_room(self) -> None:
        if self.sqpoll:
            # The kernel thread has not taken the queued SQEs yet: wake it
            # and wait until it has made room.
            self.submit()
            lib.tu_enter(self._ring, 0, 0, _abi.IORING_ENTER_SQ_WAKEUP | _abi.IORING_ENTER_SQ_WAIT)
            return
        rc = self.submit()
        if rc == 0 or lib.tu_sq_space(self._ring) == 0:
            # The kernel refused new work until its overflow list drains.
            self.reap(force_enter=True)

    def submit(self) -> int:
        """Hand every prepared SQE to the kernel; return how many it took."""
        if self.sqpoll:
            pending = lib.tu_publish_sq(self._ring)
            if lib.tu_sq_flags(self._ring) & _abi.IORING_SQ_NEED_WAKEUP:
                lib.tu_enter(self._ring, 0, 0, _abi.IORING_ENTER_SQ_WAKEUP)
            return pending
        while True:
            rc = lib.tu_submit(self._ring, 0, self._enter_flags)
            if rc >= 0:
                return rc
            if -rc not in _TRANSIENT_ENTER_ERRORS:
                raise OSError(-rc, f"io_uring_enter failed: {os.strerror(-rc)}")
            if -rc != errno.EINTR:
                # EBUSY/EAGAIN: the CQ overflowed or the kernel is short of
                # memory; reaping makes room.
                self.reap(force_enter=True)
                return 0

    @property
    def sq_pending(self) -> int:
        return lib.tu_sq_pending(self._ring)

    # -- completion -------------------------------------------------------

    @property
    def cq_ready(self) -> int:
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
        when nothing unusual happens: the path every request takes."""
        if self.sqpoll:
            self.submit()
            self.reap(run_task_work=False)
            return
        n = lib.tu_submit_reap(
            self._ring,
            self._enter_flags,
            self._ud,
            self._res,
            self._flags,
            _REAP_BATCH,
            self._sq_flags,
        )
        if n < 0:
            # A transient enter error: the general path retries and reaps.
            self.submit()
            self.reap(run_task_work=False)
            return
        self._dispatch(n)
        if n == _REAP_BATCH or self._sq_flags[0] & _MORE_IN_KERNEL:
            self.reap(run_task_work=False)

    def _dispatch(self, n: int) -> None:
        ud, res, flags, table = self._ud, self._res, self._flags, self.table
        for i in range(n):
            user_data = ud[i]
            entry = table.get(user_data)
            if entry is not None and entry.complete(res[i], flags[i]):
                del table[user_data]

    # -- registration -----------------------------------------------------

    def register(self, opcode: int, arg: object, nr_args: int) -> int:
        """io_uring_register; returns the result, ``-errno`` on failure."""
        return lib.tu_register(self.fd, opcode, arg, nr_args)

    def last_sqe(self) -> object:
        """The most recently prepared SQE, not yet submitted: for tests that
        check SQE bytes, and for preps that fill a field ``push`` lacks."""
        return lib.tu_last_sqe(self._ring)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        lib.tu_close(self._ring)
        if self._eventfd >= 0:
            os.close(self._eventfd)
            self._eventfd = -1
