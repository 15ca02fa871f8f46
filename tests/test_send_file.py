"""ZeroCopyStream.send_file: a file's bytes to the peer, never through Python.

Every test runs under every strategy this kernel has (the ``manager``
fixture).  Both io_uring paths are exercised whatever the file size by
moving ``SPLICE_MIN_BYTES`` (the ``path`` fixture): ``splice`` sends every
count through a pipe, ``read`` every count through READ_FIXED and the
stream's send path.  The ``socket`` strategy has no ring and always uses
``os.sendfile``.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import os
import pathlib
import resource
import socket as stdlib_socket
from collections.abc import AsyncIterator, Iterator

import pytest
import trio
import trio.testing
from _reliability_helpers import fd_count, rst_close, run_python, vectored_fixed_with_a_successor
from _streams import clog, runnable_strategies

import trio_uring
from trio_uring import _sendfile

MiB = 1 << 20
#: Small socket buffers make a peer that does not read stop the sender
#: after a few hundred KiB, whatever the host's TCP autotuning allows.
CLOGGED_BUFFER = 32 * 1024


@pytest.fixture(params=["splice", "read"])
def path(request: pytest.FixtureRequest, strategy: str, monkeypatch: pytest.MonkeyPatch) -> str:
    if strategy == "socket" and request.param == "read":
        pytest.skip("without a ring there is one path, os.sendfile: tested as 'splice'")
    monkeypatch.setattr(_sendfile, "SPLICE_MIN_BYTES", 0 if request.param == "splice" else 1 << 62)
    return request.param


def make_file(directory: pathlib.Path, size: int, name: str = "data.bin") -> tuple[str, bytes]:
    data = os.urandom(size)
    target = directory / name
    target.write_bytes(data)
    return str(target), data


async def stream_pair(
    *, clogged: bool = False
) -> tuple[trio_uring.ZeroCopyStream, trio.SocketStream]:
    """A ZeroCopyStream over loopback TCP and its peer, a trio SocketStream."""
    listener = stdlib_socket.socket()
    client = stdlib_socket.socket()
    if clogged:
        # Set before the handshake, so the window is small from the start.
        listener.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_RCVBUF, CLOGGED_BUFFER)
        client.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_SNDBUF, CLOGGED_BUFFER)
    with listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client.connect(listener.getsockname())
        server, _ = listener.accept()
    client.setblocking(False)
    server.setblocking(False)
    stream = trio_uring.ZeroCopyStream(trio.socket.from_stdlib_socket(client))
    return stream, trio.SocketStream(trio.socket.from_stdlib_socket(server))


async def read_all(peer: trio.abc.ReceiveStream, into: bytearray | None = None) -> bytes:
    """Read to EOF; return the SHA-256 of what arrived (and keep it in ``into``)."""
    digest = hashlib.sha256()
    while data := await peer.receive_some(MiB):
        digest.update(data)
        if into is not None:
            into += data
    return digest.digest()


async def send_and_receive(
    send: object, peer: trio.SocketStream, stream: trio_uring.ZeroCopyStream
) -> tuple[object, bytes]:
    """Run ``send()``, close the stream, and return its result and the digest
    of everything the peer received."""
    result: list[object] = []
    digest: list[bytes] = []

    async def reader() -> None:
        digest.append(await read_all(peer))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        result.append(await send())  # type: ignore[operator]
        await stream.aclose()
    return result[0], digest[0]


# -- integrity ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 4095, MiB + 1])
async def test_integrity(manager, path, tmp_path, size: int) -> None:
    name, data = make_file(tmp_path, size)
    stream, peer = await stream_pair()
    async with peer:
        sent, digest = await send_and_receive(lambda: stream.send_file(name), peer, stream)
    assert sent == size
    assert digest == hashlib.sha256(data).digest()
    assert stream.stats().bytes_sent == size


async def test_integrity_64_mib(manager, path, tmp_path) -> None:
    name, data = make_file(tmp_path, 64 * MiB)
    stream, peer = await stream_pair()
    async with peer:
        sent, digest = await send_and_receive(lambda: stream.send_file(name), peer, stream)
    assert sent == 64 * MiB
    assert digest == hashlib.sha256(data).digest()


async def test_after_send_all_in_order(manager, path, tmp_path) -> None:
    """Bytes sent earlier on the stream arrive before the file, and after it
    the stream goes on as usual."""
    name, data = make_file(tmp_path, 300_000)
    stream, peer = await stream_pair()
    got = bytearray()

    async def send() -> None:
        await stream.send_all(b"head")
        await stream.send_file(name)
        await stream.send_all(b"tail")
        await stream.send_file(name, 5, 7)

    async with peer, trio.open_nursery() as nursery:
        nursery.start_soon(read_all, peer, got)
        await send()
        await stream.aclose()
    assert bytes(got) == b"head" + data + b"tail" + data[5:12]


async def test_a_splice_moves_the_stream_to_its_strategys_successor(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spliced pages are plain socket data to the requests after them, so a
    strategy that does not mix with plain sends (``after_plain_sends``: the
    bundle strategy names fixed-single; the seed kernel's guest checks that
    case) is left before the first splice, and not for a file read into
    the queue.  Here vectored-fixed is given that successor for the test."""
    vectored_fixed_with_a_successor(monkeypatch)
    small, small_data = make_file(tmp_path, 1000, "small.bin")
    large, large_data = make_file(tmp_path, _sendfile.SPLICE_MIN_BYTES, "large.bin")
    async with trio_uring.open_manager(strategy="vectored-fixed"):
        stream, peer = await stream_pair()
        got = bytearray()
        async with peer, trio.open_nursery() as nursery:
            nursery.start_soon(read_all, peer, got)
            await stream.send_file(small)  # read into the queue
            assert stream.strategy.name == "vectored-fixed"
            await stream.send_file(large)  # spliced
            assert stream.strategy.name == "fixed-single"
            await stream.send_all(b"tail")
            await stream.aclose()
    assert bytes(got) == small_data + large_data + b"tail"


