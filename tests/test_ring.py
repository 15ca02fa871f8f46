"""The shim and Ring, without trio."""

from __future__ import annotations

import errno
import os
import select
import socket

import pytest
from trio_uring._shim_cffi import ffi, lib

from trio_uring import _abi, _ring
from trio_uring._prep import (
    prep_accept,
    prep_cancel,
    prep_nop,
    prep_recv,
    prep_send_zc,
    prep_splice,
)
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


RING_FLAGS = [
    0,
    _abi.IORING_SETUP_COOP_TASKRUN | _abi.IORING_SETUP_TASKRUN_FLAG,
    _abi.IORING_SETUP_SINGLE_ISSUER | _abi.IORING_SETUP_DEFER_TASKRUN,
]


@pytest.fixture(params=RING_FLAGS)
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


def test_a_closed_ring_refuses_use_instead_of_touching_unmapped_memory() -> None:
    ring = Ring(8)
    ring.close()
    ring.close()  # closing twice is harmless
    uses = {
        "push": lambda: ring.push(_abi.IORING_OP_NOP, -1),
        "start": lambda: prep_nop(ring, Collect()),
        "submit": ring.submit,
        "submit_and_reap": ring.submit_and_reap,
        "reap": ring.reap,
        "sq_pending": lambda: ring.sq_pending,
        "cq_ready": lambda: ring.cq_ready,
    }
    for name, use in uses.items():
        with pytest.raises(RuntimeError, match="ring is closed"):
            use()
        assert ring.table == {}, name


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


#: Offsets of ``struct io_uring_sqe`` fields in the kernel's UAPI (the
#: member each union slot carries here).
_KERNEL_SQE_OFFSETS = {
    "opcode": 0,
    "flags": 1,
    "ioprio": 2,
    "fd": 4,
    "off": 8,
    "addr": 16,
    "len": 24,
    "op_flags": 28,
    "user_data": 32,
    "buf_index": 40,
    "personality": 42,
    "file_index": 44,
    "addr3": 48,
    "pad2": 56,
}


def test_sqe_declaration_is_the_kernels_layout() -> None:
    assert ffi.sizeof("struct io_uring_sqe") == 64
    assert tuple(_KERNEL_SQE_OFFSETS) == _ring.SQE_FIELDS
    for name, offset in _KERNEL_SQE_OFFSETS.items():
        assert ffi.offsetof("struct io_uring_sqe", name) == offset, name


def test_sqe_struct_packs_every_field_where_cffi_reads_it() -> None:
    """No kernel needed: an image packed by the staging Struct, read back
    through the cffi declaration, field by field."""
    packer = _ring.sqe_struct()
    assert packer.size == ffi.sizeof("struct io_uring_sqe")
    fields = dict(ffi.typeof("struct io_uring_sqe").fields)
    # A distinct value per field, every byte set; negative where signed.
    values = []
    for i, name in enumerate(_ring.SQE_FIELDS):
        ctype = fields[name].type
        size = ffi.sizeof(ctype)
        value = int.from_bytes(bytes(range(8 * i + 1, 8 * i + 1 + size)), "little")
        values.append(-value if ctype.cname.startswith("int") else value)
    image = bytearray(b"\xa5" * 128)
    packer.pack_into(image, 64, *values)
    assert image[:64] == b"\xa5" * 64  # nothing written before the offset
    sqe = ffi.from_buffer("struct io_uring_sqe *", image[64:])
    for name, value in zip(_ring.SQE_FIELDS, values, strict=True):
        assert getattr(sqe, name) == value, name


def test_sqe_struct_refuses_a_declaration_in_another_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    swapped = ("flags", "opcode", *_ring.SQE_FIELDS[2:])
    monkeypatch.setattr(_ring, "SQE_FIELDS", swapped)
    with pytest.raises(ImportError, match="io_uring_sqe"):
        _ring.sqe_struct()


def test_staged_sqe_bytes(ring: Ring) -> None:
    """What the prep functions stage is what the kernel will read."""
    user_data = prep_send_zc(ring, Collect(), 7, 0x1234_5678_9ABC, 4096, 0x4100, 0x3, 5, 0x20)
    sqe = ring.last_sqe()
    assert (sqe.opcode, sqe.flags, sqe.ioprio, sqe.fd) == (_abi.IORING_OP_SEND_ZC, 0x20, 0x3, 7)
    assert (sqe.addr, sqe.len, sqe.op_flags) == (0x1234_5678_9ABC, 4096, 0x4100)
    assert (sqe.user_data, sqe.buf_index, sqe.file_index, sqe.off) == (user_data, 5, 0, 0)
    prep_splice(ring, Collect(), 11, -1, 12, 100, 4096, 0)
    sqe = ring.last_sqe()
    assert (sqe.fd, sqe.file_index, sqe.off) == (12, 11, 100)
    assert sqe.addr == _abi.SPLICE_NO_OFFSET
    raw = bytes(ffi.buffer(sqe, 64))
    assert raw[0] == _abi.IORING_OP_SPLICE
    assert int.from_bytes(raw[44:48], "little") == 11


