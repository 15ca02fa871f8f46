"""Child process that runs one contender's sender or echo server.

The orchestrator starts one worker per (contender, scenario, repetition) so
that each measurement's CPU time and RSS belong to that contender alone and
every library starts from a fresh interpreter.  The job arrives as a JSON
object in ``argv[1]``; a sender prints one JSON line per payload size, an
echo server prints ``PORT <n>`` once it listens and then serves until
terminated.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import trio

import trio_uring

from . import contenders, static


def _emit(size: int, result: contenders.SendResult) -> None:
    print(json.dumps({"size": size, **dataclasses.asdict(result)}), flush=True)


def _ready(port: int) -> None:
    print(f"PORT {port}", flush=True)


def run_send(job: dict[str, Any]) -> None:
    name: str = job["contender"]
    host, port = job["host"], job["port"]
    sizes: list[int] = job["sizes"]
    duration: float = job["duration"]
    streams: int = job["streams"]
    fanout: bool = job.get("fanout", False)
    if name in ("asyncio", "uvloop"):

        async def asyncio_main() -> None:
            for size in sizes:
                _emit(size, await contenders.asyncio_send(host, port, size, duration, streams))

        contenders.run_asyncio(name, asyncio_main())
        return

    async def trio_main() -> None:
        if name == contenders.BASELINE:
            for size in sizes:
                if fanout:
                    result = await contenders.trio_fanout(
                        trio.open_tcp_stream, host, port, size, duration, streams, None
                    )
                else:
                    result = await contenders.trio_send(
                        trio.open_tcp_stream, host, port, size, duration, streams, lambda: 0
                    )
                _emit(size, result)
            return
        async with trio_uring.open_manager(
            strategy=contenders.strategy_of(name),
            arena_size=job["arena_size"],
            slice_size=job["slice_size"],
            content_size=contenders.FANOUT_CONTENT_SIZE
            if fanout
            else trio_uring.DEFAULT_CONTENT_SIZE,
        ) as manager:

            def enter_calls() -> int:
                return int(manager.stats()["io_uring_enter_calls"])  # type: ignore[call-overload]

            for size in sizes:
                if fanout:
                    result = await contenders.trio_fanout(
                        trio_uring.open_tcp_stream, host, port, size, duration, streams, manager
                    )
                else:
                    result = await contenders.trio_send(
                        trio_uring.open_tcp_stream, host, port, size, duration, streams, enter_calls
                    )
                _emit(size, result)

    trio.run(trio_main)


def run_echo_server(job: dict[str, Any]) -> None:
    name: str = job["contender"]
    host: str = job["host"]
    if name in ("asyncio", "uvloop"):
        contenders.run_asyncio(name, contenders.asyncio_echo_server(host, _ready))
        return

    async def trio_main() -> None:
        if name == contenders.BASELINE:
            await contenders.trio_echo_server(trio.serve_tcp, host, _ready)
            return
        async with trio_uring.open_manager(
            strategy=contenders.strategy_of(name),
            arena_size=job["arena_size"],
            slice_size=job["slice_size"],
        ):
            await contenders.trio_echo_server(trio_uring.serve_tcp, host, _ready)

    trio.run(trio_main)


def run_static_server(job: dict[str, Any]) -> None:
    name: str = job["contender"]
    host: str = job["host"]
    root = Path(job["root"])
    if name in ("asyncio", "uvloop"):
        contenders.run_asyncio(name, static.asyncio_static_server(host, root, _ready))
        return

    async def trio_main() -> None:
        if name == contenders.BASELINE:
            await static.trio_static_server(name, host, root, _ready)
            return
        async with trio_uring.open_manager(
            strategy=contenders.strategy_of(name),
            arena_size=job["arena_size"],
            slice_size=job["slice_size"],
        ):
            await static.trio_static_server(name, host, root, _ready)

    trio.run(trio_main)


def main(argv: list[str]) -> None:
    job = json.loads(argv[1])
    if job["job"] == "send":
        run_send(job)
    elif job["job"] == "echo-server":
        run_echo_server(job)
    elif job["job"] == "static-server":
        run_static_server(job)
    else:
        raise SystemExit(f"unknown job {job['job']!r}")


if __name__ == "__main__":
    main(sys.argv)
