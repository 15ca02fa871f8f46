"""Echo load generator: the same client process for every echo server.

``clients`` connections each send a request of ``size`` bytes, wait for the
whole echo, record the round-trip time and send the next request.  One
thread drives them all through ``select.epoll`` with non-blocking sockets,
so the generator's cost per request is a few syscalls and no event-loop
library: whichever server is measured, the client side is identical.
Latencies from the first ``warmup`` fraction of the run are dropped
(connection setup, slow start).  Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import sys
import time
from array import array


def percentile(sorted_values: list[float] | array, q: float) -> float:
    """The ``q``-quantile (0..1) by nearest rank; 0.0 for no values."""
    if not sorted_values:
        return 0.0
    rank = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return float(sorted_values[rank])


def run(
    host: str, port: int, clients: int, size: int, duration: float, warmup: float = 0.1
) -> dict[str, float | int]:
    """Drive the echo server at ``host:port``; return requests/s and latency."""
    request = b"r" * size
    socks: list[socket.socket] = []
    for _ in range(clients):
        s = socket.create_connection((host, port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        socks.append(s)
    by_fd = {s.fileno(): s for s in socks}
    got = dict.fromkeys(by_fd, 0)
    sent_at = dict.fromkeys(by_fd, 0.0)
    buf = bytearray(max(size, 65536))
    latencies = array("d")
    ep = select.epoll()
    clock = time.perf_counter
    start = clock()
    measure_from = start + warmup * duration
    deadline = start + duration
    for fd, s in by_fd.items():
        ep.register(fd, select.EPOLLIN)
        sent_at[fd] = clock()
        s.send(request)
    requests = errors = 0
    measured_start = 0.0
    now = start
    while now < deadline:
        for fd, _ in ep.poll(0.5):
            s = by_fd[fd]
            try:
                n = s.recv_into(buf)
            except BlockingIOError:
                continue
            except OSError:
                errors += 1
                ep.unregister(fd)
                continue
            if n == 0:
                errors += 1
                ep.unregister(fd)
                continue
            got[fd] += n
            if got[fd] < size:
                continue
            got[fd] = 0
            now = clock()
            if now >= measure_from:
                if not measured_start:
                    measured_start = now
                latencies.append(now - sent_at[fd])
                requests += 1
            sent_at[fd] = now
            s.send(request)
        now = clock()
    elapsed = now - (measured_start or start)
    ep.close()
    for s in socks:
        s.close()
    ordered = sorted(latencies)
    return {
        "requests": requests,
        "elapsed": elapsed,
        "requests_per_s": requests / elapsed if elapsed > 0 else 0.0,
        "p50_us": percentile(ordered, 0.50) * 1e6,
        "p99_us": percentile(ordered, 0.99) * 1e6,
        "max_us": (ordered[-1] if ordered else 0.0) * 1e6,
        "errors": errors,
        "clients": clients,
        "size": size,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--duration", type=float, default=3.0)
    args = parser.parse_args(argv)
    result = run(args.host, args.port, args.clients, args.size, args.duration)
    json.dump(result, sys.stdout)
    print(flush=True)


if __name__ == "__main__":
    main()