@pytest.mark.parametrize("fallback", ["splice", "sendfile"])
async def test_a_file_sent_without_the_arena_moves_the_stream_to_its_successor(
    tmp_path, monkeypatch: pytest.MonkeyPatch, fallback: str
) -> None:
    """A file that would be read into the queue, while other streams hold
    every slice, goes by splice (or ``sendfile`` where the ring cannot
    splice): plain socket data, so the stream leaves a strategy that does
    not mix with it, whichever of the two sends it.  Here vectored-fixed is
    given the bundle strategy's successor for the test."""
    vectored_fixed_with_a_successor(monkeypatch)
    body, data = make_file(tmp_path, 1000)
    async with trio_uring.open_manager(strategy="vectored-fixed") as manager:
        if fallback == "sendfile":
            ops = manager.features.ops - {"SPLICE"}
            monkeypatch.setattr(manager, "features", dataclasses.replace(manager.features, ops=ops))
        stream, peer = await stream_pair()
        free = manager.arena.free_slices
        taken = free[:]
        free.clear()
        got = bytearray()
        try:
            async with peer, trio.open_nursery() as nursery:
                nursery.start_soon(read_all, peer, got)
                await stream.send_file(body)  # no slice free: spliced or sendfile()
                assert stream.strategy.name == "fixed-single"
                assert manager.stats()["arena_full_sends"] == 1
                free.extend(taken)
                taken = []
                await stream.send_all(b"tail")
                await stream.aclose()
        finally:
            free.extend(taken)
    assert bytes(got) == data + b"tail"


@pytest.mark.parametrize(
    ("offset", "count"),
    [
        (0, None),
        (1, None),
        (0, 0),
        (17, 1),
        (4095, 70_000),
        (100_000, None),
        (0, 300_000),
        (299_999, None),
        (300_000, None),
        (300_000, 0),
    ],
)
async def test_offset_and_count(manager, path, tmp_path, offset: int, count: int | None) -> None:
    name, data = make_file(tmp_path, 300_000)
    stream, peer = await stream_pair()
    expected = data[offset:] if count is None else data[offset : offset + count]
    async with peer:
        sent, digest = await send_and_receive(
            lambda: stream.send_file(name, offset, count), peer, stream
        )
    assert sent == len(expected)
    assert digest == hashlib.sha256(expected).digest()


# -- what ``file`` may be ------------------------------------------------------------


