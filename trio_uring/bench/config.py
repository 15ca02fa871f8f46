"""What one benchmark run measures: the parsed command line, resolved.

Kept apart from ``cli.py`` so that the scenario runner and the report can
be driven (and tested) with a ``Config`` built in code.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

KIB = 1024
MIB = 1024 * KIB

SCENARIOS = ("a", "b", "c", "d", "e", "f", "smoke")
DEFAULT_SCENARIOS = ("a", "b", "c", "d", "e", "f")
SCENARIO_TITLES = {
    "a": "one stream, send_all of one payload size",
    "b": "concurrent streams in one process",
    "c": "echo server, concurrent request/response clients",
    "d": "sender CPU and io_uring_enter calls per GiB (one stream)",
    "e": "static files over HTTP/1.1: wrk, 50 connections, files from the page cache",
    "f": "fan-out: one publisher, the same message to every subscriber stream",
    "smoke": "smoke test: every contender, briefly",
}


def size_label(size: int) -> str:
    """``4096`` -> ``"4KiB"``; the parameter label used in tables and JSON."""
    for unit, name in ((MIB, "MiB"), (KIB, "KiB")):
        if size >= unit and size % unit == 0:
            return f"{size // unit}{name}"
    return f"{size}B"


@dataclasses.dataclass
class Config:
    """A resolved run: which cells, how long each, and where results go.

    ``duration_*`` is the length of one sample; ``reps`` samples per cell
    give the median and the spread.  ``--quick`` shrinks durations and
    repetitions so that the whole default run takes about a minute.
    """

    scenarios: tuple[str, ...] = DEFAULT_SCENARIOS
    quick: bool = False
    reps: int = 5
    out: Path = Path("bench-results")
    connect: tuple[str, int] | None = None
    contenders: tuple[str, ...] | None = None
    sizes_one: tuple[int, ...] = (4 * KIB, 64 * KIB, MIB, 16 * MIB)
    sizes_many: tuple[int, ...] = (4 * KIB, 64 * KIB)
    sizes_cpu: tuple[int, ...] = (4 * KIB, MIB)
    streams: int = 100
    clients: int = 100
    echo_size: int = 1024
    duration_one: float = 1.0
    duration_many: float = 2.0
    duration_echo: float = 3.0
    static_sizes: tuple[int, ...] = (16 * KIB, MIB)
    static_connections: int = 50
    duration_static: float = 3.0
    fanout_sizes: tuple[int, ...] = (64 * KIB,)
    fanout_subscribers: int = 100
    duration_fanout: float = 2.0
    smoke_size: int = 64 * KIB
    smoke_clients: int = 8
    #: The library's own defaults: zc:auto is measured as users get it.
    arena_size: int = 4 * MIB
    slice_size: int = 16 * KIB
    chart: bool = True
    cache_dir: Path | None = None

    @classmethod
    def quick_preset(cls, **overrides: object) -> Config:
        values: dict[str, object] = {
            "quick": True,
            "reps": 3,
            "duration_one": 0.1,
            "duration_many": 0.2,
            "duration_echo": 0.4,
            "duration_static": 1.0,
            "duration_fanout": 0.2,
        }
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        for key, value in d.items():
            if isinstance(value, Path):
                d[key] = str(value)
            elif isinstance(value, tuple):
                d[key] = list(value)
        return d
