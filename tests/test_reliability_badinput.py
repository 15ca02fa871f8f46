"""Issue 5, item 5: bad input gets a clear TypeError/ValueError.

Each message must say what to pass instead, and a rejected call must leave
the stream usable (a bad argument is not a network error).
"""

from __future__ import annotations

import array
import os
import socket

import pytest
import trio
from _reliability_helpers import assert_quiet, settle, stream_pair, trio_pair

import trio_uring


@pytest.mark.parametrize(
    "data",
    ["text", 42, None, 3.5, ["a"], object()],
    ids=["str", "int", "None", "float", "list", "object"],
)
async def test_send_all_rejects_non_bytes(data: object) -> None:
    a, b = stream_pair()
    async with a, b:
        with pytest.raises(TypeError, match=r"bytes-like object.*bytes, bytearray, memoryview"):
            await a.send_all(data)  # type: ignore[arg-type]
        # Not a network error: the stream is not broken.
        await a.send_all(b"fine")
        assert await b.receive_some() == b"fine"


async def test_send_all_rejects_strided_memoryview() -> None:
    a, b = stream_pair()
    async with a, b:
        strided = memoryview(b"abcdefgh")[::2]
        with pytest.raises(ValueError, match=r"contiguous.*bytes\(view\)"):
            await a.send_all(strided)
        # The suggested fix works, and the stream still does.
        await a.send_all(bytes(strided))
        assert await b.receive_some() == b"aceg"


async def test_send_all_accepts_any_contiguous_buffer() -> None:
    a, b = stream_pair()
    async with a, b:
        ints = array.array("i", range(1000))
        two_d = memoryview(bytearray(range(256)) * 4).cast("B", (32, 32))
        expected = ints.tobytes() + two_d.tobytes() + b"xyz"
        await a.send_all(ints)
        await a.send_all(two_d)
        await a.send_all(bytearray(b"xyz"))
        got = b""
        while len(got) < len(expected):
            got += await b.receive_some()
        assert got == expected


@pytest.mark.parametrize("max_bytes", [0, -1, -(2**70)])
async def test_receive_some_rejects_non_positive(max_bytes: int) -> None:
    a, b = stream_pair()
    async with a, b:
        with pytest.raises(ValueError, match=">= 1"):
            await b.receive_some(max_bytes)
        await a.send_all(b"ok")
        assert await b.receive_some() == b"ok"


@pytest.mark.parametrize("max_bytes", [1.5, "10", b"1"])
async def test_receive_some_rejects_non_int(max_bytes: object) -> None:
    a, b = stream_pair()
    async with a, b:
        with pytest.raises(TypeError, match="max_bytes must be an int"):
            await b.receive_some(max_bytes)  # type: ignore[arg-type]


@pytest.mark.parametrize("max_bytes", [2**31, 2**62, 2**200])
async def test_receive_some_huge_max_bytes(max_bytes: int) -> None:
    """Huge requests are capped (receive_some may return less), not an
    overflow, a MemoryError or a giant allocation."""
    a, b = stream_pair()
    async with a, b:
        await a.send_all(b"x" * 1000)
        got = b""
        with trio.fail_after(5):
            while len(got) < 1000:
                got += await b.receive_some(max_bytes)
        assert got == b"x" * 1000


async def test_from_socket_rejects_closed_socket() -> None:
    a, b = trio_pair()
    a.close()
    with pytest.raises(ValueError, match="open socket"):
        trio_uring.ZeroCopyStream.from_socket(a)
    b.close()


@pytest.mark.parametrize("kind", ["int", "stdlib", "file"])
async def test_from_socket_rejects_non_trio_sockets(kind: str) -> None:
    if kind == "int":
        fd = os.open("/dev/null", os.O_RDONLY)
        thing: object = fd
    elif kind == "stdlib":
        thing = socket.socket()
    else:
        thing = open(os.devnull, "rb")
    try:
        with pytest.raises(TypeError, match=r"trio socket.*from_stdlib_socket"):
            trio_uring.ZeroCopyStream.from_socket(thing)  # type: ignore[arg-type]
    finally:
        if kind == "int":
            os.close(fd)
        else:
            thing.close()  # type: ignore[attr-defined]


async def test_from_socket_rejects_udp() -> None:
    udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with udp:
        await udp.bind(("127.0.0.1", 0))
        with pytest.raises(ValueError, match=r"SOCK_STREAM.*UDP"):
            trio_uring.ZeroCopyStream.from_socket(udp)


async def test_listener_rejects_udp_and_unlistening() -> None:
    udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with udp:
        with pytest.raises(ValueError, match="SOCK_STREAM"):
            trio_uring.ZeroCopyListener(udp)
    tcp = trio.socket.socket()
    with tcp:
        await tcp.bind(("127.0.0.1", 0))
        with pytest.raises(ValueError, match="listen"):
            trio_uring.ZeroCopyListener(tcp)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"arena_size": -1}, ValueError, "at least one slice"),
        ({"arena_size": 0}, ValueError, "at least one slice"),
        ({"slice_size": 0}, ValueError, "at least one slice"),
        ({"slice_size": -4096}, ValueError, "at least one slice"),
        ({"arena_size": "4M"}, TypeError, "must be ints"),
        ({"arena_size": 2 << 30}, ValueError, "1 GiB"),
        ({"strategy": "warp-drive"}, ValueError, "choose one of"),
    ],
)
async def test_open_manager_rejects_bad_sizes(kwargs: dict, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        async with trio_uring.open_manager(**kwargs):
            pass


@pytest.mark.parametrize("entries", [0, -1, 1 << 20])
async def test_open_manager_rejects_bad_entries(entries: int) -> None:
    if not trio_uring.features().io_uring:
        pytest.skip("entries only matter with io_uring")
    with pytest.raises(ValueError, match="entries"):
        async with trio_uring.open_manager(entries=entries):
            pass


async def test_bad_input_leaves_no_trace() -> None:
    async with trio_uring.open_manager(arena_size=64 * 1024, slice_size=16 * 1024) as manager:
        a, b = stream_pair()
        async with a, b:
            for bad in ("s", 1, memoryview(b"abcd")[::2]):
                with pytest.raises((TypeError, ValueError)):
                    await a.send_all(bad)  # type: ignore[arg-type]
            for bad_size in (0, -5):
                with pytest.raises(ValueError):
                    await b.receive_some(bad_size)
            await a.send_all(b"still fine")
            assert await b.receive_some() == b"still fine"
        await settle(manager)
        assert_quiet(manager)