async def test_path_file_object_and_fd(manager, tmp_path) -> None:
    name, data = make_file(tmp_path, 100_000)
    stream, peer = await stream_pair()
    got = bytearray()
    with open(name, "rb") as fobj:
        fobj.seek(10)
        fd = os.open(name, os.O_RDONLY)
        try:
            async with peer, trio.open_nursery() as nursery:
                nursery.start_soon(read_all, peer, got)
                assert await stream.send_file(name) == len(data)
                assert await stream.send_file(pathlib.Path(name), 1, 2) == 2
                assert await stream.send_file(os.fsencode(name), 3, 4) == 4
                assert await stream.send_file(fobj) == len(data)
                assert await stream.send_file(fd, 50) == len(data) - 50
                async with await trio.open_file(name, "rb") as afile:
                    assert await stream.send_file(afile, 0, 9) == 9
                await stream.aclose()
            # The offset is absolute: the position of a file object is
            # neither used nor moved, and the fd stays open.
            assert fobj.tell() == 10
            assert os.fstat(fd).st_size == len(data)
        finally:
            os.close(fd)
    assert bytes(got) == data + data[1:3] + data[3:7] + data + data[50:] + data[:9]


async def test_zero_bytes_is_a_checkpoint(manager, tmp_path) -> None:
    name, _ = make_file(tmp_path, 0)
    stream, peer = await stream_pair()
    async with stream, peer:
        with trio.testing.assert_checkpoints():
            assert await stream.send_file(name) == 0
        with trio.CancelScope() as scope:
            scope.cancel()
            with pytest.raises(trio.Cancelled):
                await stream.send_file(name)
        # Cancelled before anything happened: the stream is still usable.
        await stream.send_all(b"ok")
        assert await peer.receive_some(10) == b"ok"


# -- bad input: clear errors, nothing sent, the stream stays usable ---------------


