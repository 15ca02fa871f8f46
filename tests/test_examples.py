"""Run every example as a program against a real client.

echo_server against socat and nc, http_static against curl, tls_echo against
``openssl s_client``, broadcast against its own subscribers, bulk_send on its
own.  Each server prints its port on its first line; every subprocess has a
timeout and is killed when its test ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import selectors
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
STARTUP_TIMEOUT = 20.0
CLIENT_TIMEOUT = 30.0


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed; scripts/test.sh installs it with apt-get")
    return path


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """One line of ``proc``'s stdout, waiting at most ``timeout`` seconds."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError(f"no output from {proc.args} within {timeout} s")
    line = proc.stdout.readline()
    if not line:
        proc.wait(5)
        err = proc.stderr.read() if proc.stderr is not None else ""
        raise AssertionError(f"{proc.args} exited with {proc.returncode}:\n{err}")
    return line


@contextlib.contextmanager
def example(script: str, *args: str, env: dict[str, str] | None = None) -> Iterator[tuple]:
    """Start ``examples/script``; yield (process, port from its first line)."""
    proc = subprocess.Popen(
        [sys.executable, "-u", str(EXAMPLES / script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        first = read_line(proc, STARTUP_TIMEOUT)
        match = re.search(r"\bport (\d+)\b", first)
        assert match, f"{script} printed no port on its first line: {first!r}"
        yield proc, int(match.group(1))
    finally:
        stop(proc)


# -- echo_server ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("client", "env"),
    [
        ("socat", {}),
        ("nc", {}),
        ("socat", {"TRIO_URING_DISABLE": "1"}),
    ],
    ids=["socat", "nc", "socat-no-io_uring"],
)
def test_echo_server(client: str, env: dict[str, str]) -> None:
    payload = os.urandom(300_000) + b"\nend\n"
    with example("echo_server.py", "0", env=env) as (_server, port):
        if client == "socat":
            argv = [need("socat"), "-t", "10", "-", f"TCP:127.0.0.1:{port}"]
        else:
            argv = [need("nc"), "-N", "127.0.0.1", str(port)]  # -N: shut down at stdin EOF
        done = subprocess.run(argv, input=payload, capture_output=True, timeout=CLIENT_TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert hashlib.sha256(done.stdout).hexdigest() == hashlib.sha256(payload).hexdigest()


# -- http_static ---------------------------------------------------------------


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [need("curl"), "-sS", "--max-time", "30", *args],
        capture_output=True,
        timeout=CLIENT_TIMEOUT + 5,
    )


def test_http_static_large_file(tmp_path: Path) -> None:
    root = tmp_path / "www"
    (root / "sub").mkdir(parents=True)
    big = root / "sub" / "big file.bin"
    big.write_bytes(os.urandom(100 << 20) + b"tail")
    (root / "index.html").write_text("<h1>hello</h1>\n")
    out = tmp_path / "downloaded"
    with example("http_static.py", "0", "--root", str(root)) as (_server, port):
        base = f"http://127.0.0.1:{port}"
        got = curl("--fail", "-o", str(out), f"{base}/sub/big%20file.bin")
        assert got.returncode == 0, got.stderr
        assert out.stat().st_size == big.stat().st_size
        sha = hashlib.sha256
        assert sha(out.read_bytes()).hexdigest() == sha(big.read_bytes()).hexdigest()

        # Keep-alive: two requests, one connection.
        got = curl(
            "-w",
            "%{http_code} %{num_connects}\n",
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
            f"{base}/",
            f"{base}/index.html",
        )
        assert got.stdout.decode().split() == ["200", "1", "200", "0"], got

        head = curl("-I", f"{base}/sub/big%20file.bin")
        assert f"content-length: {big.stat().st_size}" in head.stdout.decode().lower()
        assert "accept-ranges: bytes" in head.stdout.decode().lower()

        # HEAD of a missing file: headers only, and the server lives on.
        got = curl("-I", "-o", "/dev/null", "-w", "%{http_code}", f"{base}/missing")
        assert got.stdout.decode() == "404", got
        for path, code in [("/missing", "404"), ("/../../etc/passwd", "404")]:
            got = curl("--path-as-is", "-o", "/dev/null", "-w", "%{http_code}", base + path)
            assert got.stdout.decode() == code, (path, got)
        got = curl("-X", "POST", "-d", "x", "-o", "/dev/null", "-w", "%{http_code}", base + "/")
        assert got.stdout.decode() == "405"


def test_http_static_ranges(tmp_path: Path) -> None:
    root = tmp_path / "www"
    root.mkdir()
    data = os.urandom(3 << 20)
    (root / "f.bin").write_bytes(data)
    size = len(data)
    with example("http_static.py", "0", "--root", str(root)) as (_server, port):
        url = f"http://127.0.0.1:{port}/f.bin"
        for spec, first, last in [
            ("0-0", 0, 0),
            ("100-199", 100, 199),
            ("1000000-", 1000000, size - 1),
            ("-4096", size - 4096, size - 1),
            (f"{size - 10}-{size + 1000}", size - 10, size - 1),
            ("70000-2500000", 70000, 2500000),
        ]:
            got = curl("-D", "-", "-r", spec, "-o", str(tmp_path / "part"), url)
            assert got.returncode == 0, got.stderr
            head = got.stdout.decode().lower()
            assert head.startswith("http/1.1 206"), (spec, head)
            assert f"content-range: bytes {first}-{last}/{size}" in head, (spec, head)
            assert (tmp_path / "part").read_bytes() == data[first : last + 1], spec
        # Nothing of the range exists: 416 and the size.
        got = curl("-D", "-", "-o", "/dev/null", "-r", f"{size}-", url)
        head = got.stdout.decode().lower()
        assert head.startswith("http/1.1 416"), head
        assert f"content-range: bytes */{size}" in head
        # A range curl resumes a download with: the rest arrives intact.
        partial = tmp_path / "resumed"
        partial.write_bytes(data[:12345])
        got = curl("--fail", "-C", "-", "-o", str(partial), url)
        assert got.returncode == 0, got.stderr
        assert partial.read_bytes() == data
        got = curl("-o", "/dev/null", "-w", "%{http_code}", url + ".missing")
        assert got.stdout.decode() == "404"


@pytest.mark.parametrize("env", [{}, {"TRIO_URING_DISABLE": "1"}], ids=["io_uring", "no-io_uring"])
def test_http_static_small_files(tmp_path: Path, env: dict[str, str]) -> None:
    """Sizes around the splice threshold and slice sizes, one connection."""
    root = tmp_path / "www"
    root.mkdir()
    sizes = [0, 1, 4095, 16384, 65535, 65536, 65537, 300_000]
    files = {n: os.urandom(n) for n in sizes}
    for n, data in files.items():
        (root / f"{n}.bin").write_bytes(data)
    with example("http_static.py", "0", "--root", str(root), env=env) as (_server, port):
        base = f"http://127.0.0.1:{port}"
        args = []
        for n in sizes:
            args += ["-o", str(tmp_path / f"got-{n}"), f"{base}/{n}.bin"]
        got = curl("--fail", "-w", "%{num_connects}\n", *args)
        assert got.returncode == 0, got.stderr
        assert got.stdout.decode().split()[1:] == ["0"] * (len(sizes) - 1)  # keep-alive
    for n, data in files.items():
        assert (tmp_path / f"got-{n}").read_bytes() == data, n


# -- tls_echo --------------------------------------------------------------------


def read_until(proc: subprocess.Popen, expected: bytes, timeout: float) -> bytes:
    """Read ``proc``'s stdout until ``expected`` has all arrived."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    got = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while len(got) < len(expected):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                break
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            got += chunk
    return got


def test_tls_echo_with_openssl_s_client(tmp_path: Path) -> None:
    cafile = tmp_path / "ca.pem"
    with example("tls_echo.py", "0", "--cafile", str(cafile)) as (_server, port):
        argv = [
            need("openssl"), "s_client", "-connect", f"127.0.0.1:{port}",
            "-CAfile", str(cafile), "-verify_return_error", "-verify_ip", "127.0.0.1",
            "-quiet",
        ]  # fmt: skip
        client = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            assert client.stdin is not None
            # Hex lines: s_client sends whatever stdin gives it; -quiet turns
            # off its one-letter commands.
            message = b"".join(os.urandom(32).hex().encode() + b"\n" for _ in range(2000))
            client.stdin.write(b"hello over tls\n")
            client.stdin.flush()
            assert read_until(client, b"hello over tls\n", 15) == b"hello over tls\n"
            client.stdin.write(message)
            client.stdin.flush()
            echoed = read_until(client, message, 15)
            assert echoed == message
        finally:
            stop(client)


# -- broadcast ---------------------------------------------------------------------


def test_broadcast_to_subscribers() -> None:
    n_subs, n_messages, size = 3, 40, 100_000
    args = ["0", "--subscribers", str(n_subs), "--messages", str(n_messages), "--size", str(size)]
    with example("broadcast.py", *args) as (publisher, port):
        subs = [
            subprocess.Popen(
                [sys.executable, str(EXAMPLES / "broadcast.py"), "--subscribe", str(port)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(n_subs)
        ]
        try:
            outputs = [sub.communicate(timeout=CLIENT_TIMEOUT) for sub in subs]
            rest, err = publisher.communicate(timeout=CLIENT_TIMEOUT)
        finally:
            for sub in subs:
                stop(sub)
    for sub, (out, err) in zip(subs, outputs, strict=True):
        assert sub.returncode == 0, err
        assert f"received {n_messages} messages ({n_messages * size} bytes)" in out
        assert "all intact" in out
    assert publisher.returncode == 0, err
    assert f"published {n_messages} messages of {size} bytes" in rest
    # Every subscriber got the same bytes: header (12 bytes) plus payload each time.
    per_stream = n_messages * (size + 12)
    assert rest.count(f": {per_stream} bytes in") == n_subs, rest
    # Registered once per message, sent by reference: one copy, not one per subscriber.
    assert f"{n_messages * (size + 12)} bytes copied in all" in rest, rest
    assert rest.count(" 0 bytes copied,") == n_subs, rest


# -- bulk_send -----------------------------------------------------------------------


def test_bulk_send_small() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "bulk_send.py"), "--mib", "16"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "received 16777216 bytes, sha256 matches" in done.stdout


def test_http_static_under_wrk(tmp_path: Path) -> None:
    """A real load generator, 20 keep-alive connections for two seconds:
    every response complete and 200 (wrk counts short or broken ones)."""
    wrk = shutil.which("wrk")
    if wrk is None:
        pytest.skip("wrk is not installed (scripts/test.sh installs it where it can)")
    root = tmp_path / "www"
    root.mkdir()
    (root / "page.bin").write_bytes(os.urandom(16 * 1024))
    with example("http_static.py", "0", "--root", str(root)) as (_server, port):
        got = subprocess.run(
            [wrk, "-t1", "-c20", "-d2s", f"http://127.0.0.1:{port}/page.bin"],
            capture_output=True,
            text=True,
            timeout=CLIENT_TIMEOUT,
        )
    assert got.returncode == 0, got.stderr
    out = got.stdout
    requests = int(out.split(" requests in ")[0].split()[-1])
    assert requests > 100, out
    assert "Non-2xx" not in out and "Socket errors" not in out, out
    # Every byte of every body arrived: wrk reads by Content-Length.
    assert "Transfer/sec" in out
