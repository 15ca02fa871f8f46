"""``send_file``: a file's bytes to a stream, without Python ever holding them.

trio has no sendfile (python-trio/trio#45) because ``sendfile(2)`` may block
the event loop on a disk read.  io_uring does not: a file read or splice that
needs the disk completes in the kernel's workers while the loop runs on.
Three paths, chosen per call:

``splice``      file -> pipe -> socket with ``IORING_OP_SPLICE``, for counts of
                at least ``SPLICE_MIN_BYTES``.  No copy at all: the pipe holds
                references to page-cache pages, and the socket takes them.
                The kernel runs every splice in an io-wq worker, which costs a
                thread hand-off per request; with a 1 MiB pipe that is two
                hand-offs per MiB, cheap for large files and the dominant cost
                for small ones.
``read``        ``IORING_OP_READ_FIXED`` into the stream's registered slices,
                then the stream's own send path, below ``SPLICE_MIN_BYTES``.
                One kernel copy (page cache -> registered memory); a page-cached
                read completes inline, without a worker.
``sendfile``    ``os.sendfile`` on the nonblocking socket when the run has no
                ring (the ``socket`` strategy).  Disk reads then happen in the
                event loop, exactly the cost trio#45 is about: it is the
                fallback, not the design.

Measured on loopback into a C sink (docs/zero-copy-pays.rst has the table):
at 1 MiB splice with a 1 MiB pipe ran 4.5-4.8 GB/s at 0.16 CPU s/GiB against
2.2-3.0 GB/s and 0.25-0.30 for READ_FIXED + send; at 16 KiB READ_FIXED ran
48-50k files/s against 7.7k for splice.

Pipes are per run, not per stream: a pipe of 1 MiB counts against the
user's pipe-buffer allowance (``/proc/sys/fs/pipe-user-pages-soft``, 64 MiB
by default), which thousands of idle streams would exhaust.  A call leases
one from the run's ``PipePool`` and gives it back empty; a pipe that may
still hold bytes (a cancelled or failed splice) is closed instead, and the
idle ones are closed when the run ends.
"""

from __future__ import annotations

import errno
import fcntl
import io
import operator
import os
import stat
from typing import TYPE_CHECKING, Protocol

import trio

from . import _abi
from ._manager import Operation
from ._prep import prep_openat, prep_poll_add, prep_read_fixed, prep_splice
from ._shim_cffi import ffi

if TYPE_CHECKING:
    from ._manager import IOManager
    from ._stream import ZeroCopyStream

#: From this many bytes on, splice; below it, READ_FIXED + the send path.
#: Measured through this library's send path (loopback, page cache, C sink):
#: at 16 KiB read 18.4-18.7k files/s against splice 8.5-13.4k; at 64 KiB
#: splice 12.0-12.2k against 8.2-8.7k; at 128 KiB 10.3-10.8k against 4.9-5.0k.
#: A raw READ_FIXED + send() (no send-path overhead) moved the crossover to
#: about 256 KiB: re-measure when the send path changes.
SPLICE_MIN_BYTES = 64 * 1024
#: The pipe size asked for with F_SETPIPE_SZ.  Splice throughput at 1 MiB
#: files: 0.44 GB/s with the default 64 KiB pipe, 2.7 GB/s with 256 KiB,
#: 4.5-4.8 GB/s with 1 MiB (the default /proc/sys/fs/pipe-max-size, so
#: unprivileged processes get it too).
PIPE_SIZE = 1 << 20
#: Idle pipes a run keeps for the next call; more are closed on release.
MAX_IDLE_PIPES = 16
_POLLOUT = 0x004


class HasFileno(Protocol):
    def fileno(self) -> int: ...


#: What ``send_file`` takes: a path, a file object with ``fileno()``, an fd.
FileArg = str | bytes | os.PathLike[str] | os.PathLike[bytes] | int | HasFileno