@pytest.fixture
def bad_files(tmp_path) -> Iterator[dict[str, object]]:
    """Things send_file must refuse, keyed by what they are."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    r, w = os.pipe()
    sock_a, sock_b = stdlib_socket.socketpair()
    wronly = os.open(tmp_path / "wronly", os.O_WRONLY | os.O_CREAT)
    nonblocking = os.open(tmp_path / "wronly", os.O_RDONLY | os.O_NONBLOCK)
    # The highest fd allowed: no other test code opens that far up.
    closed_fd = resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 1
    closed_file = open(tmp_path / "wronly", "rb")
    closed_file.close()
    try:
        yield {
            "directory": (str(tmp_path), IsADirectoryError, "is a directory"),
            "fifo path": (str(fifo), ValueError, "is a pipe or FIFO"),
            "pipe fd": (r, ValueError, "is a pipe or FIFO"),
            "socket": (sock_a, ValueError, "is a socket"),
            "char device": ("/dev/null", ValueError, "is a character device"),
            "missing": (str(tmp_path / "missing"), FileNotFoundError, "can't open"),
            "write-only fd": (wronly, ValueError, "write-only"),
            "O_NONBLOCK fd": (nonblocking, ValueError, "O_NONBLOCK"),
            "closed fd": (closed_fd, OSError, "Bad file descriptor"),
            "negative fd": (-1, ValueError, "negative file descriptor"),
            "closed file": (closed_file, ValueError, "closed file"),
            "BytesIO": (io.BytesIO(b"abc"), TypeError, "has none"),
            "float": (1.5, TypeError, "takes a path"),
            "bool": (True, TypeError, "not a bool"),
            "None": (None, TypeError, "takes a path"),
            "NUL in path": ("a\0b", ValueError, "NUL"),
        }
    finally:
        for fd in (r, w, wronly, nonblocking):
            os.close(fd)
        sock_a.close()
        sock_b.close()


BAD_FILES = [
    "directory",
    "fifo path",
    "pipe fd",
    "socket",
    "char device",
    "missing",
    "write-only fd",
    "O_NONBLOCK fd",
    "closed fd",
    "negative fd",
    "closed file",
    "BytesIO",
    "float",
    "bool",
    "None",
    "NUL in path",
]


@pytest.mark.parametrize("kind", BAD_FILES)
async def test_bad_file(manager, bad_files, kind: str) -> None:
    file, error, words = bad_files[kind]
    stream, peer = await stream_pair()
    async with stream, peer:
        with pytest.raises(error, match=words):
            await stream.send_file(file)
        await stream.send_all(b"still usable")
        assert await peer.receive_some(100) == b"still usable"


#: Files refused only after the call's cancellation point, without a wait:
#: an fd, or a path opened with open() (no ring, or no OPENAT); a path the
#: ring opens is refused after that request.  (The other kinds are refused
#: with the arguments, before the cancellation point.)
REFUSED_AT_ONCE = [
    (strategy, kind)
    for strategy in runnable_strategies()
    for kind in BAD_FILES
    if kind not in ("negative fd", "closed file", "BytesIO", "float", "bool", "None")
    and (
        strategy == "socket"
        or "OPENAT" not in trio_uring.features().ops
        or kind not in ("directory", "fifo path", "char device", "missing")
    )
]


@pytest.mark.parametrize(("strategy", "kind"), REFUSED_AT_ONCE)
async def test_a_file_refused_at_once_is_refused_at_a_checkpoint(
    manager, bad_files, kind: str
) -> None:
    """A file refused without waiting for anything is refused at a full
    checkpoint all the same; a cancelled call raises Cancelled first."""
    file, error, words = bad_files[kind]
    stream, peer = await stream_pair()
    async with stream, peer:
        with trio.CancelScope() as scope:
            scope.cancel()
            with pytest.raises(trio.Cancelled):
                await stream.send_file(file)
        with trio.testing.assert_checkpoints():
            with pytest.raises(error, match=words):
                await stream.send_file(file)


@pytest.mark.parametrize(
    ("offset", "count", "error", "words"),
    [
        (-1, None, ValueError, "offset must be >= 0"),
        (1001, None, ValueError, "past the end"),
        (0, 1001, ValueError, "has only 1000 there .* nothing was sent"),
        (990, 11, ValueError, "has only 10 there"),
        (0, -1, ValueError, "count must be >= 0"),
        (1.0, None, TypeError, "offset must be an int"),
        ("0", None, TypeError, "offset must be an int"),
        (0, 2.5, TypeError, "count must be an int or None"),
    ],
)
async def test_bad_offset_or_count(
    manager, tmp_path, offset: object, count: object, error: type, words: str
) -> None:
    name, _ = make_file(tmp_path, 1000)
    stream, peer = await stream_pair()
    async with stream, peer:
        with pytest.raises(error, match=words):
            await stream.send_file(name, offset, count)  # type: ignore[arg-type]
        await stream.send_all(b"still usable")
        assert await peer.receive_some(100) == b"still usable"


async def test_closed_and_eof(manager, tmp_path) -> None:
    name, _ = make_file(tmp_path, 10)
    stream, peer = await stream_pair()
    async with peer:
        await stream.send_eof()
        with pytest.raises(trio.ClosedResourceError, match="after sending EOF"):
            await stream.send_file(name)
        await stream.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await stream.send_file(name)


# -- while a file is on its way ---------------------------------------------------------


@pytest.fixture
async def big_file(tmp_path) -> AsyncIterator[tuple[str, bytes]]:
    """32 MiB: far more than a clogged connection holds."""
    yield make_file(tmp_path, 32 * MiB)


async def test_concurrent_send_is_busy(manager, path, big_file) -> None:
    name, data = big_file
    stream, peer = await stream_pair(clogged=True)
    got = bytearray()
    async with stream, peer, trio.open_nursery() as nursery:
        nursery.start_soon(stream.send_file, name)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await stream.send_all(b"x")
        with pytest.raises(trio.BusyResourceError):
            await stream.send_file(name)
        with pytest.raises(trio.BusyResourceError):
            await stream.send_eof()
        # The file still arrives whole once the peer reads.
        while len(got) < len(data):
            got += await peer.receive_some(MiB)
    assert bytes(got) == data


async def test_cancel_mid_file_breaks_the_stream(manager, path, big_file) -> None:
    name, data = big_file
    stream, peer = await stream_pair(clogged=True)
    before = fd_count()
    got = bytearray()
    async with peer:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.send_file, name)
                # Part of the file is out: the cancellation comes mid-file.
                while len(got) < 256 * 1024:
                    got += await peer.receive_some(MiB)
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel()
        assert scope.cancelled_caught
        with pytest.raises(trio.BrokenResourceError, match="cancelled part way"):
            await stream.send_all(b"x")
        with pytest.raises(trio.BrokenResourceError):
            await stream.send_file(name)
        # What arrived is a prefix of the file, never anything else.
        await stream.aclose()
        await read_all(peer, got)
        assert 256 * 1024 <= len(got) < len(data)
        assert bytes(got) == data[: len(got)]
    # No file, pipe or request left behind: the opened file is closed, a
    # pipe that may hold bytes is closed rather than reused.
    assert fd_count() <= before
    if manager.ring is not None:
        assert not manager.ring.table
        pool = _sendfile.pipe_pool()
        assert pool.leased == 0
    assert manager.arena.free_count == manager.arena.n_slices


async def test_truncated_while_sending(manager, path, big_file) -> None:
    name, data = big_file
    stream, peer = await stream_pair(clogged=True)
    got = bytearray()
    errors: list[BaseException] = []

    async def send() -> None:
        try:
            await stream.send_file(name)
        except trio_uring.FileTruncatedError as exc:
            errors.append(exc)
        await stream.aclose()

    async with peer, trio.open_nursery() as nursery:
        nursery.start_soon(send)
        await trio.testing.wait_all_tasks_blocked()
        # Cut at a page boundary: the page cache zeroes the tail of a
        # partly cut page, and a spliced page is shared with the socket.
        os.truncate(name, MiB)
        await read_all(peer, got)
    (exc,) = errors
    assert isinstance(exc, trio_uring.FileTruncatedError)
    assert exc.expected == len(data)
    assert exc.sent == len(got) < len(data)
    assert f"{exc.sent} of {len(data)} bytes were sent" in str(exc)
    assert bytes(got) == data[: len(got)]
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_all(b"x")


async def test_truncated_stream_is_broken(manager, big_file) -> None:
    name, _ = big_file
    stream, peer = await stream_pair(clogged=True)
    async with stream, peer, trio.open_nursery() as nursery:

        async def send() -> None:
            with pytest.raises(trio_uring.FileTruncatedError):
                await stream.send_file(name)
            with pytest.raises(trio.BrokenResourceError) as info:
                await stream.send_all(b"x")
            assert isinstance(info.value.__cause__, trio_uring.FileTruncatedError)
            await stream.aclose()  # the peer's read_all ends

        nursery.start_soon(send)
        await trio.testing.wait_all_tasks_blocked()
        os.truncate(name, 0)
        await read_all(peer)


async def test_peer_reset_is_broken_resource(manager, path, big_file) -> None:
    name, _ = big_file
    stream, peer = await stream_pair(clogged=True)
    async with stream, trio.open_nursery() as nursery:

        async def send() -> None:
            with pytest.raises(trio.BrokenResourceError) as info:
                await stream.send_file(name)
            assert isinstance(info.value.__cause__, OSError)
            assert info.value.__cause__.errno in (errno.ECONNRESET, errno.EPIPE)

        nursery.start_soon(send)
        await trio.testing.wait_all_tasks_blocked()
        rst_close(peer.socket)


@pytest.mark.parametrize("size", [100, MiB])
@pytest.mark.parametrize("strategy", ["socket"])
async def test_a_file_to_a_reset_peer_without_a_ring_is_a_checkpoint(
    manager, tmp_path, size: int
) -> None:
    """Without a ring, send_file's first sendfile() fails at once on a reset
    connection: the call raises at a full checkpoint all the same, and a
    cancelled call raises Cancelled first."""
    name, _ = make_file(tmp_path, size)
    stream, peer = await stream_pair()
    rst_close(peer.socket)
    await trio.sleep(0.05)  # the reset arrives
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await stream.send_file(name)
    with trio.testing.assert_checkpoints():
        with pytest.raises(trio.BrokenResourceError):
            await stream.send_file(name)
    await trio.aclose_forcefully(stream)


async def test_a_reset_while_the_file_is_read_breaks_the_stream_and_loses_no_slice(
    manager, strategy, tmp_path, monkeypatch
) -> None:
    """Queued bytes fail (the peer reset) while send_file waits for its
    READ_FIXED: the failure cleared the queue, so the bytes read must not be
    queued behind what was lost.  send_file raises BrokenResourceError, and
    every slice goes back to the arena."""
    if strategy == "socket":
        pytest.skip("without a ring, send_file reads nothing into the queue")
    monkeypatch.setattr(_sendfile, "SPLICE_MIN_BYTES", 1 << 62)
    name, _ = make_file(tmp_path, 100)
    stream, peer = await stream_pair(clogged=True)
    arena = manager.arena
    await clog(stream)
    # More than a send may put past a full socket's limit, and under
    # ``copy`` queued (under ``direct_min``), not sent from the caller's
    # buffer, which would wait in send_all.
    await stream.send_all(b"y" * min(100_000, stream.direct_min - 1))
    await trio.testing.wait_all_tasks_blocked()
    assert stream.in_flight is not None  # the flush's send waits for the socket
    fd = os.open(name, os.O_RDONLY)
    try:
        rst_close(peer.socket)
        # An fd, not a path: opening a path may wait, and the failure would
        # be in before the read began.
        with pytest.raises(trio.BrokenResourceError) as info:
            await stream.send_file(fd)
    finally:
        os.close(fd)
    assert info.value.__cause__.errno in (errno.ECONNRESET, errno.EPIPE)
    await stream.aclose()
    lost = [i for i in range(arena.n_slices) if arena.refs[i] == 0 and i not in arena.free_slices]
    assert lost == []
    assert not stream.queue.unsent


async def test_aclose_from_another_task(manager, path, big_file) -> None:
    name, _ = big_file
    stream, peer = await stream_pair(clogged=True)
    async with peer, trio.open_nursery() as nursery:

        async def send() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await stream.send_file(name)

        nursery.start_soon(send)
        await trio.testing.wait_all_tasks_blocked()
        await stream.aclose()


# -- pipes ----------------------------------------------------------------------------


async def test_pipes_are_reused(manager, tmp_path) -> None:
    if manager.ring is None:
        pytest.skip("the socket strategy sends with os.sendfile, without pipes")
    name, data = make_file(tmp_path, 2 * MiB)
    stream, peer = await stream_pair()
    async with peer:
        pool = _sendfile.pipe_pool()
        made = []
        real = _sendfile.Pipe

        def counting_pipe() -> _sendfile.Pipe:
            made.append(real())
            return made[-1]

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(_sendfile, "Pipe", counting_pipe)

            async def send_three() -> None:
                for _ in range(3):
                    await stream.send_file(name)

            _, digest = await send_and_receive(send_three, peer, stream)
        assert digest == hashlib.sha256(data * 3).digest()
        assert len(made) <= 1
        assert pool.leased == 0


def test_no_fd_left_after_the_run(tmp_path) -> None:
    """Idle pipes and opened files are closed by the end of the run."""
    name, data = make_file(tmp_path, 3 * MiB)

    async def main() -> None:
        stream, peer = await stream_pair()
        async with peer:
            _, digest = await send_and_receive(lambda: stream.send_file(name), peer, stream)
        assert digest == hashlib.sha256(data).digest()
        if trio_uring.current_manager().ring is not None:
            assert len(_sendfile.pipe_pool().idle) == 1

    trio.run(main)  # the first run creates the process-wide pieces
    before = fd_count()
    trio.run(main)
    assert fd_count() == before


# -- without io_uring ------------------------------------------------------------------

_FALLBACK_PROGRAM = """
import hashlib, json, os, sys, tempfile, trio, trio_uring
sys.path.insert(0, "tests")
from test_send_file import read_all, stream_pair

