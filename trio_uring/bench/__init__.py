"""Benchmarks of trio_uring against trio, asyncio, uvloop and a C sender.

Run ``python -m trio_uring.bench --help``.  The suite lives inside the
package so that it can run between two real hosts (``--sink`` on one,
``--connect`` on the other), where zero-copy sends are not copied as they
are on loopback.

Modules: ``cli`` (options), ``config`` (what a run measures), ``csink`` (the
receiver every sender talks to, in C; ``sink`` is its Python fallback),
``cbuild`` (compiles the C programs), ``contenders`` and ``worker`` (each
library's sender and echo server, run in a child process), ``csender`` (the
C reference), ``loadgen`` (the echo clients), ``scenarios`` (plan and run),
``report`` (medians, ratios, targets, JSON) and ``chart`` (the PNG).
"""

from .cli import main

__all__ = ["main"]
