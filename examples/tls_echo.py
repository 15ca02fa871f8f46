"""A TLS echo server: trio.SSLStream layered over a ZeroCopyStream.

    python examples/tls_echo.py [PORT] [--cafile ca.pem] [--host HOST]

At start it makes a throwaway certificate authority and a certificate for
localhost, 127.0.0.1 and ::1 (with ``trustme``); ``--cafile`` writes the CA
certificate so that clients can verify the server:

    openssl s_client -connect 127.0.0.1:PORT -CAfile ca.pem -quiet

PORT 0 picks a free port; the first line printed names it.

``trio.SSLStream`` accepts any ``trio.abc.Stream`` as its transport, and a
``ZeroCopyStream`` is one: each encrypted TLS record goes out through
registered slices like any other ``send_all``.
"""

from __future__ import annotations

import argparse
import functools
import ssl
from pathlib import Path

import trio
import trustme

import trio_uring


def make_server_context(cafile: Path | None) -> ssl.SSLContext:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1", "::1")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    if cafile is not None:
        ca.cert_pem.write_to_path(str(cafile))
    return context


async def echo(context: ssl.SSLContext, transport: trio_uring.ZeroCopyStream) -> None:
    stream = trio.SSLStream(transport, context, server_side=True)
    try:
        async with stream:  # on exit: close_notify, then the ZeroCopyStream closes
            async for data in stream:  # the handshake happens on first use
                await stream.send_all(data)
    except trio.BrokenResourceError:
        pass  # a failed handshake, or a client that left without close_notify


async def main(port: int, host: str, cafile: Path | None) -> None:
    context = make_server_context(cafile)
    handler = functools.partial(echo, context)
    async with trio.open_nursery() as nursery:
        serve = functools.partial(trio_uring.serve_tcp, handler, port, host=host)
        listeners = await nursery.start(serve)
        bound = listeners[0].socket.getsockname()[1]
        strategy = trio_uring.features().strategy
        print(f"tls_echo on port {bound}, send strategy {strategy}", flush=True)
        if cafile is not None:
            print(f"CA certificate written to {cafile}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", nargs="?", type=int, default=8443, help="0 picks a free port")
    parser.add_argument("--cafile", type=Path, help="write the CA certificate (PEM) here")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    args = parser.parse_args()
    try:
        trio.run(main, args.port, args.host, args.cafile)
    except KeyboardInterrupt:
        pass
