"""Issue 5, item 8: the C shim under AddressSanitizer.

Builds the shim and the queue core with ``TRIO_URING_ASAN=1`` into a copy of the package in a
temporary directory, then runs the reliability tests (cancellation, peer
failures, exhaustion, bad input, integrity; long ones at reduced size)
against that build in a subprocess with ``libasan`` preloaded.  Any
AddressSanitizer report fails the test.  ``TRIO_URING_ASAN_TESTS`` (a
space-separated list of test files) replaces the default selection.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _reliability_helpers import REPO

DEFAULT_TESTS = [
    "tests/test_reliability_cancellation.py",
    "tests/test_reliability_peer.py",
    "tests/test_reliability_exhaustion.py",
    "tests/test_reliability_badinput.py",
    "tests/test_reliability_integrity.py",
    "tests/test_tick.py",
]


def _libasan() -> str | None:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        return None
    out = subprocess.run(
        [gcc, "-print-file-name=libasan.so"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return out if out and os.path.isabs(out) and os.path.exists(out) else None


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TRIO_URING_UNDER_ASAN") == "1", reason="already under ASan")
def test_suite_under_asan(tmp_path: Path) -> None:
    libasan = _libasan()
    if libasan is None:
        pytest.skip("no C compiler with libasan (gcc -print-file-name=libasan.so)")
    repo = Path(REPO)
    shutil.copytree(
        repo / "trio_uring",
        tmp_path / "trio_uring",
        ignore=shutil.ignore_patterns("*.so", "*.o", "__pycache__", "_shim_cffi.c"),
    )
    tests = os.environ.get("TRIO_URING_ASAN_TESTS", "").split() or DEFAULT_TESTS
    (tmp_path / "tests").mkdir()
    for name in ["tests/_reliability_helpers.py", "tests/_streams.py", "tests/conftest.py", *tests]:
        if (repo / name).exists():
            shutil.copy(repo / name, tmp_path / name)
    shutil.copy(repo / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copy(repo / "setup.py", tmp_path / "setup.py")

    env = dict(os.environ)
    env.pop("TRIO_URING_DISABLE", None)
    env["TRIO_URING_ASAN"] = "1"
    build = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    # Every extension really is instrumented: they call into the ASan runtime.
    for name in ("_shim_cffi", "_queuecore", "_tickcore"):
        (built,) = (tmp_path / "trio_uring").glob(f"{name}*.so")
        assert b"__asan_" in built.read_bytes(), f"{name} was built without AddressSanitizer"

    env.pop("TRIO_URING_ASAN")
    env.update(
        LD_PRELOAD=libasan,
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:halt_on_error=1:exitcode=99",
        TRIO_URING_UNDER_ASAN="1",
        # Python objects from malloc, not pymalloc's arenas: ASan then sees
        # an object of the C code's freed too early.
        PYTHONMALLOC="malloc",
        TRIO_URING_CANCEL_ITERS=os.environ.get("TRIO_URING_ASAN_CANCEL_ITERS", "40"),
        TRIO_URING_CONNECTIONS="500",
        TRIO_URING_CQ_OVERFLOW_OPS="500",
        PYTHONDONTWRITEBYTECODE="1",
    )
    # The copy, not the installed package, must be the one imported.
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import trio_uring._shim_cffi as s, trio_uring._queuecore as q, "
            "trio_uring._tickcore as t; print(s.__file__); print(q.__file__); print(t.__file__)",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.returncode == 0, check.stderr
    for path in check.stdout.split():
        assert path.startswith(str(tmp_path)), check.stdout

    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *tests],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    output = run.stdout + run.stderr
    assert "AddressSanitizer" not in output, output[-6000:]
    assert run.returncode == 0, output[-6000:]
    print(output.strip().splitlines()[-1])
