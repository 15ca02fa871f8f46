"""Instructions per ``send_all``, and per echo request, counted by callgrind.

python -m trio_uring.bench.callgrind                        # about five minutes
python -m trio_uring.bench.callgrind --contenders trio,zc:auto --counts 4096:100:300 --no-echo

Wall-clock figures move with whatever else runs on a shared machine; the
number of user-space instructions a call executes hardly does.  This
counts them with ``valgrind --tool=callgrind`` for trio's ``SocketStream``
and for ``ZeroCopyStream`` (``zc:auto`` and every strategy this kernel
runs), sending to the C sink.

Method: the same sender program (``counted_send.py``) runs under callgrind
once with ``N1`` calls per payload size and once more per size with ``N2``
calls of that size; ``(Ir(N2) - Ir(N1)) / (N2 - N1)`` is the cost of one
call, because start-up, imports, connecting, the manager's set-up and a
stream's first sends (where ``zc:auto`` finds out that loopback copies)
are the same in both runs and cancel.  ``N1`` is large enough to cover
that warm-up.  Only the sender runs under valgrind; the kernel's work is
not counted (it is not user space), nor is the sink's.

Echo requests are counted the same way: the echo server of scenario (c)
(``counted_echo.py``) runs under callgrind while ``CLIENTS`` connections
from this process make ``R1`` requests each, and again with ``R2``;
``(Ir(R2) - Ir(R1)) / (CLIENTS * (R2 - R1))`` is the server's work per
request.  Each connection sends its next request as soon as its answer is
in, so the server, slowed by valgrind, finds a request waiting on every
connection, as a loaded server does.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio_uring

from . import contenders, csink
from .config import KIB, MIB, Config, size_label
from .report import machine_info
from .sink import sink_process

SCHEMA = "trio_uring.bench.callgrind/1"
REPORT_NAME = "callgrind.json"
#: (size, N1, N2): N1 covers a stream's warm-up (zc:auto leaves zero copy
#: after 32 "copied" notifications; coalesced, one request carries up to
#: 64 messages of 4 KiB), N2 - N1 calls are what is measured.
DEFAULT_COUNTS = ((4 * KIB, 3000, 6000), (MIB, 40, 120))
#: (clients, R1, R2) for echo requests: R1 covers accepting and the first
#: requests, R2 - R1 requests per client are what is measured.
DEFAULT_ECHO = (50, 200, 600)
BASELINE = contenders.BASELINE


class ValgrindMissing(RuntimeError):
    """valgrind is not installed; the message says how to get it."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One callgrind run of the sender: ``counts`` maps size -> calls."""

    contender: str
    counts: tuple[tuple[int, int], ...]
    measures: int | None  # the size whose count is N2, None for the base run


@dataclasses.dataclass(frozen=True)
class EchoRun:
    """One callgrind run of the echo server: ``requests`` per client."""

    contender: str
    requests: int


def find_valgrind() -> str:
    path = shutil.which("valgrind")
    if path is None:
        raise ValgrindMissing(
            "valgrind not found on PATH (apt-get install valgrind); instruction counts are skipped"
        )
    return path


def interpreter() -> str:
    """The Python binary to run under valgrind.

    valgrind must start the interpreter itself: a wrapper script (a pyenv
    shim) would be what it instruments, and the interpreter it starts would
    run uninstrumented.  Outside a virtual environment the real path of
    ``sys.executable`` is used; inside one the link is kept, since the
    environment is found through it.
    """
    path = sys.executable
    if sys.prefix == sys.base_prefix:
        path = os.path.realpath(path)
    with open(path, "rb") as f:
        if f.read(4) != b"\x7fELF":
            raise RuntimeError(f"{path} is not an executable binary; valgrind cannot run it")
    return path


def parse_total(text: str) -> int:
    """Total instructions (Ir) from a callgrind output file."""
    for key in ("summary", "totals"):
        match = re.search(rf"^{key}:\s*(\d+)", text, re.MULTILINE)
        if match:
            return int(match.group(1))
    raise ValueError("no 'summary:' or 'totals:' line in the callgrind output")