class FileTruncatedError(OSError):
    """The file ended before ``send_file`` had sent the bytes it promised.

    The file shrank while it was being sent (``count`` is checked against
    its size when the call starts).  ``sent`` bytes were handed to the
    kernel and ``expected`` were promised; the peer has a prefix, so the
    stream's sending side is broken from then on.
    """

    def __init__(self, sent: int, expected: int, offset: int) -> None:
        super().__init__(
            errno.ENODATA,
            f"the file ended at offset {offset + sent} while send_file was sending it: "
            f"{sent} of {expected} bytes were sent; it was truncated while being sent, so "
            "the stream is now broken",
        )
        self.sent = sent
        self.expected = expected


class _SendingError(Exception):
    """Wraps an ``OSError`` of the socket side, so the guard can tell it
    from a file-side error: the first means the connection is broken, the
    second that the file could not be read."""

    def __init__(self, exc: OSError) -> None:
        super().__init__(exc)
        self.exc = exc


# -- the pipes -----------------------------------------------------------------


class Pipe:
    """One pipe and its capacity in bytes."""

    __slots__ = ("r", "size", "w")

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            # Above pipe-max-size, or the user's pipe-buffer allowance is
            # spent: the default size still works, only slower.
            pass
        self.size: int = fcntl.fcntl(self.w, fcntl.F_GETPIPE_SZ)

    def close(self) -> None:
        for fd in (self.r, self.w):
            if fd >= 0:
                os.close(fd)
        self.r = self.w = -1


class PipePool:
    """The pipes of one trio run: leased by a call, returned only empty."""

    def __init__(self) -> None:
        self.idle: list[Pipe] = []
        self.leased = 0
        self.closed = False

    def acquire(self) -> Pipe:
        if self.closed:
            raise trio.ClosedResourceError("the trio run is ending; send_file can't start")
        pipe = self.idle.pop() if self.idle else Pipe()
        self.leased += 1
        return pipe

    def release(self, pipe: Pipe, *, empty: bool) -> None:
        """Give ``pipe`` back; one that may hold bytes is closed, because
        the next call would send them to the wrong peer."""
        self.leased -= 1
        if empty and not self.closed and len(self.idle) < MAX_IDLE_PIPES:
            self.idle.append(pipe)
        else:
            pipe.close()

    def close(self) -> None:
        self.closed = True
        while self.idle:
            self.idle.pop().close()

    async def _close_at_run_end(self) -> None:
        # System tasks are cancelled once the main task is done: the idle
        # pipes outlive every stream of the run, never the run itself.
        try:
            await trio.sleep_forever()
        finally:
            self.close()


_POOL: trio.lowlevel.RunVar[PipePool] = trio.lowlevel.RunVar("trio_uring.pipes")


def pipe_pool() -> PipePool:
    """This run's pipe pool, created (with the task that closes it) on first use."""
    try:
        return _POOL.get()
    except LookupError:
        pool = PipePool()
        _POOL.set(pool)
        trio.lowlevel.spawn_system_task(pool._close_at_run_end, name="trio_uring pipe pool")
        return pool


# -- arguments -----------------------------------------------------------------


def _check_offset_count(offset: object, count: object) -> tuple[int, int | None]:
    try:
        offset = operator.index(offset)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"send_file() offset must be an int, not {type(offset).__name__}") from None
    if offset < 0:
        raise ValueError(f"send_file() offset must be >= 0, not {offset}")
    if count is not None:
        try:
            count = operator.index(count)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(
                f"send_file() count must be an int or None (to the end of the file), "
                f"not {type(count).__name__}"
            ) from None
        if count < 0:
            raise ValueError(f"send_file() count must be >= 0 or None, not {count}")
    return offset, count  # type: ignore[return-value]


