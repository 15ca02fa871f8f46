"""Probe what the running kernel supports, once per process.

Every answer comes from trying the thing on a throwaway ring and a loopback
TCP pair, never from a version number: distribution kernels backport, and
containers block syscalls that the kernel has.  The result also names the
send strategy the library will use, chosen by ``choose_strategy``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import mmap
import os
import platform
import select
import socket
import threading
from collections.abc import Iterator

from . import _abi
from ._prep import prep_accept, prep_cancel, prep_recv, prep_send_zc, prep_sendmsg_zc
from ._ring import Ring, RingSetupError
from ._shim_cffi import ffi, lib

DISABLE_ENV = "TRIO_URING_DISABLE"

#: Send strategies from best to worst; see docs/kernel-support.
STRATEGIES = ("fixed-provided-bundle", "vectored-fixed", "fixed-single", "copy", "socket")

#: Setup flag sets to try, best first.  COOP_TASKRUN comes first: measured
#: here, DEFER_TASKRUN needs a second io_uring_enter per send to post the
#: zero-copy notification, and (because polling the ring fd does not wake
#: for deferred work) an eventfd besides.  DEFER_TASKRUN needs SINGLE_ISSUER.
SETUP_FLAG_CANDIDATES = (
    _abi.IORING_SETUP_SINGLE_ISSUER
    | _abi.IORING_SETUP_COOP_TASKRUN
    | _abi.IORING_SETUP_TASKRUN_FLAG
    | _abi.IORING_SETUP_SUBMIT_ALL,
    _abi.IORING_SETUP_SINGLE_ISSUER
    | _abi.IORING_SETUP_DEFER_TASKRUN
    | _abi.IORING_SETUP_SUBMIT_ALL,
    _abi.IORING_SETUP_COOP_TASKRUN | _abi.IORING_SETUP_TASKRUN_FLAG,
    0,
)

_SETUP_FLAG_NAMES = {
    _abi.IORING_SETUP_SINGLE_ISSUER: "SINGLE_ISSUER",
    _abi.IORING_SETUP_DEFER_TASKRUN: "DEFER_TASKRUN",
    _abi.IORING_SETUP_COOP_TASKRUN: "COOP_TASKRUN",
    _abi.IORING_SETUP_TASKRUN_FLAG: "TASKRUN_FLAG",
    _abi.IORING_SETUP_SUBMIT_ALL: "SUBMIT_ALL",
}

_PROBE_TIMEOUT_MS = 2000


def setup_flag_names(flags: int) -> tuple[str, ...]:
    return tuple(name for bit, name in _SETUP_FLAG_NAMES.items() if flags & bit)


@dataclasses.dataclass(frozen=True)
class Features:
    """What this kernel and process can do, as probed.

    ``io_uring`` is False when the ring cannot be used at all, and
    ``unavailable_reason`` then says why (disabled by sysctl, blocked by
    seccomp, absent, or ``TRIO_URING_DISABLE=1``).  ``strategy`` is the send
    strategy TCP streams get by default.
    """

    kernel: str
    io_uring: bool
    unavailable_reason: str | None
    disabled_by_env: bool
    setup_flags: int
    setup_flags_accepted: tuple[tuple[str, ...], ...]
    ops: frozenset[str]
    send_zc: bool
    send_zc_fixed: bool
    zc_copied_on_loopback: bool | None
    sendmsg_zc_fixed_vectored: bool
    send_bundle: bool
    accept_multishot: bool
    recv_multishot: bool
    fixed_provided_send_zc: bool
    fixed_provided_detail: str
    strategy: str
    #: The fixed-provided addr split this kernel decodes ("20/44", "32/32"),
    #: None where it decodes none (the seed patchset is absent).
    fixed_provided_split: str | None = None

    @property
    def setup_flag_names(self) -> tuple[str, ...]:
        return setup_flag_names(self.setup_flags)

    @property
    def fixed_provided_index_bits(self) -> int:
        """The shift of the probed split, or the default where none was probed."""
        for bits, split in _abi.FIXED_PROVIDED_SPLITS.items():
            if split.name == self.fixed_provided_split:
                return bits
        return _abi.FIXED_PROVIDED_DEFAULT_INDEX_BITS

    def as_dict(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        d["ops"] = sorted(self.ops)
        d["setup_flag_names"] = list(self.setup_flag_names)
        d["setup_flags_accepted"] = [list(f) for f in self.setup_flags_accepted]
        return d


def choose_strategy(f: Features, *, zero_copy_capable_socket: bool = True) -> str:
    """The best send strategy ``f`` allows, for a socket of this kind.

    AF_UNIX sockets cannot do zero copy (the kernel answers EOPNOTSUPP), so
    they get ``copy``.
    """
    if not f.io_uring:
        return "socket"
    if zero_copy_capable_socket:
        if f.fixed_provided_send_zc:
            return "fixed-provided-bundle"
        if f.sendmsg_zc_fixed_vectored:
            return "vectored-fixed"
        if f.send_zc_fixed:
            return "fixed-single"
    return "copy"


def _disabled_sysctl() -> str | None:
    try:
        with open("/proc/sys/kernel/io_uring_disabled") as fh:
            value = fh.read().strip()
    except OSError:
        return None
    return value if value != "0" else None


def _unavailable_reason(err: int) -> str:
    sysctl = _disabled_sysctl()
    if err == errno.ENOSYS:
        return (
            "io_uring_setup is not implemented (ENOSYS): "
            "the kernel is too old, or a sandbox such as gVisor hides it"
        )
    if err == errno.EPERM:
        if sysctl is not None:
            return (
                f"io_uring is disabled by sysctl kernel.io_uring_disabled={sysctl} (EPERM); "
                "set it to 0, or 1 and join the group in kernel.io_uring_group"
            )
        return "io_uring_setup was refused (EPERM): blocked by seccomp or a security module"
    if err == errno.ENOMEM:
        return "io_uring_setup failed with ENOMEM: RLIMIT_MEMLOCK or memory is exhausted"
    return f"io_uring_setup failed: {os.strerror(err)} ({errno.errorcode.get(err, err)})"


class _Collect:
    """A table entry that records every CQE it gets."""

    def __init__(self) -> None:
        self.cqes: list[tuple[int, int]] = []

    def complete(self, res: int, flags: int) -> bool:
        self.cqes.append((res, flags))
        return not flags & _abi.IORING_CQE_F_MORE

    @property
    def res(self) -> int:
        return self.cqes[0][0]


def _wait_for(ring: Ring, entry: _Collect, count: int = 1) -> bool:
    poller = select.poll()
    poller.register(ring.wait_fd, select.POLLIN)
    ring.submit()
    ring.reap()
    while len(entry.cqes) < count:
        if not poller.poll(_PROBE_TIMEOUT_MS):
            return False
        ring.reap()
    return True


@contextlib.contextmanager
def _tcp_pair() -> Iterator[tuple[socket.socket, socket.socket, socket.socket]]:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        try:
            yield listener, client, server
        finally:
            client.close()
            server.close()
    finally:
        listener.close()


class _ProbeMemory:
    """A registered buffer plus a provided-buffer ring for the probes."""

    SIZE = 64 * 1024
    BGID = 1

    def __init__(self, ring: Ring) -> None:
        self.mem = mmap.mmap(-1, self.SIZE)
        self.cbuf = ffi.from_buffer(self.mem)
        self.base = int(ffi.cast("uintptr_t", self.cbuf))
        iov = ffi.new("struct tu_iovec *", {"iov_base": self.cbuf, "iov_len": self.SIZE})
        self.registered = ring.register(_abi.IORING_REGISTER_BUFFERS, iov, 1) == 0
        self.br_mem = mmap.mmap(-1, mmap.PAGESIZE)
        self.br = ffi.cast("struct io_uring_buf *", ffi.from_buffer(self.br_mem))
        reg = ffi.new(
            "struct io_uring_buf_reg *",
            {
                "ring_addr": int(ffi.cast("uintptr_t", self.br)),
                "ring_entries": 8,
                "bgid": self.BGID,
            },
        )
        self.pbuf = ring.register(_abi.IORING_REGISTER_PBUF_RING, reg, 1) == 0
        self.tail = 0

    def provide(self, addr: int, length: int, bid: int) -> None:
        lib.tu_buf_ring_put(self.br, 7, self.tail, addr, length, bid)
        self.tail += 1
        lib.tu_buf_ring_publish(self.br, self.tail)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    sock.settimeout(_PROBE_TIMEOUT_MS / 1000)
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def _probe_ops(ring: Ring) -> frozenset[str]:
    probe = ffi.new("struct io_uring_probe *")
    if ring.register(_abi.IORING_REGISTER_PROBE, probe, 256) < 0:
        return frozenset()
    return frozenset(
        name
        for op, name in _abi.OP_NAMES.items()
        if op <= probe.last_op and probe.ops[op].flags & _abi.IO_URING_OP_SUPPORTED
    )


def _send_zc_fixed(ring: Ring, mem: _ProbeMemory, client: socket.socket, server: socket.socket):
    mem.mem[0:4] = b"zcfx"
    entry = _Collect()
    prep_send_zc(
        ring,
        entry,
        client.fileno(),
        mem.base,
        4,
        0,
        zc_flags=_abi.IORING_RECVSEND_FIXED_BUF | _abi.IORING_SEND_ZC_REPORT_USAGE,
    )
    if not _wait_for(ring, entry) or entry.res != 4:
        return False, None
    copied = None
    if entry.cqes[0][1] & _abi.IORING_CQE_F_MORE and _wait_for(ring, entry, 2):
        copied = bool(entry.cqes[1][0] & _abi.IORING_NOTIF_USAGE_ZC_COPIED)
    return _recv_exact(server, 4) == b"zcfx", copied


def _sendmsg_zc_vectored(ring: Ring, mem: _ProbeMemory, client, server) -> bool:
    mem.mem[100:103] = b"abc"
    mem.mem[200:203] = b"def"
    mem.mem[300:303] = b"ghi"
    iov = ffi.new("struct tu_iovec[3]")
    for i, off in enumerate((100, 200, 300)):
        iov[i].iov_base = ffi.cast("void *", mem.base + off)
        iov[i].iov_len = 3
    msg = ffi.new("struct tu_msghdr *", {"msg_iov": iov, "msg_iovlen": 3})
    entry = _Collect()
    prep_sendmsg_zc(
        ring,
        entry,
        client.fileno(),
        int(ffi.cast("uintptr_t", msg)),
        0,
        zc_flags=_abi.IORING_RECVSEND_FIXED_BUF,
    )
    if not _wait_for(ring, entry):
        return False
    if entry.cqes[0][1] & _abi.IORING_CQE_F_MORE:
        _wait_for(ring, entry, 2)
    return entry.res == 9 and _recv_exact(server, 9) == b"abcdefghi"


def _send_bundle(ring: Ring, mem: _ProbeMemory, client, server) -> bool:
    mem.mem[1000:1002] = b"bu"
    mem.mem[2000:2002] = b"nd"
    mem.provide(mem.base + 1000, 2, 0)
    mem.provide(mem.base + 2000, 2, 1)
    entry = _Collect()
    ring.start(
        entry,
        _abi.IORING_OP_SEND,
        client.fileno(),
        sqe_flags=_abi.IOSQE_BUFFER_SELECT,
        ioprio=_abi.IORING_RECVSEND_BUNDLE,
        buf_index=mem.BGID,
    )
    if not _wait_for(ring, entry) or entry.res != 4:
        if entry.cqes and entry.res > 0:
            _recv_exact(server, entry.res)
        return False
    return _recv_exact(server, 4) == b"bund"


#: Where the split probe's entry points, per split: one addr whose offset is
#: 32768 under 20/44 and 32768 >> 12 = 8 under 32/32 (index 0 under both).
_SPLIT_PROBE_OFFSET = 32768
_SPLIT_PROBE_LEN = 8


def _split_probe_markers() -> dict[int, tuple[int, bytes]]:
    """For each split: the offset the probe's addr names there, and its marker."""
    addr = _SPLIT_PROBE_OFFSET << _abi.FIXED_PROVIDED_DEFAULT_INDEX_BITS
    out = {}
    for bits, split in _abi.FIXED_PROVIDED_SPLITS.items():
        assert addr & split.max_index == 0, "the probe must name buffer 0 under every split"
        out[bits] = (addr >> bits, f"sp{split.name}".encode().ljust(_SPLIT_PROBE_LEN, b"_"))
    return out


