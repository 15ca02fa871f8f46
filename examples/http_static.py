"""A small HTTP/1.1 static-file server: h11 speaks HTTP, ZeroCopyStream sends the bytes.

    python examples/http_static.py [PORT] [--root DIR] [--host HOST]

then fetch a file with ``curl -O http://127.0.0.1:PORT/path/to/file``.  PORT 0
picks a free port; the first line printed names it.  GET and HEAD, keep-alive,
404 for anything outside ``--root`` (default: the current directory).

Each file is read a MiB at a time into one reused buffer and handed to
``send_all``, which copies it into registered slices and returns once the
kernel has accepted the bytes, so the buffer can be refilled at once while
the kernel may still be sending from the slices.
"""

from __future__ import annotations

import argparse
import email.utils
import functools
import mimetypes
import os
import urllib.parse
from pathlib import Path

import h11
import trio

import trio_uring

CHUNK = 1 << 20
RECEIVE_SIZE = 65536
IDLE_TIMEOUT = 30
SERVER = b"trio_uring-http_static"


async def send(stream: trio_uring.ZeroCopyStream, conn: h11.Connection, event: object) -> None:
    data = conn.send(event)
    if data:
        await stream.send_all(data)


async def next_event(stream: trio_uring.ZeroCopyStream, conn: h11.Connection) -> object | None:
    """The next h11 event; None if the client stays silent for IDLE_TIMEOUT."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        with trio.move_on_after(IDLE_TIMEOUT) as scope:
            data = await stream.receive_some(RECEIVE_SIZE)
        if scope.cancelled_caught:
            return None
        conn.receive_data(data)  # b"" tells h11 the client closed


def resolve(root: Path, target: bytes) -> Path | None:
    """The file a request target names, or None if missing or outside root."""
    path = urllib.parse.unquote(urllib.parse.urlsplit(target.decode("ascii", "replace")).path)
    candidate = (root / path.lstrip("/")).resolve()
    if candidate != root and root not in candidate.parents:
        return None
    if candidate.is_dir():
        candidate = candidate / "index.html"
    return candidate if candidate.is_file() else None


def headers(length: int, content_type: str) -> list[tuple[bytes, bytes]]:
    return [
        (b"server", SERVER),
        (b"date", email.utils.formatdate(usegmt=True).encode()),
        (b"content-type", content_type.encode()),
        (b"content-length", str(length).encode()),
    ]


async def send_error(
    stream: trio_uring.ZeroCopyStream, conn: h11.Connection, status: int, reason: str
) -> None:
    body = f"{status} {reason}\n".encode()
    response_headers = headers(len(body), "text/plain; charset=utf-8")
    await send(
        stream,
        conn,
        h11.Response(status_code=status, reason=reason.encode(), headers=response_headers),
    )
    await send(stream, conn, h11.Data(data=body))
    await send(stream, conn, h11.EndOfMessage())


async def send_file(
    stream: trio_uring.ZeroCopyStream, conn: h11.Connection, path: Path, head: bool
) -> None:
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    async with await trio.open_file(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        response_headers = headers(size, content_type)
        await send(
            stream, conn, h11.Response(status_code=200, reason=b"OK", headers=response_headers)
        )
        if not head:
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            while n := await f.readinto(buf):
                # send_all copies into registered memory before it returns:
                # buf is ours again as soon as it does.
                await send(stream, conn, h11.Data(data=view[:n]))
    await send(stream, conn, h11.EndOfMessage())


async def respond(
    stream: trio_uring.ZeroCopyStream, conn: h11.Connection, request: h11.Request, root: Path
) -> None:
    if request.method not in (b"GET", b"HEAD"):
        await send_error(stream, conn, 405, "Method Not Allowed")
        return
    path = resolve(root, request.target)
    if path is None:
        await send_error(stream, conn, 404, "Not Found")
        return
    await send_file(stream, conn, path, head=request.method == b"HEAD")


async def serve_connection(stream: trio_uring.ZeroCopyStream, root: Path) -> None:
    conn = h11.Connection(h11.SERVER)
    async with stream:
        try:
            while True:
                event = await next_event(stream, conn)
                if event is None or isinstance(event, h11.ConnectionClosed):
                    return
                if isinstance(event, h11.Request):
                    await respond(stream, conn, event, root)
                # Other events are the request's body (ignored) and its end.
                if conn.our_state is h11.MUST_CLOSE:
                    return  # "Connection: close", or HTTP/1.0
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()  # keep-alive: wait for the next request
        except h11.RemoteProtocolError:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await send_error(stream, conn, 400, "Bad Request")
        except trio.BrokenResourceError:
            pass  # the client went away


async def main(port: int, host: str, root: Path) -> None:
    async def handler(stream: trio_uring.ZeroCopyStream) -> None:
        await serve_connection(stream, root)

    async with trio.open_nursery() as nursery:
        serve = functools.partial(trio_uring.serve_tcp, handler, port, host=host)
        listeners = await nursery.start(serve)
        bound = listeners[0].socket.getsockname()[1]
        strategy = trio_uring.features().strategy
        print(f"http_static on port {bound}, serving {root}, send strategy {strategy}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", nargs="?", type=int, default=8080, help="0 picks a free port")
    parser.add_argument("--root", type=Path, default=Path("."), help="directory to serve")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    args = parser.parse_args()
    try:
        trio.run(main, args.port, args.host, args.root.resolve())
    except KeyboardInterrupt:
        pass