def _given_fd(file: object) -> int | None:
    """The fd of an fd or file object; None for a path; TypeError otherwise."""
    if isinstance(file, bool):
        raise TypeError("send_file() takes a path, a file object or an fd, not a bool")
    if isinstance(file, int):
        if file < 0:
            raise ValueError(f"send_file() got a negative file descriptor ({file})")
        return file
    if isinstance(file, (str, bytes, os.PathLike)):
        return None
    fileno = getattr(file, "fileno", None)
    if fileno is None:
        raise TypeError(
            "send_file() takes a path (str or os.PathLike), a file object with fileno() "
            f"or an int file descriptor, not {type(file).__name__}"
        )
    try:
        fd = fileno()
    except io.UnsupportedOperation:
        raise TypeError(
            f"send_file() needs a file backed by a file descriptor; this "
            f"{type(file).__name__} has none"
        ) from None
    except ValueError as exc:
        raise ValueError(f"send_file() can't use this {type(file).__name__}: {exc}") from None
    return operator.index(fd)


def _describe(file: object) -> str:
    if isinstance(file, (str, bytes, os.PathLike)):
        return repr(os.fsdecode(file))
    if isinstance(file, int):
        return f"fd {file}"
    name = getattr(file, "name", None)
    return repr(name) if isinstance(name, str) else f"the {type(file).__name__}"