def test_staged_sqes_wait_for_submit(ring: Ring) -> None:
    entries = [Collect() for _ in range(3)]
    for e in entries:
        prep_nop(ring, e)
    # Staged, not in the SQ: the kernel has seen nothing.
    assert ring.sq_pending == 3
    assert lib.tu_sq_pending(ring._ring) == 0
    assert ring.enter_calls == 0
    ring.submit()
    assert ring.sq_pending == 0
    wait_until(ring, lambda: all(e.cqes for e in entries))
    assert [e.cqes for e in entries] == [[(0, 0)]] * 3


@pytest.mark.parametrize("submit", ["submit_and_reap", "submit"])
@pytest.mark.parametrize("flags", RING_FLAGS)
def test_three_sq_sizes_of_staged_nops_complete_once_each(flags: int, submit: str) -> None:
    """A batch three times the SQ size goes in one shim call, which submits
    the SQ each time it fills: every NOP completes exactly once, in order."""
    order: list[int] = []

    class Ordered(Collect):
        def complete(self, res: int, flags: int) -> bool:
            order.append(id(self))
            return super().complete(res, flags)

    ring = Ring(8, cq_entries=64, flags=flags)
    try:
        entries = [Ordered() for _ in range(3 * ring.sq_entries)]
        for e in entries:
            prep_nop(ring, e)
        assert ring.sq_pending == len(entries)
        getattr(ring, submit)()
        assert ring.sq_pending == 0
        assert ring.enter_calls == 3  # one per SQ's worth
        wait_until(ring, lambda: all(e.cqes for e in entries))
        assert all(e.cqes == [(0, 0)] for e in entries)
        assert order == [id(e) for e in entries]
        assert ring.table == {}
    finally:
        ring.close()


def test_unstage_keeps_the_images_not_copied_in_order(ring: Ring) -> None:
    user_data = [prep_nop(ring, Collect()) for _ in range(5)]
    ring._unstage(2)
    assert ring.sq_pending == 3
    assert ring.last_sqe().user_data == user_data[-1]
    assert [ring._staging[i].user_data for i in range(3)] == user_data[2:]
    ring.submit()
    wait_until(ring, lambda: set(ring.table) == set(user_data[:2]))
    ring.table.clear()


def test_sqpoll_ring_takes_a_batch_larger_than_its_sq() -> None:
    """With SQPOLL the staged SQEs are published to the kernel thread, and
    submit waits for it to make room while more are staged than fit."""
    try:
        ring = Ring(8, flags=_abi.IORING_SETUP_SQPOLL, sq_thread_idle=50)
    except RingSetupError as exc:
        pytest.skip(f"no SQPOLL here: {exc}")
    try:
        entries = [Collect() for _ in range(3 * ring.sq_entries)]
        for e in entries:
            prep_nop(ring, e)
        ring.submit()
        assert ring.sq_pending <= ring.sq_entries
        wait_until(ring, lambda: all(e.cqes for e in entries))
        assert all(e.cqes == [(0, 0)] for e in entries)
        assert ring.table == {}
    finally:
        ring.close()


@pytest.mark.parametrize("reap", ["reap", "submit_and_reap"])
def test_an_entry_that_raises_costs_the_rest_of_its_batch_nothing(ring: Ring, reap: str) -> None:
    """The CQ head is past a reaped batch before its CQEs are dispatched: an
    entry whose ``complete`` raises must not drop the CQEs after its own
    (their tasks would wait forever).  The error comes once all are
    dispatched, and the entry, which got its last CQE, leaves the table."""

    class Raising(Collect):
        def complete(self, res: int, flags: int) -> bool:
            super().complete(res, flags)
            raise RuntimeError("complete() failed")

    entries = [Collect(), Raising(), Collect(), Collect()]
    for e in entries:
        prep_nop(ring, e)
    if reap == "reap":
        ring.submit()
    with pytest.raises(RuntimeError, match="complete"):
        getattr(ring, reap)()
    assert [e.cqes for e in entries] == [[(0, 0)]] * 4
    assert ring.table == {}