def per_call(ir_n1: int, ir_n2: int, n1: int, n2: int) -> float | None:
    """Instructions of one call: the difference of two runs over the
    difference of their call counts.

    None when the run with more calls counted fewer instructions: what the
    two runs do besides the counted calls differed by more than the calls
    cost (trio's ``SocketStream`` at 1 MiB, whose cost per call depends on
    how often the socket is full, can do that), so the difference measures
    nothing.  Larger counts, or another run, give a figure.
    """
    if n2 <= n1:
        raise ValueError(f"N2 ({n2}) must exceed N1 ({n1})")
    if ir_n2 < ir_n1:
        return None
    return (ir_n2 - ir_n1) / (n2 - n1)


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


#: What the tables print for a count ``per_call`` could not give.
UNSTABLE = "unstable"
UNSTABLE_NOTE = (
    f"{UNSTABLE}: the run with more calls counted fewer instructions (the cost per call "
    "varied with the socket's state more than the extra calls add); rerun, or use larger counts"
)


def plan_runs(names: list[str], counts: tuple[tuple[int, int, int], ...]) -> list[Run]:
    """Per contender: one run with N1 calls of every size, and one per size
    with N2 calls of that size (and N1 of the others)."""
    runs = []
    for name in names:
        base = tuple((size, n1) for size, n1, _ in counts)
        runs.append(Run(name, base, None))
        for size, _, n2 in counts:
            runs.append(Run(name, tuple((s, n2 if s == size else c) for s, c in base), size))
    return runs


def resolve_names(chosen: list[str] | None) -> tuple[list[str], list[dict[str, str]]]:
    """trio, zc:auto and each strategy this kernel runs (or the ``chosen``
    subset, trio always kept); the others with the reason they are skipped."""
    runnable = contenders.runnable_strategies()
    every = [BASELINE, "zc:auto", *(f"zc:{s}" for s in runnable)]
    skipped = [
        {"contender": f"zc:{s}", "reason": "this kernel cannot run it"}
        for s in trio_uring.STRATEGIES
        if s not in runnable
    ]
    if chosen is None:
        return every, skipped
    names = [n for n in every if n == BASELINE or n in chosen]
    skipped += [{"contender": n, "reason": "unknown contender"} for n in chosen if n not in every]
    return names, skipped


def run_one(run: Run, valgrind: str, python: str, port: int, config: Config, workdir: Path) -> int:
    """Run the sender under callgrind; return its total instruction count."""
    job = {
        "contender": run.contender,
        "host": "127.0.0.1",
        "port": port,
        "counts": [list(pair) for pair in run.counts],
        "arena_size": config.arena_size,
        "slice_size": config.slice_size,
    }
    out = workdir / f"callgrind.{os.getpid()}.{time.monotonic_ns()}.out"
    proc = subprocess.run(
        _valgrind_command(valgrind, python, out, "trio_uring.bench.counted_send", job),
        capture_output=True,
        text=True,
        env=_valgrind_env(),
        timeout=600,
    )
    return _total_of(proc.returncode, proc.stderr, out)


def _total_of(returncode: int, stderr: str, out: Path) -> int:
    """The total of a finished callgrind run (its output file removed), or
    the program's last line of error output as a ``RuntimeError``."""
    try:
        if returncode != 0:
            lines = [ln for ln in stderr.splitlines() if not ln.startswith("==")]
            raise RuntimeError((lines or ["no output"])[-1] + f" (exit status {returncode})")
        return parse_total(out.read_text())
    finally:
        out.unlink(missing_ok=True)


def _valgrind_env() -> dict[str, str]:
    """The environment of a counted program: a fixed hash seed, so that dict
    and set layouts, and the instructions that walk them, are the same in
    both runs of a difference."""
    return dict(os.environ, PYTHONHASHSEED="0")


def _valgrind_command(
    valgrind: str, python: str, out: Path, module: str, job: dict[str, Any]
) -> list[str]:
    return [
        valgrind,
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        python,
        "-m",
        module,
        json.dumps(job),
    ]


