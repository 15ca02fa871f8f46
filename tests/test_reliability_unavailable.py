"""Issue 5, item 4: io_uring unavailable.

Three ways io_uring goes missing: ``TRIO_URING_DISABLE=1``, ``io_uring_setup``
failing with ``EPERM`` or ``ENOSYS`` (injected in the shim through
``tu_fault_setup_errno``), and for real with ``sysctl
kernel.io_uring_disabled=2``.  Each must take the ``socket`` strategy with the
same public API: the reliability suite's own bad-input and integrity tests
are rerun in a subprocess under each, and an echo through ``serve_tcp`` /
``open_tcp_stream`` is checked in a fresh interpreter.

Each fallback also emits exactly one warning naming the reason.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
from _reliability_helpers import REPO, fresh_features, run_python
from trio_uring._shim_cffi import lib

import trio_uring
from trio_uring import _features

# Runs the public API end to end and prints a JSON report on its last line.
_ECHO_PROGRAM = """
import errno, functools, hashlib, json, os, sys, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    from trio_uring._shim_cffi import lib
    lib.tu_fault_setup_errno = int(os.environ.get("FAULT_ERRNO", "0"))
    import trio, trio_uring

    async def handler(stream):
        async with stream:
            async for data in stream:
                await stream.send_all(data)

    async def main():
        async with trio.open_nursery() as nursery:
            serve = functools.partial(trio_uring.serve_tcp, host="127.0.0.1")
            (listener,) = await nursery.start(serve, handler, 0)
            port = listener.socket.getsockname()[1]
            data = os.urandom(3 << 20)
            client = await trio_uring.open_tcp_stream("127.0.0.1", port)
            got = bytearray()
            async with client:
                async with trio.open_nursery() as n2:
                    async def reader():
                        async for chunk in client:
                            got.extend(chunk)
                    n2.start_soon(reader)
                    for i in range(0, len(data), 100_000):
                        await client.send_all(data[i : i + 100_000])
                    await client.send_eof()
            nursery.cancel_scope.cancel()
        m = trio_uring.current_manager()
        return {
            "intact": hashlib.sha256(got).digest() == hashlib.sha256(data).digest(),
            "manager_strategy": m.strategy,
            "ring": m.ring is not None,
            "stream_strategy": client.stats().strategy,
        }

    report = trio.run(main)
    trio.run(main)  # a second run must not warn again
    f = trio_uring.features()
report.update(
    io_uring=f.io_uring,
    strategy=f.strategy,
    reason=f.unavailable_reason,
    warnings=[
        f"{w.category.__name__}: {w.message}"
        for w in caught
        if issubclass(w.category, (RuntimeWarning, UserWarning))
    ],
)
print(json.dumps(report))
"""

MODES = {
    "env": ({"TRIO_URING_DISABLE": "1"}, "TRIO_URING_DISABLE"),
    "eperm": ({"FAULT_ERRNO": str(errno.EPERM)}, "EPERM"),
    "enosys": ({"FAULT_ERRNO": str(errno.ENOSYS)}, "ENOSYS"),
}


def _report(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", sorted(MODES))
def test_fallback_same_api(mode: str) -> None:
    env, reason_word = MODES[mode]
    report = _report(run_python(_ECHO_PROGRAM, env=env, timeout=60))
    assert report["io_uring"] is False
    assert reason_word in report["reason"]
    assert report["strategy"] == "socket"
    assert report["manager_strategy"] == "socket"
    assert report["stream_strategy"] == "socket"
    assert report["ring"] is False
    assert report["intact"] is True


@pytest.mark.parametrize("mode", sorted(MODES))
def test_fallback_warns_exactly_once(mode: str) -> None:
    env, reason_word = MODES[mode]
    report = _report(run_python(_ECHO_PROGRAM, env=env, timeout=60))
    assert len(report["warnings"]) == 1, report["warnings"]
    assert reason_word in report["warnings"][0]


@pytest.mark.parametrize("err", [errno.EPERM, errno.ENOSYS])
def test_injected_setup_failure_in_process(err: int) -> None:
    """The probe reports the injected errno with a reason saying what to do."""
    with fresh_features():
        lib.tu_fault_setup_errno = err
        try:
            f = _features.probe()
            with pytest.raises(trio_uring.RingSetupError) as info:
                trio_uring._ring.Ring(8)
        finally:
            lib.tu_fault_setup_errno = 0
    assert info.value.errno == err
    assert f.io_uring is False and f.strategy == "socket"
    assert errno.errorcode[err] in (f.unavailable_reason or "")
    assert trio_uring.features().io_uring == _features.probe().io_uring


_SUITE = ["tests/test_reliability_badinput.py", "tests/test_reliability_integrity.py"]


@pytest.mark.parametrize("mode", ["env", "eperm"])
def test_reliability_suite_passes_without_io_uring(mode: str) -> None:
    """The same tests, rerun in a fresh interpreter where io_uring is gone."""
    code = (
        "import sys, pytest\n"
        "from trio_uring._shim_cffi import lib\n"
        f"lib.tu_fault_setup_errno = {errno.EPERM if mode == 'eperm' else 0}\n"
        "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-m', 'not slow', "
        + ", ".join(repr(p) for p in _SUITE)
        + "]))\n"
    )
    env = {"TRIO_URING_DISABLE": "1"} if mode == "env" else {}
    proc = run_python(code, env=env, timeout=180)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout


_SYSCTL = "/proc/sys/kernel/io_uring_disabled"

# Disables io_uring system-wide for as short a time as possible: the value
# is restored in ``finally`` before the interpreter exits, and again by the
# test itself in case this process is killed.
_SYSCTL_PROGRAM = """
import sys
path = sys.argv[1]
old = open(path).read().strip()
try:
    with open(path, "w") as fh:
        fh.write("2")
    import trio_uring
    f = trio_uring.features()  # probed now, cached for the rest of the process
finally:
    with open(path, "w") as fh:
        fh.write(old)
print(f.io_uring, f.strategy, "|", f.unavailable_reason, flush=True)
"""


@pytest.mark.skipif(not os.path.exists(_SYSCTL), reason="this kernel has no io_uring_disabled")
def test_sysctl_io_uring_disabled_for_real() -> None:
    if os.geteuid() != 0:
        pytest.skip("setting kernel.io_uring_disabled needs root")
    with open(_SYSCTL) as fh:
        old = fh.read().strip()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _SYSCTL_PROGRAM + _ECHO_PROGRAM, _SYSCTL],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except PermissionError:
        pytest.skip("kernel.io_uring_disabled is read-only here")
    finally:
        with open(_SYSCTL) as fh:
            if fh.read().strip() != old:
                with open(_SYSCTL, "w") as out:
                    out.write(old)
    if "Permission denied" in proc.stderr or "Read-only" in proc.stderr:
        pytest.skip(f"cannot write {_SYSCTL}: {proc.stderr.strip()[-200:]}")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    head, reason = lines[0].split(" | ", 1)
    assert head == "False socket"
    assert "io_uring_disabled=2" in reason
    report = json.loads(lines[-1])
    assert report["manager_strategy"] == report["stream_strategy"] == "socket"
    assert report["intact"] is True
    with open(_SYSCTL) as fh:
        assert fh.read().strip() == old