def _fixed_provided(ring: Ring, mem: _ProbeMemory, client, server) -> tuple[bool, str, str | None]:
    """The seed patchset: SEND_ZC picking a fixed-provided entry, and its split.

    The seed's uapi was never merged, and kernels carrying it disagree on how
    an entry's addr splits into (buffer index, offset).  One entry whose addr
    names a different offset under each split, each offset holding its own
    marker, goes out over loopback TCP: the bytes that arrive tell which split
    this kernel decodes.  Bytes matching no split mean the library cannot
    write entries this kernel reads, so the strategy is not used.
    """
    markers = _split_probe_markers()
    for offset, marker in markers.values():
        mem.mem[offset : offset + _SPLIT_PROBE_LEN] = marker
    mem.provide(_SPLIT_PROBE_OFFSET << _abi.FIXED_PROVIDED_DEFAULT_INDEX_BITS, _SPLIT_PROBE_LEN, 2)
    entry = _Collect()
    prep_send_zc(
        ring,
        entry,
        client.fileno(),
        0,
        0,
        0,
        zc_flags=_abi.IORING_RECVSEND_FIXED_BUF | _abi.IORING_RECVSEND_BUNDLE,
        buf_index=mem.BGID,
        sqe_flags=_abi.IOSQE_BUFFER_SELECT,
    )
    if not _wait_for(ring, entry):
        return False, "no completion within the probe's timeout", None
    res = entry.res
    if entry.cqes[0][1] & _abi.IORING_CQE_F_MORE:
        _wait_for(ring, entry, 2)
    if res < 0:
        name = "EOPNOTSUPP" if -res == errno.EOPNOTSUPP else errno.errorcode.get(-res, str(-res))
        return False, f"not supported by this kernel ({name})", None
    got = _recv_exact(server, res) if res > 0 else b""
    for bits, (_offset, marker) in markers.items():
        if res == _SPLIT_PROBE_LEN and got == marker:
            split = _abi.FIXED_PROVIDED_SPLITS[bits]
            return True, f"supported, addr split {split.name} (index/offset bits)", split.name
    return False, f"unexpected result {res} ({got!r}): the addr split matches no known one", None


