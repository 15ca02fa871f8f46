"""Build and run the C reference sender (``csender.c``).

The C sender is the yardstick: what this machine does with no interpreter
and no event loop.  It is compiled at run time, with whatever ``gcc`` is on
the PATH, into a cache directory keyed by a hash of the source, so a
changed source is rebuilt and an unchanged one is compiled once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from importlib import resources
from pathlib import Path

from .contenders import SendResult

SOURCE_NAME = "csender.c"
#: Contender name -> the C program's mode argument.
MODES = {"c:send": "send", "c:zc": "zc"}


class CompileError(RuntimeError):
    """gcc is missing or failed; the message says which and why."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "trio_uring" / "bench"


def source_text() -> str:
    return resources.files(__package__).joinpath(SOURCE_NAME).read_text()


def build(cache_dir: Path | None = None, compiler: str = "gcc") -> Path:
    """Return the path of a compiled sender, compiling it if needed."""
    gcc = shutil.which(compiler)
    if gcc is None:
        raise CompileError(f"{compiler} not found on PATH; the C reference sender is skipped")
    source = source_text()
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    cache_dir = cache_dir or default_cache_dir()
    binary = cache_dir / f"csender-{digest}"
    if binary.exists():
        return binary
    cache_dir.mkdir(parents=True, exist_ok=True)
    src_path = cache_dir / f"csender-{digest}.c"
    src_path.write_text(source)
    tmp = binary.with_suffix(f".tmp{os.getpid()}")
    proc = subprocess.run(
        [gcc, "-O2", "-Wall", "-o", str(tmp), str(src_path)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise CompileError(f"compiling the C reference sender failed:\n{proc.stderr.strip()}")
    tmp.replace(binary)
    return binary


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
