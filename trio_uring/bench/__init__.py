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

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the bench (``cli.main``).

    Imported on call rather than with the package: the worker and the
    counted sender run as ``-m trio_uring.bench.<module>`` child processes,
    and importing the whole suite in each of them would add start-up cost
    (a third of the sender's start-up instructions under callgrind).
    """
    from .cli import main as cli_main

    return cli_main(argv)
