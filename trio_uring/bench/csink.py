"""Build the C sink (``csink.c``) and choose which sink a run uses.

The receiver is part of every measurement: a Python receiver pays the
interpreter on each ``recv_into`` and lets a slow sender look fast next to
it (trio's ``SocketStream`` reached 3.2 GB/s at 1 MiB against the Python
sink, several times what it reaches against a C one).  So the bench
compiles ``csink.c`` at run time, like the C reference sender, and falls
back to the Python sink of ``sink.py`` only where that fails; the report
says which one ran.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from . import cbuild

SOURCE_NAME = "csink.c"
C = "c"
PYTHON = "python"


@dataclasses.dataclass(frozen=True)
class SinkChoice:
    """The receiver of a run: ``kind`` is ``"c"`` or ``"python"``, ``binary``
    the compiled C sink, ``detail`` what the report prints about it."""

    kind: str
    binary: Path | None
    detail: str

    def command(self, host: str, port: int, verbose: bool = False) -> list[str]:
        """The command that runs this sink; it prints ``sink listening on
        HOST:PORT`` once it listens, whichever kind it is."""
        if self.kind == C:
            assert self.binary is not None
            return [str(self.binary), host, str(port), *(["-v"] if verbose else [])]
        code = (
            "import sys; from trio_uring.bench.sink import run_sink; "
            "run_sink(int(sys.argv[2]), sys.argv[1])"
        )
        return [sys.executable, "-c", code, host, str(port)]

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "detail": self.detail}


def build(cache_dir: Path | None = None, compiler: str = "gcc") -> Path:
    """Return the path of a compiled C sink, compiling it if needed."""
    return cbuild.build(SOURCE_NAME, "the C sink", cache_dir, compiler, ("-pthread",))


def choose_sink(cache_dir: Path | None = None, compiler: str = "gcc") -> SinkChoice:
    """The C sink when it compiles here, else the Python sink with the reason."""
    try:
        binary = build(cache_dir, compiler)
    except cbuild.CompileError as exc:
        return SinkChoice(PYTHON, None, f"Python sink (sink.py), because {exc}")
    return SinkChoice(
        C, binary, "C sink (csink.c, gcc -O2): a thread per connection, read() into 1 MiB"
    )
