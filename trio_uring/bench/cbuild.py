"""Compile the bench's C programs (the reference sender, the sink) at run time.

They are compiled with whatever ``gcc`` is on the PATH rather than shipped
as binaries, into a cache directory keyed by a hash of the source and the
flags: a changed source is rebuilt, an unchanged one is compiled once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from importlib import resources
from pathlib import Path


class CompileError(RuntimeError):
    """gcc is missing or failed; the message says which and why."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "trio_uring" / "bench"


def source_text(name: str) -> str:
    """The text of ``name``, a C source shipped inside this package."""
    return resources.files(__package__).joinpath(name).read_text()


def build(
    source_name: str,
    what: str,
    cache_dir: Path | None = None,
    compiler: str = "gcc",
    flags: tuple[str, ...] = (),
) -> Path:
    """Return the path of ``source_name`` compiled with ``-O2`` and ``flags``,
    compiling it if the cache does not hold it yet.  ``what`` names the
    program in error messages."""
    gcc = shutil.which(compiler)
    if gcc is None:
        raise CompileError(f"{compiler} not found on PATH; {what} is skipped")
    source = source_text(source_name)
    digest = hashlib.sha256("\0".join([source, *flags]).encode()).hexdigest()[:16]
    stem = source_name.removesuffix(".c")
    cache_dir = cache_dir or default_cache_dir()
    binary = cache_dir / f"{stem}-{digest}"
    if binary.exists():
        return binary
    cache_dir.mkdir(parents=True, exist_ok=True)
    src_path = cache_dir / f"{stem}-{digest}.c"
    src_path.write_text(source)
    tmp = binary.with_suffix(f".tmp{os.getpid()}")
    proc = subprocess.run(
        [gcc, "-O2", "-Wall", *flags, "-o", str(tmp), str(src_path)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise CompileError(f"compiling {what} failed:\n{proc.stderr.strip()}")
    tmp.replace(binary)
    return binary
