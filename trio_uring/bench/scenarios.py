"""Plan the cells of a run, execute them, and collect every raw sample.

A *cell* is (scenario, contender, parameter); each runs ``reps`` times.
Repetitions are the outer loop, so a burst of noise from another process
on this shared machine hits one repetition of every contender rather than
every repetition of one, and the median survives it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import trio_uring

from . import contenders, csender, static
from .config import Config, size_label
from .contenders import SendResult
from .csink import SinkChoice, choose_sink
from .sink import sink_process

GIB = 1 << 30


class Progress:
    """One status line on stderr, rewritten in place on a terminal.

    Runs take minutes; the line says how far along the run is and what the
    last sample measured.  Without a terminal each step is its own line.
    """

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = total
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.monotonic()
        self._width = 0

    def _write(self, text: str) -> None:
        if self.tty:
            pad = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def step(self, label: str, detail: str = "") -> None:
        self.done += 1
        elapsed = time.monotonic() - self.start
        self._write(f"[{self.done}/{self.total} {elapsed:5.0f}s] {label} {detail}".rstrip())

    def note(self, message: str) -> None:
        """A message that stays (a skipped contender, a failure)."""
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0
        self.stream.write(message + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()


@dataclasses.dataclass
class Lineup:
    """The contenders this run measures and those it had to skip, with why,
    and the sink they send to (None with ``--connect``: the sink is remote)."""

    names: list[str]
    skipped: list[dict[str, str]]
    c_binary: Any = None
    sink: SinkChoice | None = None


def resolve_contenders(config: Config) -> Lineup:
    """Expand ``zc:*`` to the runnable strategies, build the C sender and
    the C sink, and drop (with a reason) whatever cannot run here."""
    names: list[str] = []
    skipped: list[dict[str, str]] = []
    strategies = contenders.runnable_strategies()
    for name in trio_uring.STRATEGIES:
        if name not in strategies:
            skipped.append({"contender": f"zc:{name}", "reason": "this kernel cannot run it"})
    if "e" in config.scenarios and static.find_wrk() is None:
        skipped.append(
            {"contender": "scenario e", "reason": "wrk is not installed (apt-get install wrk)"}
        )
    c_binary = None
    for entry in contenders.ORDER:
        expanded = [f"zc:{s}" for s in strategies] if entry == "zc:*" else [entry]
        for name in expanded:
            if config.contenders is not None and name not in config.contenders:
                continue
            if name == "uvloop" and not contenders.uvloop_available():
                skipped.append({"contender": name, "reason": "uvloop is not installed"})
                continue
            if name in contenders.C_CONTENDERS:
                if c_binary is None:
                    try:
                        c_binary = csender.build(config.cache_dir)
                    except csender.CompileError as exc:
                        skipped.append({"contender": name, "reason": str(exc)})
                        continue
            names.append(name)
    if config.contenders is not None:
        known = set(names) | {s["contender"] for s in skipped}
        for name in config.contenders:
            if name not in known:
                skipped.append({"contender": name, "reason": "unknown contender"})
    sink = choose_sink(config.cache_dir) if config.connect is None else None
    return Lineup(names, skipped, c_binary, sink)


@dataclasses.dataclass(frozen=True)
class SendCell:
    scenario: str
    sizes: tuple[int, ...]
    streams: int
    duration: float


@dataclasses.dataclass(frozen=True)
class EchoCell:
    scenario: str
    clients: int
    duration: float


@dataclasses.dataclass(frozen=True)
class StaticCell:
    scenario: str
    sizes: tuple[int, ...]
    connections: int
    duration: float


Cell = SendCell | EchoCell | StaticCell


def plan(config: Config) -> list[Cell]:
    """The cells the selected scenarios need, in run order."""
    chosen = set(config.scenarios)
    cells: list[Cell] = []
    if "a" in chosen or "d" in chosen:
        sizes = config.sizes_one if "a" in chosen else config.sizes_cpu
        cells.append(SendCell("a", tuple(sizes), 1, config.duration_one))
    if "b" in chosen:
        cells.append(SendCell("b", config.sizes_many, config.streams, config.duration_many))
    if "f" in chosen:
        cells.append(
            SendCell("f", config.fanout_sizes, config.fanout_subscribers, config.duration_fanout)
        )
    if "c" in chosen and config.connect is None:
        cells.append(EchoCell("c", config.clients, config.duration_echo))
    if "e" in chosen and config.connect is None and static.find_wrk() is not None:
        cells.append(
            StaticCell("e", config.static_sizes, config.static_connections, config.duration_static)
        )
    if "smoke" in chosen:
        cells.append(SendCell("smoke", (config.smoke_size,), 1, config.duration_one))
        if config.connect is None:
            cells.append(EchoCell("smoke", config.smoke_clients, config.duration_echo))
    return cells


def applies(cell: Cell, contender: str) -> bool:
    """C senders measure one stream and serve no echo; scenario e has one
    server per library."""
    if isinstance(cell, StaticCell):
        return contender in static.STATIC_CONTENDERS
    if contender in contenders.C_CONTENDERS:
        return isinstance(cell, SendCell) and cell.streams == 1 and cell.scenario != "f"
    if isinstance(cell, SendCell) and cell.scenario == "f":
        # trio's send_all of the same bytes against registered content.
        return contender == contenders.BASELINE or contenders.is_zero_copy(contender)
    return True


def count_samples(cells: list[Cell], names: list[str], reps: int) -> int:
    per_rep = 0
    for cell in cells:
        for name in names:
            if applies(cell, name):
                per_rep += 1 if isinstance(cell, EchoCell) else len(cell.sizes)
    return per_rep * reps


def send_metrics(r: SendResult, size: int) -> dict[str, float | None]:
    """Derived figures of one sender sample; None where it does not apply."""
    gib = r.bytes_sent / GIB if r.bytes_sent else 0.0
    return {
        "throughput_gbps": r.bytes_received / r.elapsed / 1e9 if r.elapsed else 0.0,
        "messages_per_s": r.messages / r.elapsed if r.elapsed else 0.0,
        "cpu_s_per_gib": r.cpu / gib if gib else None,
        "enter_calls_per_gib": r.enter_calls / gib if gib and r.enter_calls else None,
        "rss_growth_kib": float(r.rss_end_kib - r.rss_start_kib) if r.rss_start_kib else None,
        # User-space copies of the payload per message (trio_uring counts
        # them; for trio, send_all copies nothing in user space).
        "copies_per_message": r.bytes_copied / (r.messages * size) if r.messages else None,
    }


def _proc_cpu_seconds(pid: int) -> float:
    """User + system CPU of process ``pid`` (Linux /proc), for the echo servers."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Runner:
    """Runs the planned cells and accumulates samples for the report."""

    def __init__(self, config: Config, lineup: Lineup, progress: Progress) -> None:
        self.config = config
        self.lineup = lineup
        self.progress = progress
        self.samples: list[dict[str, Any]] = []

    def _job(self, **job: Any) -> list[str]:
        job.setdefault("arena_size", self.config.arena_size)
        job.setdefault("slice_size", self.config.slice_size)
        return [sys.executable, "-m", "trio_uring.bench.worker", json.dumps(job)]

    def _record_send(
        self, cell: SendCell, name: str, rep: int, size: int, result: SendResult | None, error: str
    ) -> None:
        ok = result is not None and not error and result.bytes_sent == result.bytes_received
        if result is not None and not error and not ok:
            error = f"sent {result.bytes_sent} bytes but the sink counted {result.bytes_received}"
        sample = {
            "scenario": cell.scenario,
            "kind": "send",
            "contender": name,
            "param": size_label(size),
            "size": size,
            "streams": cell.streams,
            "rep": rep,
            "ok": ok,
            "error": error or None,
            "raw": dataclasses.asdict(result) if result is not None else None,
            "metrics": send_metrics(result, size) if result is not None else {},
        }
        self.samples.append(sample)
        label = f"{cell.scenario} {name} {size_label(size)} x{cell.streams} rep {rep + 1}"
        if ok:
            m = sample["metrics"]
            detail = f"{m['throughput_gbps']:.2f} GB/s {m['messages_per_s']:,.0f} msg/s"
        else:
            detail = "FAILED"
            self.progress.note(f"{label}: {error}")
        self.progress.step(label, detail)

    def run_send(self, cell: SendCell, name: str, rep: int, host: str, port: int) -> None:
        if name in contenders.C_CONTENDERS:
            for size in cell.sizes:
                try:
                    result = csender.run(
                        self.lineup.c_binary, name, host, port, size, cell.duration
                    )
                    self._record_send(cell, name, rep, size, result, "")
                except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
                    self._record_send(cell, name, rep, size, None, str(exc))
            return
        cmd = self._job(
            job="send",
            contender=name,
            host=host,
            port=port,
            sizes=list(cell.sizes),
            duration=cell.duration,
            streams=cell.streams,
            fanout=cell.scenario == "f",
        )
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stderr is not None
        seen: set[int] = set()
        for line in proc.stdout:
            raw = json.loads(line)
            size = raw.pop("size")
            seen.add(size)
            self._record_send(cell, name, rep, size, SendResult(**raw), "")
        stderr = proc.stderr.read()
        proc.wait()
        for size in cell.sizes:
            if size not in seen:
                why = stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
                self._record_send(cell, name, rep, size, None, why[0])

    def _echo_server(self, name: str) -> contextlib.AbstractContextManager[tuple[int, int]]:
        return self._server(self._job(job="echo-server", contender=name, host="127.0.0.1"), name)

    @contextlib.contextmanager
    def _server(self, cmd: list[str], name: str) -> Iterator[tuple[int, int]]:
        """Start a worker that serves; yield its pid and the port it printed."""
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stderr is not None
            line = proc.stdout.readline()
            if not line.startswith("PORT "):
                proc.kill()
                last = proc.stderr.read().strip().splitlines()[-1:] or ["no output"]
                raise RuntimeError(f"{name} server did not start: {last[0]}")
            yield proc.pid, int(line.split()[1])
        finally:
            proc.terminate()
            proc.wait()

    def run_echo(self, cell: EchoCell, name: str, rep: int) -> None:
        error, result = "", None
        server_cpu = 0.0
        try:
            with self._echo_server(name) as (pid, port):
                cpu0 = _proc_cpu_seconds(pid)
                proc = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "trio_uring.bench.loadgen",
                        "--port",
                        str(port),
                        "--clients",
                        str(cell.clients),
                        "--size",
                        str(self.config.echo_size),
                        "--duration",
                        repr(cell.duration),
                    ],
                    capture_output=True,
                    text=True,
                    timeout=cell.duration + 60,
                )
                server_cpu = _proc_cpu_seconds(pid) - cpu0
            if proc.returncode != 0:
                error = proc.stderr.strip() or f"load generator exit status {proc.returncode}"
            else:
                result = json.loads(proc.stdout)
                if result["errors"] or not result["requests"]:
                    error = f"{result['errors']} connections failed, {result['requests']} requests"
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            error = str(exc)
        metrics: dict[str, float | None] = {}
        if result is not None:
            requests = result["requests"]
            metrics = {
                "requests_per_s": result["requests_per_s"],
                "p50_us": result["p50_us"],
                "p99_us": result["p99_us"],
                "server_cpu_us_per_request": server_cpu / requests * 1e6 if requests else None,
            }
        ok = result is not None and not error
        self.samples.append(
            {
                "scenario": cell.scenario,
                "kind": "echo",
                "contender": name,
                "param": f"{cell.clients}clients",
                "clients": cell.clients,
                "size": self.config.echo_size,
                "rep": rep,
                "ok": ok,
                "error": error or None,
                "raw": dict(result, server_cpu_s=server_cpu) if result is not None else None,
                "metrics": metrics,
            }
        )
        label = f"{cell.scenario} {name} echo {cell.clients} clients rep {rep + 1}"
        if ok:
            detail = f"{metrics['requests_per_s']:,.0f} req/s p99 {metrics['p99_us']:.0f} us"
        else:
            detail = "FAILED"
            self.progress.note(f"{label}: {error}")
        self.progress.step(label, detail)

    def run_static(self, cell: StaticCell, name: str, rep: int, root: Path) -> None:
        """Scenario e: one server process, one wrk run per file size."""
        wrk = static.find_wrk()
        assert wrk is not None
        results: dict[int, tuple[dict[str, Any] | None, float, str]] = {}
        try:
            job = self._job(job="static-server", contender=name, host="127.0.0.1", root=str(root))
            with self._server(job, name) as (pid, port):
                for size in cell.sizes:
                    url = f"http://127.0.0.1:{port}/{static.file_name(size)}"
                    cpu0 = _proc_cpu_seconds(pid)
                    try:
                        out = static.run_wrk(wrk, url, cell.connections, cell.duration)
                        error = f"{out['errors']} wrk errors" if out["errors"] else ""
                        if not out["requests"]:
                            error = "wrk completed no request"
                        results[size] = (out, _proc_cpu_seconds(pid) - cpu0, error)
                    except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
                        results[size] = (None, 0.0, str(exc))
        except (RuntimeError, OSError) as exc:
            for size in cell.sizes:
                results.setdefault(size, (None, 0.0, str(exc)))
        for size in cell.sizes:
            out, server_cpu, error = results[size]
            metrics: dict[str, float | None] = {}
            if out is not None:
                gib = out["requests"] * size / GIB
                metrics = {
                    "requests_per_s": out["requests_per_s"],
                    "p99_us": out["p99_us"],
                    "server_cpu_s_per_gib": server_cpu / gib if gib else None,
                }
            ok = out is not None and not error
            self.samples.append(
                {
                    "scenario": cell.scenario,
                    "kind": "static",
                    "contender": name,
                    "param": size_label(size),
                    "size": size,
                    "connections": cell.connections,
                    "rep": rep,
                    "ok": ok,
                    "error": error or None,
                    "raw": dict(out, server_cpu_s=server_cpu) if out is not None else None,
                    "metrics": metrics,
                }
            )
            label = f"{cell.scenario} {name} {size_label(size)} x{cell.connections} rep {rep + 1}"
            if ok:
                detail = f"{metrics['requests_per_s']:,.0f} req/s p99 {metrics['p99_us']:.0f} us"
            else:
                detail = "FAILED"
                self.progress.note(f"{label}: {error}")
            self.progress.step(label, detail)

    def run(self, cells: list[Cell]) -> list[dict[str, Any]]:
        sink: contextlib.AbstractContextManager[int]
        if self.config.connect is not None:
            host, port = self.config.connect
            sink = contextlib.nullcontext(port)
        else:
            host, sink = "127.0.0.1", sink_process(self.lineup.sink)
        with sink as port, tempfile.TemporaryDirectory(prefix="trio_uring-bench-") as tmp:
            root = Path(tmp)
            for cell in cells:
                if isinstance(cell, StaticCell):
                    static.make_files(root, cell.sizes)
            for rep in range(self.config.reps):
                for cell in cells:
                    for name in self.lineup.names:
                        if not applies(cell, name):
                            continue
                        if isinstance(cell, SendCell):
                            self.run_send(cell, name, rep, host, port)
                        elif isinstance(cell, StaticCell):
                            self.run_static(cell, name, rep, root)
                        else:
                            self.run_echo(cell, name, rep)
        self.progress.finish()
        return self.samples