def _accept_multishot(ring: Ring) -> bool:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        entry = _Collect()
        user_data = prep_accept(ring, entry, listener.fileno(), 0, multishot=True)
        ring.submit()
        clients = [socket.create_connection(listener.getsockname()) for _ in range(2)]
        ok = _wait_for(ring, entry, 2)
        for res, _flags in entry.cqes:
            if res >= 0:
                os.close(res)
        ok = ok and all(res >= 0 and flags & _abi.IORING_CQE_F_MORE for res, flags in entry.cqes)
        _cancel_and_drain(ring, user_data, entry)
        for c in clients:
            c.close()
    return ok


def _recv_multishot(ring: Ring, client: socket.socket, server: socket.socket) -> bool:
    mem = mmap.mmap(-1, 8192)
    cbuf = ffi.from_buffer(mem)
    br_mem = mmap.mmap(-1, mmap.PAGESIZE)
    br = ffi.cast("struct io_uring_buf *", ffi.from_buffer(br_mem))
    reg = ffi.new(
        "struct io_uring_buf_reg *",
        {"ring_addr": int(ffi.cast("uintptr_t", br)), "ring_entries": 2, "bgid": 2},
    )
    if ring.register(_abi.IORING_REGISTER_PBUF_RING, reg, 1) < 0:
        return False
    base = int(ffi.cast("uintptr_t", cbuf))
    lib.tu_buf_ring_put(br, 1, 0, base, 4096, 0)
    lib.tu_buf_ring_put(br, 1, 1, base + 4096, 4096, 1)
    lib.tu_buf_ring_publish(br, 2)
    entry = _Collect()
    user_data = prep_recv(
        ring,
        entry,
        server.fileno(),
        0,
        0,
        ioprio=_abi.IORING_RECV_MULTISHOT,
        sqe_flags=_abi.IOSQE_BUFFER_SELECT,
        buf_group=2,
    )
    ring.submit()
    client.sendall(b"ms")
    ok = (
        _wait_for(ring, entry)
        and entry.res == 2
        and bool(
            entry.cqes[0][1] & _abi.IORING_CQE_F_MORE
            and entry.cqes[0][1] & _abi.IORING_CQE_F_BUFFER
        )
    )
    _cancel_and_drain(ring, user_data, entry)
    unreg = ffi.new("struct io_uring_buf_reg *", {"bgid": 2})
    ring.register(_abi.IORING_UNREGISTER_PBUF_RING, unreg, 1)
    return ok