async def main():
    with tempfile.TemporaryDirectory() as d:
        name = os.path.join(d, "f")
        data = os.urandom(3 << 20)
        with open(name, "wb") as fh:
            fh.write(data)
        stream, peer = await stream_pair()
        got = []
        async with peer, trio.open_nursery() as nursery:
            async def reader():
                got.append(await read_all(peer))
            nursery.start_soon(reader)
            sent = await stream.send_file(name)
            with open(name, "rb") as fobj:
                sent += await stream.send_file(fobj, 5, 10)
            await stream.aclose()
    return {
        "sent": sent,
        "intact": got[0] == hashlib.sha256(data + data[5:15]).digest(),
        "strategy": stream.stats().strategy,
        "ring": trio_uring.current_manager().ring is not None,
    }

print(json.dumps(trio.run(main)))
"""


def test_without_io_uring() -> None:
    proc = run_python(_FALLBACK_PROGRAM, env={"TRIO_URING_DISABLE": "1"}, timeout=60)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"sent": (3 << 20) + 10, "intact": True, "strategy": "socket", "ring": False}


def test_suite_passes_without_io_uring() -> None:
    """This whole module again, in a fresh interpreter where io_uring is gone."""
    proc = run_python(
        "import sys, pytest\n"
        "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-k', 'not without_io_uring', "
        "'tests/test_send_file.py']))\n",
        env={"TRIO_URING_DISABLE": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout


async def test_send_file_copies_nothing_in_user_space(manager, path, tmp_path) -> None:
    """Neither the splice path nor the READ_FIXED path copies a byte through
    Python: ``stats().bytes_copied`` stays 0 (a header queued by send_all
    counts, the file does not; plain-send strategies send a lone header at
    once, copying nothing)."""
    name, data = make_file(tmp_path, 300_000)
    stream, peer = await stream_pair()
    async with stream, peer, trio.open_nursery() as nursery:
        got = bytearray()
        nursery.start_soon(read_all, peer, got)
        await stream.send_all(b"head")
        await stream.send_file(name)
        await stream.send_file(name, 1000, 5000)
        await stream.send_eof()
    assert bytes(got) == b"head" + data + data[1000:6000]
    assert stream.stats().bytes_copied == (0 if manager.strategy in ("socket", "copy") else 4)
