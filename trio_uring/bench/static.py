"""Scenario (e): static files over HTTP/1.1, served by each library, loaded by wrk.

Every contender serves the same tiny HTTP/1.1 protocol (GET, keep-alive,
``Content-Length``) with the same hand-written request parsing, so that the
measurement compares how each library gets a file's bytes onto the socket,
in the idiom it documents:

* ``trio``: ``trio.open_file`` (a worker thread per open and read) and
  ``SocketStream.send_all`` of what was read;
* ``zc:auto``: ``ZeroCopyStream.send_file`` (io_uring open, then splice or
  READ_FIXED; the bytes never enter Python);
* ``asyncio``: ``loop.sock_sendfile`` on the accepted socket
  (``os.sendfile``, disk reads in the loop);
* ``uvloop``: it has no ``sock_sendfile`` (``NotImplementedError``), so
  what its users write: a blocking ``read()`` and ``sock_sendall``.

Each request opens the file, as a server of files that change would.  The
files come from the page cache (written and read once before the run).
``wrk`` drives the server from its own process; the server's CPU time per
GiB of body comes from ``/proc/PID/stat``.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

import trio_uring

#: Contenders of scenario e: one server per library, as its users write it.
STATIC_CONTENDERS = ("trio", "zc:auto", "asyncio", "uvloop")
#: trio's read size: a whole 1 MiB file in one read, larger ones in pieces.
TRIO_READ_SIZE = 1 << 20
_MAX_REQUEST = 16384
_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6}


def file_name(size: int) -> str:
    return f"{size}.bin"


def make_files(root: Path, sizes: tuple[int, ...]) -> None:
    """Random files of ``sizes`` bytes, read once so that they are cached."""
    root.mkdir(parents=True, exist_ok=True)
    for size in sizes:
        path = root / file_name(size)
        if not path.exists() or path.stat().st_size != size:
            path.write_bytes(os.urandom(size))
        path.read_bytes()


def find_wrk() -> str | None:
    return shutil.which("wrk")


# -- one request at a time, shared by every server ---------------------------------


def response_head(size: int) -> bytes:
    return (
        f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()


NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


def parse_target(buffer: bytearray) -> str | None:
    """Take one request off ``buffer``; return its target path, or None if
    the request is not complete yet.  Requests carry no body (GET)."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > _MAX_REQUEST:
            raise ValueError("request head too large")
        return None
    line = bytes(buffer[: buffer.find(b"\r\n")])
    del buffer[: end + 4]
    parts = line.split(b" ")
    if len(parts) != 3 or parts[0] != b"GET":
        raise ValueError(f"unsupported request {line[:80]!r}")
    return parts[1].decode("ascii", "replace")


def resolve(root: Path, target: str) -> Path | None:
    name = target.lstrip("/")
    if "/" in name or not name:
        return None
    path = root / name
    return path if path.is_file() else None


# -- trio and trio_uring -------------------------------------------------------------


async def _trio_connection(
    stream: Any, root: Path, send_body: Callable[[Any, Path], Awaitable[None]]
) -> None:
    buffer = bytearray()
    try:
        while True:
            target = parse_target(buffer)
            if target is None:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffer += data
                continue
            path = resolve(root, target)
            if path is None:
                await stream.send_all(NOT_FOUND)
                continue
            await send_body(stream, path)
    except (trio.BrokenResourceError, trio.ClosedResourceError, ValueError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def _trio_body(stream: trio.SocketStream, path: Path) -> None:
    async with await trio.open_file(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        await stream.send_all(response_head(size))
        while data := await f.read(TRIO_READ_SIZE):
            await stream.send_all(data)


async def _zc_body(stream: trio_uring.ZeroCopyStream, path: Path) -> None:
    # The size for the header: a stat of a cached inode, as any server makes.
    size = path.stat().st_size
    await stream.send_all(response_head(size))
    await stream.send_file(path, 0, size)


async def trio_static_server(
    name: str, host: str, root: Path, ready: Callable[[int], None]
) -> None:
    """The server with ``trio.serve_tcp`` or ``trio_uring.serve_tcp``."""
    if name == "trio":
        serve, body = trio.serve_tcp, _trio_body
    else:
        serve, body = trio_uring.serve_tcp, _zc_body  # type: ignore[assignment]
    handler = functools.partial(_trio_connection, root=root, send_body=body)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(serve, handler, 0, host=host))
        ready(listeners[0].socket.getsockname()[1])


# -- asyncio and uvloop --------------------------------------------------------------


async def _asyncio_connection(sock: socket.socket, root: Path) -> None:
    loop = asyncio.get_running_loop()
    buffer = bytearray()
    try:
        while True:
            target = parse_target(buffer)
            if target is None:
                data = await loop.sock_recv(sock, 65536)
                if not data:
                    return
                buffer += data
                continue
            path = resolve(root, target)
            if path is None:
                await loop.sock_sendall(sock, NOT_FOUND)
                continue
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                await loop.sock_sendall(sock, response_head(size))
                try:
                    await loop.sock_sendfile(sock, f, 0, size)
                except NotImplementedError:
                    # uvloop has no sock_sendfile: its users read and send.
                    await loop.sock_sendall(sock, f.read())
    except (ConnectionError, ValueError):
        pass
    finally:
        sock.close()


async def asyncio_static_server(host: str, root: Path, ready: Callable[[int], None]) -> None:
    """The server with ``loop.sock_accept`` / ``sock_recv`` / ``sock_sendfile``."""
    loop = asyncio.get_running_loop()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, 0))
    listener.listen(1024)
    listener.setblocking(False)
    ready(listener.getsockname()[1])
    tasks = set()
    while True:
        sock, _ = await loop.sock_accept(listener)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = loop.create_task(_asyncio_connection(sock, root))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


# -- the load generator -------------------------------------------------------------


def _latency_us(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"unreadable latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> dict[str, float | int]:
    """Requests, requests/s, p50/p99 latency and errors from ``wrk --latency``."""
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", output)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.MULTILINE)
    if not (total and rate and p50 and p99):
        raise ValueError(f"unreadable wrk output: {output[-500:]!r}")
    errors = 0
    sock_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if sock_errors:
        errors += sum(int(g) for g in sock_errors.groups())
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non_2xx:
        errors += int(non_2xx.group(1))
    return {
        "requests": int(total.group(1)),
        "elapsed": _latency_us(total.group(2) + total.group(3)) / 1e6,
        "requests_per_s": float(rate.group(1)),
        "p50_us": _latency_us(p50.group(1)),
        "p99_us": _latency_us(p99.group(1)),
        "errors": errors,
    }


def run_wrk(
    wrk: str, url: str, connections: int, duration: float, threads: int = 1
) -> dict[str, float | int]:
    """One wrk run against ``url``.  One thread: on a small machine the
    server, not the client, must be the one that runs out of CPU."""
    seconds = max(1, round(duration))
    proc = subprocess.run(
        [wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", url],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
    return parse_wrk(proc.stdout)