def _cancel_and_drain(ring: Ring, user_data: int, entry: _Collect) -> None:
    if user_data in ring.table:
        prep_cancel(ring, user_data)
        poller = select.poll()
        poller.register(ring.wait_fd, select.POLLIN)
        ring.submit()
        ring.reap()
        while user_data in ring.table and poller.poll(_PROBE_TIMEOUT_MS):
            ring.reap()
        ring.table.pop(user_data, None)


def _probe_setup_flags() -> tuple[int, tuple[tuple[str, ...], ...], int | None]:
    accepted: list[tuple[str, ...]] = []
    chosen: int | None = None
    first_error: int | None = None
    for flags in SETUP_FLAG_CANDIDATES:
        try:
            Ring(8, flags=flags).close()
        except RingSetupError as exc:
            if first_error is None:
                first_error = exc.errno
            continue
        accepted.append(setup_flag_names(flags))
        if chosen is None:
            chosen = flags
    return (
        (chosen if chosen is not None else -1),
        tuple(accepted),
        (first_error if chosen is None else None),
    )


def _unavailable(reason: str, *, disabled_by_env: bool = False) -> Features:
    return Features(
        kernel=platform.release(),
        io_uring=False,
        unavailable_reason=reason,
        disabled_by_env=disabled_by_env,
        setup_flags=0,
        setup_flags_accepted=(),
        ops=frozenset(),
        send_zc=False,
        send_zc_fixed=False,
        zc_copied_on_loopback=None,
        sendmsg_zc_fixed_vectored=False,
        send_bundle=False,
        accept_multishot=False,
        recv_multishot=False,
        fixed_provided_send_zc=False,
        fixed_provided_detail="io_uring unavailable",
        strategy="socket",
    )


