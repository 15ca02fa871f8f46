"""The shim and Ring, without trio."""

from __future__ import annotations

import errno
import os
import select
import socket

import pytest
from trio_uring._shim_cffi import ffi, lib

from trio_uring import _abi
from trio_uring._prep import prep_accept, prep_cancel, prep_nop, prep_recv
from trio_uring._ring import Ring, RingSetupError


class Collect:
    def __init__(self) -> None:
        self.cqes: list[tuple[int, int]] = []

    def complete(self, res: int, flags: int) -> bool:
        self.cqes.append((res, flags))
        return not flags & _abi.IORING_CQE_F_MORE


def wait_until(ring: Ring, predicate, timeout_ms: int = 2000) -> None:
    poller = select.poll()
    poller.register(ring.wait_fd, select.POLLIN)
    ring.submit()
    ring.reap()
    while not predicate():
        assert poller.poll(timeout_ms), "no completion arrived"
        ring.reap()


@pytest.fixture(
    params=[
        0,
        _abi.IORING_SETUP_COOP_TASKRUN | _abi.IORING_SETUP_TASKRUN_FLAG,
        _abi.IORING_SETUP_SINGLE_ISSUER | _abi.IORING_SETUP_DEFER_TASKRUN,
    ]
)
def ring(request: pytest.FixtureRequest):
    r = Ring(8, flags=request.param)
    yield r
    r.close()


def test_nop_round_trip(ring: Ring) -> None:
    entries = [Collect() for _ in range(5)]
    for e in entries:
        prep_nop(ring, e)
    wait_until(ring, lambda: all(e.cqes for e in entries))
    assert [e.cqes for e in entries] == [[(0, 0)]] * 5
    assert ring.table == {}


def test_full_sq_is_submitted_not_failed(ring: Ring) -> None:
    # 8 SQ slots; 100 NOPs must all go through without an error.
    entries = [Collect() for _ in range(100)]
    for e in entries:
        prep_nop(ring, e)
    wait_until(ring, lambda: all(e.cqes for e in entries))
    assert all(e.cqes == [(0, 0)] for e in entries)
    assert ring.table == {}


def test_cq_overflow_loses_nothing() -> None:
    ring = Ring(8, cq_entries=16)
    try:
        assert ring.features & _abi.IORING_FEAT_NODROP
        entries = [Collect() for _ in range(1000)]
        for e in entries:
            prep_nop(ring, e)
            # Submit without reaping: the 16-entry CQ overflows many times over.
            if ring.sq_pending == ring.sq_entries:
                ring.submit()
        ring.submit()
        assert ring.cq_ready == 16
        assert lib.tu_sq_flags(ring._ring) & _abi.IORING_SQ_CQ_OVERFLOW
        wait_until(ring, lambda: all(e.cqes for e in entries))
        assert sum(len(e.cqes) for e in entries) == 1000
        assert ring.table == {}
    finally:
        ring.close()


def test_multishot_accept_delivers_several_cqes(ring: Ring) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        entry = Collect()
        user_data = prep_accept(ring, entry, listener.fileno(), 0, True)
        ring.submit()
        clients = [socket.create_connection(listener.getsockname()) for _ in range(3)]
        wait_until(ring, lambda: len(entry.cqes) >= 3)
        assert all(res >= 0 and flags & _abi.IORING_CQE_F_MORE for res, flags in entry.cqes)
        for res, _ in entry.cqes:
            os.close(res)
        prep_cancel(ring, user_data)
        wait_until(ring, lambda: user_data not in ring.table)
        assert not entry.cqes[-1][1] & _abi.IORING_CQE_F_MORE
        for c in clients:
            c.close()


def test_cancel_blocked_recv(ring: Ring) -> None:
    a, b = socket.socketpair()
    with a, b:
        buf = ffi.new("char[]", 16)
        entry = Collect()
        user_data = prep_recv(ring, entry, a.fileno(), int(ffi.cast("uintptr_t", buf)), 16)
        ring.submit()
        ring.reap()
        assert entry.cqes == []
        prep_cancel(ring, user_data)
        wait_until(ring, lambda: bool(entry.cqes))
        assert entry.cqes == [(-errno.ECANCELED, 0)]
        assert ring.table == {}


def test_setup_failure_is_reported() -> None:
    lib.tu_fault_setup_errno = errno.EPERM
    try:
        with pytest.raises(RingSetupError) as info:
            Ring(8)
        assert info.value.errno == errno.EPERM
    finally:
        lib.tu_fault_setup_errno = 0


def test_sqe_fields_are_where_the_kernel_reads_them(ring: Ring) -> None:
    prep_nop(ring, Collect())
    sqe = ring.last_sqe()
    raw = bytes(ffi.buffer(sqe, 64))
    assert raw[0] == _abi.IORING_OP_NOP
    assert int.from_bytes(raw[32:40], "little") == max(ring.table)
    assert ffi.offsetof("struct io_uring_sqe", "buf_index") == 40
    assert ffi.sizeof("struct io_uring_cqe") == 16
    wait_until(ring, lambda: not ring.table)


def test_submit_and_reap_takes_inline_completions_and_drains_overflow() -> None:
    ring = Ring(16, cq_entries=16)
    try:
        first = [Collect() for _ in range(16)]
        for e in first:
            prep_nop(ring, e)
        ring.submit()  # fills the CQ, nothing reaped yet
        second = [Collect() for _ in range(16)]
        for e in second:
            prep_nop(ring, e)
        # These complete during submission with the CQ full: they wait on
        # the kernel's overflow list, and the one call still gets them all.
        ring.submit_and_reap()
        assert all(e.cqes == [(0, 0)] for e in first + second)
        assert ring.table == {}
    finally:
        ring.close()


def test_connect_read_fixed_and_close(ring: Ring, tmp_path) -> None:
    """The remaining prep functions, each against the kernel."""
    import mmap

    from trio_uring._prep import prep_close, prep_connect, prep_read_fixed

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.socket()
        addr = socket.inet_aton("127.0.0.1")
        port = listener.getsockname()[1]
        sockaddr = ffi.new("char[16]", b"\x02\x00" + port.to_bytes(2, "big") + addr)
        connected = Collect()
        prep_connect(ring, connected, client.fileno(), int(ffi.cast("uintptr_t", sockaddr)), 16)
        wait_until(ring, lambda: bool(connected.cqes))
        assert connected.cqes == [(0, 0)]
        server, _ = listener.accept()
        server.close()
        client.close()

    path = tmp_path / "data"
    path.write_bytes(b"fixed buffers read this")
    memory = mmap.mmap(-1, 4096)
    cdata = ffi.from_buffer(memory)
    iov = ffi.new("struct tu_iovec *", {"iov_base": cdata, "iov_len": 4096})
    assert ring.register(_abi.IORING_REGISTER_BUFFERS, iov, 1) == 0
    fd = os.open(path, os.O_RDONLY)
    read = Collect()
    prep_read_fixed(ring, read, fd, int(ffi.cast("uintptr_t", cdata)), 4096, 0, 0)
    wait_until(ring, lambda: bool(read.cqes))
    assert read.cqes[0][0] == 23 and memory[:23] == b"fixed buffers read this"
    closed = Collect()
    prep_close(ring, closed, fd)
    wait_until(ring, lambda: bool(closed.cqes))
    assert closed.cqes == [(0, 0)]
    with pytest.raises(OSError):
        os.fstat(fd)
    assert ring.register(_abi.IORING_UNREGISTER_BUFFERS, ffi.NULL, 0) == 0
