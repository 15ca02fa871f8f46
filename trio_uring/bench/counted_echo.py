"""An echo server that serves an exact number of connections, for callgrind.

``python -m trio_uring.bench.counted_echo JOB`` where ``JOB`` is a JSON
object: ``contender`` (``trio``, ``zc:auto`` or ``zc:<strategy>``), ``host``,
``clients``, ``arena_size`` and ``slice_size``.  It listens on an ephemeral
port, prints ``PORT <n>``, echoes on every connection until the peer closes
it (the handler of the bench's echo scenario), and exits once ``clients``
connections have ended, printing one JSON line with the bytes it echoed.

``callgrind.py`` runs it twice with clients that make different numbers of
requests and divides the difference of the instruction totals by the
difference of the request counts, so start-up, imports, listening and
accepting cancel out and what is left is the server's work per request.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Any

import trio

import trio_uring


async def _serve(job: dict[str, Any]) -> int:
    """Serve ``job["clients"]`` connections; the bytes echoed in all."""
    name: str = job["contender"]
    clients = int(job["clients"])
    echoed = 0
    ended = 0

    async def handler(stream: Any) -> None:
        nonlocal echoed, ended
        try:
            async for data in stream:
                await stream.send_all(data)
                echoed += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)
            ended += 1
            if ended == clients:
                nursery.cancel_scope.cancel()

    serve = trio.serve_tcp if name == "trio" else trio_uring.serve_tcp
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(serve, handler, 0, host=job["host"]))
        print(f"PORT {listeners[0].socket.getsockname()[1]}", flush=True)
    return echoed


async def run(job: dict[str, Any]) -> int:
    """Run ``job`` (see the module docstring); the bytes echoed."""
    name: str = job["contender"]
    if name == "trio":
        return await _serve(job)
    strategy = name.split(":", 1)[1]
    async with trio_uring.open_manager(
        strategy=None if strategy == "auto" else strategy,
        arena_size=job["arena_size"],
        slice_size=job["slice_size"],
    ):
        return await _serve(job)


def main(argv: list[str]) -> int:
    echoed = trio.run(run, json.loads(argv[1]))
    print(json.dumps({"echoed": echoed}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