def drive_echo(port: int, clients: int, requests: int, size: int) -> None:
    """``clients`` connections make ``requests`` requests of ``size`` bytes
    each, one at a time per connection, the next sent as soon as the answer
    is in; raise if an answer is not the request.

    Under valgrind the server is far slower than this loop, so it finds a
    request waiting on every connection, as a loaded server does.
    """
    request = bytes(range(256)) * (size // 256) + bytes(size % 256)
    socks: dict[int, socket.socket] = {}
    left: dict[int, int] = {}
    answers: dict[int, bytearray] = {}
    with select.epoll() as ep:
        try:
            for _ in range(clients):
                s = socket.create_connection(("127.0.0.1", port), timeout=300)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                socks[s.fileno()] = s
            for fd, s in socks.items():
                left[fd] = requests
                answers[fd] = bytearray()
                s.sendall(request)
                s.setblocking(False)
                ep.register(fd, select.EPOLLIN)
            while left:
                events = ep.poll(300)
                if not events:
                    raise RuntimeError("the echo server stopped answering")
                for fd, _ in events:
                    data = socks[fd].recv(size - len(answers[fd]))
                    if not data:
                        raise RuntimeError("the echo server closed a connection early")
                    answers[fd] += data
                    if len(answers[fd]) < size:
                        continue
                    if answers[fd] != request:
                        raise RuntimeError("the echo server answered with other bytes")
                    answers[fd].clear()
                    left[fd] -= 1
                    if left[fd]:
                        socks[fd].send(request)  # one request in flight: it fits
                    else:
                        del left[fd]
                        ep.unregister(fd)
                        socks.pop(fd).close()
        finally:
            for s in socks.values():
                s.close()


def run_echo(
    run: EchoRun, valgrind: str, python: str, clients: int, config: Config, workdir: Path
) -> int:
    """Run the echo server under callgrind while the clients make their
    requests; return its total instruction count."""
    job = {
        "contender": run.contender,
        "host": "127.0.0.1",
        "clients": clients,
        "arena_size": config.arena_size,
        "slice_size": config.slice_size,
    }
    out = workdir / f"callgrind.echo.{os.getpid()}.{time.monotonic_ns()}.out"
    command = _valgrind_command(valgrind, python, out, "trio_uring.bench.counted_echo", job)
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_valgrind_env(),
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        try:
            line = proc.stdout.readline()
            if not line.startswith("PORT "):
                raise RuntimeError(f"the echo server did not start: {proc.stderr.read()[-500:]}")
            drive_echo(int(line.split()[1]), clients, run.requests, config.echo_size)
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
        return _total_of(proc.returncode, proc.stderr.read(), out)


def _run_all(
    runs: list[Any], run: Callable[[Any, Path], int], describe: Callable[[Any], str], jobs: int
) -> tuple[dict[Any, int], list[dict[str, str]]]:
    """``run(r, workdir)`` for every run, ``jobs`` at a time, with a progress
    line each; the totals of those that completed, and the errors."""
    totals: dict[Any, int] = {}
    errors: list[dict[str, str]] = []
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="trio_uring-callgrind-") as tmp:
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(run, r, Path(tmp)): r for r in runs}
            for i, future in enumerate(concurrent.futures.as_completed(futures), 1):
                r = futures[future]
                what = describe(r)
                try:
                    totals[r] = future.result()
                    detail = f"{totals[r]:,} Ir"
                except (RuntimeError, ValueError, OSError, subprocess.TimeoutExpired) as exc:
                    errors.append({"contender": r.contender, "run": what, "error": str(exc)})
                    detail = f"FAILED: {exc}"
                elapsed = time.monotonic() - start
                print(
                    f"[{i}/{len(runs)} {elapsed:4.0f}s] {r.contender} {what}: {detail}",
                    file=sys.stderr,
                    flush=True,
                )
    return totals, errors


