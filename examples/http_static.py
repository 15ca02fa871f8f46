"""A small HTTP/1.1 static-file server: h11 speaks HTTP, ZeroCopyStream sends the bytes.

    python examples/http_static.py [PORT] [--root DIR] [--host HOST]

then fetch a file with ``curl -O http://127.0.0.1:PORT/path/to/file``.  PORT 0
picks a free port; the first line printed names it.  GET and HEAD, keep-alive,
single byte ranges (``Range: bytes=a-b``, ``a-``, ``-n``: 206 with
``Content-Range``, 416 when none of it exists), 404 for anything outside
``--root`` (default: the current directory).

Headers go out with ``send_all``; file bodies with ``send_file``, so their
bytes never enter Python: the kernel splices large ones from the page cache
to the socket and reads small ones into registered memory, without the
event loop ever waiting for the disk.  h11 still frames the response: it is
handed a ``FileBody`` whose length it counts (``send_with_data_passthrough``)
and which the server then sends with ``send_file``.
"""

from __future__ import annotations

import argparse
import email.utils
import functools
import mimetypes
import os
import re
import urllib.parse
from pathlib import Path

import h11
import trio

import trio_uring

RECEIVE_SIZE = 65536
IDLE_TIMEOUT = 30
SERVER = b"trio_uring-http_static"


_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class FileBody:
    """``count`` bytes of an open file from ``offset``: a response body that
    h11 frames by its length and ``send_file`` sends."""

    def __init__(self, file: object, offset: int, count: int) -> None:
        self.file = file
        self.offset = offset
        self.count = count

    def __len__(self) -> int:
        return self.count


async def send(stream: trio_uring.ZeroCopyStream, conn: h11.Connection, event: object) -> None:
    pending = bytearray()
    for piece in conn.send_with_data_passthrough(event):  # type: ignore[arg-type]
        if not isinstance(piece, FileBody):
            pending += piece
            continue
        if pending:
            await stream.send_all(pending)
            pending.clear()
        if piece.count:
            await stream.send_file(piece.file, piece.offset, piece.count)
    if pending:
        await stream.send_all(pending)


def byte_range(value: bytes | None, size: int) -> tuple[int, int] | bool | None:
    """The (first, last) byte a ``Range`` header asks for; None to send the
    whole file (no header, or one this server ignores, as RFC 9110 allows);
    False if none of the range exists (416)."""
    if value is None:
        return None
    match = _RANGE.fullmatch(value.decode("ascii", "replace").strip())
    if match is None or match.group(1) == match.group(2) == "":
        return None  # several ranges, or another unit: the whole file
    first, last = match.groups()
    if first == "":  # bytes=-n: the last n bytes
        n = int(last)
        return (max(0, size - n), size - 1) if n and size else False
    start = int(first)
    if last and int(last) < start:
        return None  # not a valid range: ignored
    if start >= size:
        return False
    return start, size - 1 if not last else min(int(last), size - 1)


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


def headers(
    length: int, content_type: str, *extra: tuple[bytes, bytes]
) -> list[tuple[bytes, bytes]]:
    return [
        (b"server", SERVER),
        (b"date", email.utils.formatdate(usegmt=True).encode()),
        (b"content-type", content_type.encode()),
        (b"content-length", str(length).encode()),
        (b"accept-ranges", b"bytes"),
        *extra,
    ]


async def send_error(
    stream: trio_uring.ZeroCopyStream,
    conn: h11.Connection,
    status: int,
    reason: str,
    *extra: tuple[bytes, bytes],
    head: bool = False,
) -> None:
    """A short text response; for HEAD only its headers (h11 refuses a body)."""
    body = f"{status} {reason}\n".encode()
    response_headers = headers(len(body), "text/plain; charset=utf-8", *extra)
    await send(
        stream,
        conn,
        h11.Response(status_code=status, reason=reason.encode(), headers=response_headers),
    )
    if not head:
        await send(stream, conn, h11.Data(data=body))
    await send(stream, conn, h11.EndOfMessage())


async def send_file(
    stream: trio_uring.ZeroCopyStream,
    conn: h11.Connection,
    request: h11.Request,
    path: Path,
) -> None:
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    head = request.method == b"HEAD"
    async with await trio.open_file(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        requested = dict(request.headers).get(b"range")
        span = byte_range(requested, size)
        if span is False:
            content_range = (b"content-range", f"bytes */{size}".encode())
            await send_error(stream, conn, 416, "Range Not Satisfiable", content_range, head=head)
            return
        if span is None:
            status, reason, offset, count, extra_headers = 200, b"OK", 0, size, ()
        else:
            first, last = span
            offset, count = first, last - first + 1
            status, reason = 206, b"Partial Content"
            extra_headers = ((b"content-range", f"bytes {first}-{last}/{size}".encode()),)
        response_headers = headers(count, content_type, *extra_headers)
        await send(
            stream, conn, h11.Response(status_code=status, reason=reason, headers=response_headers)
        )
        if not head:
            await send(stream, conn, h11.Data(data=FileBody(f, offset, count)))  # type: ignore[arg-type]
    await send(stream, conn, h11.EndOfMessage())


async def respond(
    stream: trio_uring.ZeroCopyStream, conn: h11.Connection, request: h11.Request, root: Path
) -> None:
    if request.method not in (b"GET", b"HEAD"):
        await send_error(stream, conn, 405, "Method Not Allowed")
        return
    path = resolve(root, request.target)
    if path is None:
        await send_error(stream, conn, 404, "Not Found", head=request.method == b"HEAD")
        return
    await send_file(stream, conn, request, path)


async def serve_connection(stream: trio_uring.ZeroCopyStream, root: Path) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        async with stream:  # on exit: what is still queued is sent, then the close
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
        pass  # the client went away, perhaps before a queued response went out


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
