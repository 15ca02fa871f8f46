"""Build and run the C reference sender (``csender.c``).

The C sender is the yardstick: what this machine does with no interpreter
and no event loop.  It is compiled at run time, with whatever ``gcc`` is on
the PATH, into a cache directory keyed by a hash of the source, so a
changed source is rebuilt and an unchanged one is compiled once.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from . import cbuild
from .cbuild import CompileError, default_cache_dir
from .contenders import SendResult

__all__ = ["MODES", "CompileError", "build", "default_cache_dir", "run"]

SOURCE_NAME = "csender.c"
#: Contender name -> the C program's mode argument.
MODES = {"c:send": "send", "c:zc": "zc"}


def build(cache_dir: Path | None = None, compiler: str = "gcc") -> Path:
    """Return the path of a compiled sender, compiling it if needed."""
    return cbuild.build(SOURCE_NAME, "the C reference sender", cache_dir, compiler)


def run(
    binary: Path, contender: str, host: str, port: int, size: int, duration: float
) -> SendResult:
    """Run one measurement of the C sender against the sink at ``host:port``."""
    proc = subprocess.run(
        [str(binary), MODES[contender], host, str(port), str(size), repr(duration)],
        capture_output=True,
        text=True,
        timeout=duration + 60,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{contender} failed: {proc.stderr.strip()}")
    raw = json.loads(proc.stdout)
    return SendResult(
        messages=raw["messages"],
        bytes_sent=raw["bytes_sent"],
        bytes_received=raw["bytes_received"],
        elapsed=raw["elapsed"],
        cpu=raw["cpu"],
        enter_calls=raw["enter_calls"],
        notifications=raw["notifications"],
        notifications_copied=raw["notifications_copied"],
    )