def measure_echo(
    names: list[str],
    echo: tuple[int, int, int],
    config: Config,
    jobs: int,
    valgrind: str,
    python: str,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Two echo runs per contender; the instructions per request of each."""
    clients, r1, r2 = echo
    runs = [EchoRun(name, r) for name in names for r in (r1, r2)]
    totals, errors = _run_all(
        runs,
        lambda r, workdir: run_echo(r, valgrind, python, clients, config, workdir),
        lambda r: f"echo, {r.requests} requests per client",
        jobs,
    )
    results = []
    for name in names:
        low, high = EchoRun(name, r1), EchoRun(name, r2)
        if low not in totals or high not in totals:
            continue
        results.append(
            {
                "contender": name,
                "ir_r1": totals[low],
                "ir_r2": totals[high],
                "instructions_per_request": per_call(
                    totals[low], totals[high], clients * r1, clients * r2
                ),
            }
        )
    base = next((r for r in results if r["contender"] == BASELINE), None)
    for r in results:
        r["ratio"] = _ratio(
            r["instructions_per_request"], base["instructions_per_request"] if base else None
        )
    return results, errors


def measure(
    names: list[str],
    counts: tuple[tuple[int, int, int], ...],
    config: Config,
    port: int,
    jobs: int,
    valgrind: str,
    python: str,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Run every planned run (``jobs`` at a time); return the results per
    (contender, size) and the errors."""
    runs = plan_runs(names, counts)
    totals, errors = _run_all(
        runs,
        lambda r, workdir: run_one(r, valgrind, python, port, config, workdir),
        lambda r: "base" if r.measures is None else f"N2 at {size_label(r.measures)}",
        jobs,
    )
    results = []
    by_key = {(r.contender, r.measures): r for r in runs}
    for name in names:
        base = by_key[(name, None)]
        for size, n1, n2 in counts:
            run = by_key[(name, size)]
            if base not in totals or run not in totals:
                continue
            results.append(
                {
                    "contender": name,
                    "size": size,
                    "param": size_label(size),
                    "n1": n1,
                    "n2": n2,
                    "ir_n1": totals[base],
                    "ir_n2": totals[run],
                    "instructions_per_send_all": per_call(totals[base], totals[run], n1, n2),
                }
            )
    for r in results:
        base_r = next(
            (b for b in results if b["contender"] == BASELINE and b["size"] == r["size"]), None
        )
        r["ratio"] = _ratio(
            r["instructions_per_send_all"], base_r["instructions_per_send_all"] if base_r else None
        )
    return results, errors


def _human(value: float | None) -> str:
    if value is None:
        return UNSTABLE
    for limit, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}"


def format_table(report: dict[str, Any]) -> str:
    """One row per contender, one column per size: instructions per call
    and, for all but trio, the ratio to trio's."""
    sizes = [c["size"] for c in report["counts"]]
    header = ["contender", *(size_label(s) for s in sizes)]
    lines = [header]
    for name in report["contenders"]:
        row = [name]
        for size in sizes:
            r = next(
                (x for x in report["results"] if x["contender"] == name and x["size"] == size),
                None,
            )
            if r is None:
                row.append("failed")
            elif name == BASELINE or r["ratio"] is None:
                row.append(_human(r["instructions_per_send_all"]))
            else:
                row.append(f"{_human(r['instructions_per_send_all'])} ({r['ratio']:.2f}x)")
        lines.append(row)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    counts = ", ".join(
        f"{size_label(c['size'])}: N1={c['n1']} N2={c['n2']}" for c in report["counts"]
    )
    title = (
        "user-space instructions per send_all (callgrind), (Ir(N2) - Ir(N1)) / (N2 - N1); "
        "in brackets: ratio to trio"
    )
    lines = [title, f"counts: {counts}", f"sink: {report['sink']['detail']}", *text]
    echo = report.get("echo")
    if echo:
        lines += [
            "",
            f"user-space instructions per echo request of the server ({echo['clients']} "
            f"clients, {echo['size']} B requests, R1={echo['r1']} R2={echo['r2']} per client)",
        ]
        width = max(len(n) for n in report["contenders"])
        for r in report["echo_results"]:
            value = _human(r["instructions_per_request"])
            if r["contender"] != BASELINE and r["ratio"] is not None:
                value += f" ({r['ratio']:.2f}x)"
            lines.append(f"{r['contender'].ljust(width)}  {value}")
    counted = [
        *(r["instructions_per_send_all"] for r in report["results"]),
        *(r["instructions_per_request"] for r in report.get("echo_results", [])),
    ]
    if None in counted:
        lines += ["", UNSTABLE_NOTE]
    return "\n".join(lines)


def _three_counts(text: str, form: str, least: int, least_low: int) -> tuple[int, int, int]:
    """Parse ``A:LOW:HIGH`` (named as in ``form``): ``A >= least`` and
    ``least_low <= LOW < HIGH``."""
    name, low_name, high_name = form.split(":")
    try:
        first, low, high = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {form}, got {text!r}") from None
    if first < least or low < least_low or high <= low:
        raise argparse.ArgumentTypeError(
            f"need {name} >= {least} and {least_low} <= {low_name} < {high_name}, got {text!r}"
        )
    return first, low, high