def probe() -> Features:
    """Probe the kernel now (uncached); see ``features()``."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return _unavailable(f"disabled by {DISABLE_ENV}=1", disabled_by_env=True)
    flags, accepted, err = _probe_setup_flags()
    if flags < 0:
        assert err is not None
        return _unavailable(_unavailable_reason(err))
    ring = Ring(64, flags=flags)
    try:
        ops = _probe_ops(ring)
        mem = _ProbeMemory(ring)
        send_zc_fixed = sendmsg_vec = bundle = fixed_provided = False
        copied: bool | None = None
        split: str | None = None
        fixed_detail = "SEND_ZC is not supported by this kernel"
        try:
            with _tcp_pair() as (_listener, client, server):
                if "SEND_ZC" in ops and mem.registered:
                    send_zc_fixed, copied = _send_zc_fixed(ring, mem, client, server)
                if "SENDMSG_ZC" in ops and mem.registered:
                    sendmsg_vec = _sendmsg_zc_vectored(ring, mem, client, server)
                if mem.pbuf and "SEND" in ops:
                    bundle = _send_bundle(ring, mem, client, server)
                if mem.pbuf and send_zc_fixed:
                    fixed_provided, fixed_detail, split = _fixed_provided(ring, mem, client, server)
                recv_ms = _recv_multishot(ring, client, server)
            accept_ms = _accept_multishot(ring)
        except OSError as exc:
            # No loopback TCP (an unconfigured network namespace): keep what
            # the op probe says and mark the send paths as unprobed.
            fixed_detail = f"not probed: no loopback TCP ({exc.strerror})"
            recv_ms = accept_ms = False
    finally:
        ring.close()
    partial = Features(
        kernel=platform.release(),
        io_uring=True,
        unavailable_reason=None,
        disabled_by_env=False,
        setup_flags=flags,
        setup_flags_accepted=accepted,
        ops=ops,
        send_zc="SEND_ZC" in ops,
        send_zc_fixed=send_zc_fixed,
        zc_copied_on_loopback=copied,
        sendmsg_zc_fixed_vectored=sendmsg_vec,
        send_bundle=bundle,
        accept_multishot=accept_ms,
        recv_multishot=recv_ms,
        fixed_provided_send_zc=fixed_provided,
        fixed_provided_detail=fixed_detail,
        strategy="socket",
        fixed_provided_split=split,
    )
    return dataclasses.replace(partial, strategy=choose_strategy(partial))


_cache: Features | None = None
_cache_key: str | None = None
_lock = threading.Lock()


def features() -> Features:
    """What this kernel supports and which send strategy will be used.

    Probed once per process (and again if ``TRIO_URING_DISABLE`` changes),
    from real io_uring calls on a loopback TCP pair.
    """
    global _cache, _cache_key
    key = os.environ.get(DISABLE_ENV, "")
    with _lock:
        if _cache is None or _cache_key != key:
            _cache = probe()
            _cache_key = key
        return _cache


__all__ = ["STRATEGIES", "Features", "choose_strategy", "features", "probe"]
