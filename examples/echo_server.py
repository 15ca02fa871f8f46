"""An echo server: every connection is a ZeroCopyStream in the server's nursery.

    python examples/echo_server.py [PORT]

then talk to it with ``nc localhost PORT`` or ``socat - TCP:localhost:PORT``.
"""

import sys

import trio

import trio_uring


async def echo(stream: trio_uring.ZeroCopyStream) -> None:
    try:
        async with stream:  # on exit: what is still queued is sent, then the close
            async for data in stream:
                await stream.send_all(data)
    except trio.BrokenResourceError:
        pass  # the client went away mid-send, or before a queued reply went out


async def main(port: int) -> None:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio_uring.serve_tcp, echo, port)
        bound = listeners[0].socket.getsockname()[1]
        print(
            f"echo server on port {bound}, send strategy {trio_uring.features().strategy}",
            flush=True,
        )


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 8080)