_FILE_KINDS = {
    stat.S_IFIFO: "a pipe or FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def _check_fd(fd: int, what: str, *, owned: bool) -> int:
    """The size of the regular file open on ``fd``; clear errors otherwise.

    An fd of ours (opened from a path) had O_NONBLOCK only for the open:
    it is cleared here, once the file is known to be regular.
    """
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise OSError(exc.errno, f"send_file() can't use {what}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(
            errno.EISDIR, f"send_file() needs a regular file; {what} is a directory"
        )
    if not stat.S_ISREG(st.st_mode):
        fmt = stat.S_IFMT(st.st_mode)
        kind = _FILE_KINDS.get(fmt, f"not a regular file (mode {fmt:#o})")
        raise ValueError(
            f"send_file() needs a regular file; {what} is {kind}. Read other kinds of "
            "file yourself and send the bytes with send_all()"
        )
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if flags & os.O_ACCMODE == os.O_WRONLY:
        raise ValueError(f"send_file() needs a file open for reading; {what} is write-only")
    if flags & os.O_NONBLOCK and owned:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
    elif flags & os.O_NONBLOCK:
        raise ValueError(
            f"send_file() can't use {what}: it was opened with O_NONBLOCK, which makes "
            "io_uring fail reads of pages not in the page cache instead of waiting for the "
            "disk. Open it without O_NONBLOCK"
        )
    return st.st_size


async def _open(manager: IOManager, path: object) -> int:
    """Open ``path`` for reading without blocking the loop on the disk.

    With a ring, an io_uring OPENAT: the kernel tries a cached path lookup
    inline and hands one that needs the disk to a worker.  O_NONBLOCK keeps
    a FIFO from blocking the open until a writer appears (it is refused
    afterwards); it is cleared before any read, as it would make io_uring
    refuse reads of uncached pages.
    """
    encoded = os.fsencode(path)  # type: ignore[arg-type]
    if b"\0" in encoded:
        raise ValueError("send_file() got a path with an embedded NUL byte")
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
    if manager.ring is None or "OPENAT" not in manager.features.ops:
        try:
            return os.open(encoded, flags)
        except OSError as exc:
            raise OSError(
                exc.errno, f"send_file() can't open {_describe(path)}: {exc.strerror}"
            ) from None
    c_path = ffi.new("char[]", encoded)
    address = int(ffi.cast("uintptr_t", c_path))
    res = await manager.submit(prep_openat, _abi.AT_FDCWD, address, flags, 0)
    if res < 0:
        raise OSError(-res, f"send_file() can't open {_describe(path)}: {os.strerror(-res)}")
    return res


# -- the entry point -------------------------------------------------------------


async def send_file(
    stream: ZeroCopyStream, file: FileArg, offset: int = 0, count: int | None = None
) -> int:
    """Send ``count`` bytes of ``file`` from ``offset`` on ``stream``; return
    how many were sent (the file's size minus ``offset`` when ``count`` is
    None).  See ``ZeroCopyStream.send_file``."""
    with stream._send_conflict:
        offset, count = _check_offset_count(offset, count)
        given = _given_fd(file)
        manager = stream.manager
        # A cancellation before anything happened leaves the stream usable.
        await stream._check_can_send_at_checkpoint()
        owned = -1
        try:
            if given is None:
                owned = await _open(manager, file)
                fd = owned
            else:
                fd = given
            what = _describe(file)
            size = _check_fd(fd, what, owned=owned >= 0)
            if offset > size:
                raise ValueError(
                    f"send_file() offset {offset} is past the end of {what} ({size} bytes)"
                )
            available = size - offset
            if count is None:
                count = available
            elif count > available:
                raise ValueError(
                    f"send_file() was asked for {count} bytes from offset {offset}, but "
                    f"{what} has only {available} there ({size} bytes in all); nothing was sent"
                )
            stream._check_can_send()
            if count:
                await _send_guarded(stream, fd, offset, count)
            await trio.lowlevel.cancel_shielded_checkpoint()
            return count
        except Exception:
            # A failure found without waiting (a reset the first sendfile()
            # meets, a file that is not regular) comes at a full checkpoint
            # too: the cancellation point was above (the rule at the
            # stream's ``_cancel_shielded_checkpoint``).
            await trio.lowlevel.cancel_shielded_checkpoint()
            raise
        finally:
            if owned >= 0:
                os.close(owned)


async def _send_guarded(stream: ZeroCopyStream, fd: int, offset: int, count: int) -> None:
    """Send, breaking the stream on any failure or cancellation part way:
    the peer may have received a prefix (as ``ZeroCopyStream._send_guarded``)."""
    from ._stream import _stream_error

    manager = stream.manager
    try:
        if manager.ring is None:
            await stream._drain()
            await _send_sendfile(stream, fd, offset, count)
        elif count >= SPLICE_MIN_BYTES and "SPLICE" in manager.features.ops:
            await stream._drain()
            await _send_splice(stream, fd, offset, count)
        else:
            await _send_read(stream, fd, offset, count)
    except _SendingError as wrapped:
        exc = wrapped.exc
        stream.break_sending(exc)
        raise _stream_error(stream, exc, "sending") from exc
    except BaseException as exc:
        stream.break_sending(exc)
        raise


def _file_error(exc_errno: int, sent: int, offset: int) -> OSError:
    return OSError(
        exc_errno,
        f"send_file() could not read the file at offset {offset + sent}: "
        f"{os.strerror(exc_errno)}; {sent} bytes had been sent, so the stream is now broken",
    )


# -- the three paths -------------------------------------------------------------


async def _send_splice(
    stream: ZeroCopyStream, fd: int, offset: int, count: int, sent: int = 0
) -> None:
    """file -> pipe -> socket, one pipe-full at a time, from byte ``sent``
    of the ``count`` at ``offset`` (those before it were sent otherwise).

    The requests on the socket name the stream as their owner, so that the
    manager's socket check ends them if other code closes the socket.
    Spliced pages are plain socket data to the requests that follow them
    (``after_plain_sends``)."""
    stream._before_plain_sends()
    manager = stream.manager
    pool = pipe_pool()
    pipe = pool.acquire()
    in_pipe = 0
    try:
        while sent < count:
            if not in_pipe:
                want = min(pipe.size, count - sent)
                res = await manager.submit(
                    prep_splice, fd, offset + sent, pipe.w, -1, want, _abi.SPLICE_F_MOVE
                )
                if res < 0:
                    raise _file_error(-res, sent, offset)
                if res == 0:
                    raise FileTruncatedError(sent, count, offset)
                in_pipe = res
            stream.check_open()
            res = await manager.submit(
                prep_splice, pipe.r, -1, stream.fd, -1, in_pipe, 0, op=Operation(stream)
            )
            if res == -errno.EAGAIN:
                # The socket is nonblocking (trio's are): wait for room.
                stream.check_open()
                await manager.submit(prep_poll_add, stream.fd, _POLLOUT, op=Operation(stream))
                continue
            if res < 0:
                stream.check_open()  # cancelled by the socket check: its socket closed
                raise _SendingError(OSError(-res, os.strerror(-res)))
            in_pipe -= res
            sent += res
            stream.counters.sent(res)
    finally:
        pool.release(pipe, empty=not in_pipe)


async def _send_read(stream: ZeroCopyStream, fd: int, offset: int, count: int) -> None:
    """READ_FIXED into the stream's outbound queue, then its send path.

    Each read fills the free bytes at the queue's tail (so a small body
    lands right after the headers queued before it and goes out in the same
    request), the bytes are queued like ``send_all``'s, and the send path
    sends them with the stream's strategy: zero copy from the slices where
    the kernel does it.  The kernel writes only into bytes the queue has
    reserved, which no request reads until they are committed.  When other
    streams hold every free slice, the rest goes by splice (no slice needed)
    rather than wait for them.
    """
    manager = stream.manager
    queue = stream.queue
    slice_size = manager.arena.slice_size
    sent = 0
    while sent < count:
        room = slice_size - queue.fill if 0 <= queue.tail and queue.fill < slice_size else 0
        want = min(room or slice_size, count - sent)
        view = queue.reserve(want)
        while view is None:
            if not await stream._wait_for_room():
                # Every slice is held by other streams: send the rest
                # without the arena, after what is queued.
                stream._going_without_the_arena()
                await stream._drain()
                if "SPLICE" in manager.features.ops:
                    await _send_splice(stream, fd, offset, count, sent)
                else:
                    await _send_sendfile(stream, fd, offset, count, sent)
                return
            stream.check_open()
            view = queue.reserve(want)
        view.release()
        start = queue.tail_offset + queue.fill
        try:
            res = await _read_exactly(manager, fd, start, want, offset + sent)
        except BaseException:
            queue.unreserve()
            raise
        if res <= 0 or stream._closed or stream._send_broken is not None:
            queue.unreserve()
            stream.check_open()
            # The kernel failed bytes queued before these while the file was
            # read, and that cleared the queue: these cannot follow them.
            stream._raise_if_broken()
            # What was read is an intact prefix: send it before saying how
            # much of the file was sent.
            await stream._drain()
            if res < 0:
                raise _file_error(-res, sent, offset)
            raise FileTruncatedError(sent, count, offset)
        queue.commit(want)
        stream._queued(stream.ticker.tick)
        sent += want


async def _read_exactly(
    manager: IOManager, fd: int, arena_offset: int, length: int, file_pos: int
) -> int:
    """READ_FIXED ``length`` bytes into the arena, continuing short reads.

    Returns ``length``, 0 if the file ended first (it was truncated under
    us: ``count`` was checked against its size) or ``-errno``.
    """
    arena = manager.arena
    done = 0
    while done < length:
        res = await manager.submit(
            prep_read_fixed,
            fd,
            arena.base + arena_offset + done,
            length - done,
            file_pos + done,
            arena.buf_index,
        )
        if res <= 0:
            return res
        done += res
    return done


async def _send_sendfile(
    stream: ZeroCopyStream, fd: int, offset: int, count: int, sent: int = 0
) -> None:
    """``os.sendfile`` on the nonblocking socket, waiting for room between
    calls, from byte ``sent`` of the ``count`` at ``offset``.  Disk reads
    block the loop here: the fallback without a ring.  Its bytes are plain
    socket data to the requests that follow them (``after_plain_sends``)."""
    stream._before_plain_sends()
    while sent < count:
        stream.check_open()
        try:
            n = os.sendfile(stream.fd, fd, offset + sent, count - sent)
        except BlockingIOError:
            await stream.socket.wait_writable()
            continue
        except OSError as exc:
            raise _SendingError(exc) from exc
        if n == 0:
            raise FileTruncatedError(sent, count, offset)
        sent += n
        stream.counters.sent(n)