def _counts(text: str) -> tuple[int, int, int]:
    return _three_counts(text, "SIZE:N1:N2", 1, 0)


def _echo(text: str) -> tuple[int, int, int]:
    return _three_counts(text, "CLIENTS:R1:R2", 1, 1)


def build_parser() -> argparse.ArgumentParser:
    default_counts = " ".join(f"{s}:{a}:{b}" for s, a, b in DEFAULT_COUNTS)
    parser = argparse.ArgumentParser(
        prog="python -m trio_uring.bench.callgrind",
        description="Count user-space instructions per send_all, and per echo request, "
        "with valgrind's callgrind.",
    )
    parser.add_argument(
        "--contenders",
        metavar="LIST",
        help="comma-separated subset of trio, zc:auto, zc:<strategy> (trio is always kept)",
    )
    parser.add_argument(
        "--counts",
        type=_counts,
        action="append",
        metavar="SIZE:N1:N2",
        help=f"payload size and the two call counts, repeatable; default {default_counts}",
    )
    parser.add_argument(
        "--echo",
        type=_echo,
        default=DEFAULT_ECHO,
        metavar="CLIENTS:R1:R2",
        help="echo clients and the two request counts per client; default "
        + ":".join(str(x) for x in DEFAULT_ECHO),
    )
    parser.add_argument(
        "--no-echo", action="store_true", help="count send_all only, not echo requests"
    )
    parser.add_argument(
        "--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs at a time"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("bench-results"), help=f"directory for {REPORT_NAME}"
    )
    parser.add_argument("--cache-dir", type=Path, help="where the C sink is compiled")
    return parser


def main(argv: list[str] | None = None) -> int:
    raw_argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(raw_argv)
    try:
        valgrind = find_valgrind()
    except ValgrindMissing as exc:
        print(exc, file=sys.stderr)
        return 0
    counts: tuple[tuple[int, int, int], ...] = tuple(args.counts or DEFAULT_COUNTS)
    chosen = [c.strip() for c in args.contenders.split(",")] if args.contenders else None
    names, skipped = resolve_names(chosen)
    for s in skipped:
        print(f"skipping {s['contender']}: {s['reason']}", file=sys.stderr)
    config = Config()
    python = interpreter()
    version = subprocess.run([valgrind, "--version"], capture_output=True, text=True)
    sink = csink.choose_sink(args.cache_dir)
    if sink.kind != csink.C:
        print(f"sink: {sink.detail}", file=sys.stderr)
    started = datetime.datetime.now(datetime.timezone.utc)
    jobs = max(1, args.jobs)
    with sink_process(sink) as port:
        results, errors = measure(names, counts, config, port, jobs, valgrind, python)
    echo_results: list[dict[str, Any]] = []
    if not args.no_echo:
        echo_results, echo_errors = measure_echo(names, args.echo, config, jobs, valgrind, python)
        errors += echo_errors
    report = {
        "schema": SCHEMA,
        "command": ["python", "-m", "trio_uring.bench.callgrind", *raw_argv],
        "started_at": started.isoformat(),
        "duration_s": (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(),
        "method": "(Ir(N2) - Ir(N1)) / (N2 - N1), user space of the sender, valgrind callgrind",
        "valgrind": version.stdout.strip(),
        "python": python,
        "machine": machine_info(),
        "features": trio_uring.features().as_dict(),
        "arena_size": config.arena_size,
        "slice_size": config.slice_size,
        "sink": sink.as_dict(),
        "counts": [{"size": s, "n1": a, "n2": b} for s, a, b in counts],
        "contenders": names,
        "skipped": skipped,
        "errors": errors,
        "results": results,
        "echo": None
        if args.no_echo
        else dict(zip(("clients", "r1", "r2"), args.echo, strict=True), size=config.echo_size),
        "echo_results": echo_results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / REPORT_NAME
    path.write_text(json.dumps(report, indent=1))
    print(format_table(report))
    for e in errors:
        print(f"{e['contender']} {e['run']} FAILED: {e['error']}")
    print(f"\nJSON: {path}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
