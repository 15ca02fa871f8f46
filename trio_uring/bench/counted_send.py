"""A sender that makes an exact number of ``send_all`` calls, for callgrind.

``python -m trio_uring.bench.counted_send JOB`` where ``JOB`` is a JSON
object: ``contender`` (``trio``, ``zc:auto`` or ``zc:<strategy>``), ``host``,
``port``, ``counts`` (a list of ``[size, count]`` pairs), ``arena_size``
and ``slice_size``.  For each pair it opens one stream to the
sink, calls ``send_all`` with a ``size``-byte payload ``count`` times,
half-closes, checks the sink's byte count and closes; then it prints one
JSON line with what the sink counted.

Unlike the bench's sender it runs for a number of calls rather than a
duration: ``callgrind.py`` runs it twice with different counts and divides
the difference of the instruction totals by the difference of the counts,
so everything but the calls themselves (interpreter start-up, imports,
connecting, the manager's set-up, a stream's first sends) cancels out.
Kept apart from the rest of the suite so that its start-up is small.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import trio

import trio_uring

from .contenders import read_ack


async def _send_counted(stream: Any, size: int, count: int) -> int:
    """``count`` calls of ``send_all``, then the sink's count of bytes."""
    payload = b"x" * size
    send_all = stream.send_all
    for _ in range(count):
        await send_all(payload)
    await stream.send_eof()
    count = await read_ack(stream)
    await stream.aclose()
    return count


async def run(job: dict[str, Any]) -> list[dict[str, int]]:
    """Run ``job`` (see the module docstring); one result per (size, count)."""
    name: str = job["contender"]
    host, port = job["host"], job["port"]
    pairs = [(int(size), int(count)) for size, count in job["counts"]]
    results = []
    if name == "trio":
        for size, count in pairs:
            received = await _send_counted(await trio.open_tcp_stream(host, port), size, count)
            results.append({"size": size, "count": count, "received": received})
        return results
    strategy = name.split(":", 1)[1]
    async with trio_uring.open_manager(
        strategy=None if strategy == "auto" else strategy,
        arena_size=job["arena_size"],
        slice_size=job["slice_size"],
    ):
        for size, count in pairs:
            stream = await trio_uring.open_tcp_stream(host, port)
            received = await _send_counted(stream, size, count)
            results.append({"size": size, "count": count, "received": received})
    return results


def main(argv: list[str]) -> int:
    results = trio.run(run, json.loads(argv[1]))
    print(json.dumps(results), flush=True)
    lost = [r for r in results if r["received"] != r["size"] * r["count"]]
    if lost:
        print(f"the sink did not count every byte: {lost}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
