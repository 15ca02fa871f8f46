"""The benchmark suite's own logic; never whether anything is fast."""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from trio_uring.bench import (
    callgrind,
    cli,
    csender,
    csink,
    loadgen,
    report,
    scenarios,
    sink,
    static,
)
from trio_uring.bench.config import KIB, MIB, Config, size_label
from trio_uring.bench.contenders import SendResult


def test_parse_defaults() -> None:
    args, config = cli.parse_args([])
    assert args.sink is None
    assert config.scenarios == ("a", "b", "c", "d", "e", "f")
    assert not config.quick and config.reps >= 3
    assert config.out == Path("bench-results")
    assert config.connect is None and config.contenders is None


def test_parse_quick_and_overrides() -> None:
    _, config = cli.parse_args(
        ["--quick", "--scenarios", "a,smoke", "--reps", "2", "--out", "x", "--streams", "7"]
    )
    assert config.quick and config.reps == 2
    assert config.scenarios == ("a", "smoke")
    assert config.out == Path("x") and config.streams == 7
    assert config.duration_one < Config().duration_one


def test_parse_connect_sink_and_contenders() -> None:
    args, config = cli.parse_args(["--connect", "10.0.0.2:9000", "--contenders", "uvloop"])
    assert config.connect == ("10.0.0.2", 9000)
    assert config.contenders == ("trio", "uvloop")
    args, _ = cli.parse_args(["--sink", "9000"])
    assert args.sink == 9000


@pytest.mark.parametrize(
    "argv",
    [["--scenarios", "a,z"], ["--scenarios", ","], ["--connect", "nohost"], ["--reps", "0"]],
)
def test_parse_rejects(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.parse_args(argv)
    assert "error" in capsys.readouterr().err


def test_size_label() -> None:
    assert [size_label(s) for s in (4 * KIB, 64 * KIB, MIB, 16 * MIB, 100)] == [
        "4KiB",
        "64KiB",
        "1MiB",
        "16MiB",
        "100B",
    ]


def _sample(contender: str, value: float, rep: int, *, p99: float = 100.0) -> dict[str, Any]:
    return {
        "scenario": "c",
        "kind": "echo",
        "contender": contender,
        "param": "100clients",
        "size": 1024,
        "rep": rep,
        "ok": True,
        "error": None,
        "raw": {},
        "metrics": {"requests_per_s": value, "p99_us": p99},
    }


def test_ratio_and_aggregate() -> None:
    assert report.ratio(3.0, 2.0) == 1.5
    assert report.ratio(3.0, 0.0) is None
    samples = [
        _sample("trio", 100.0, 0, p99=200.0),
        _sample("trio", 300.0, 1, p99=400.0),
        _sample("trio", 200.0, 2, p99=300.0),
        _sample("uvloop", 400.0, 0, p99=150.0),
        _sample("uvloop", 500.0, 1, p99=150.0),
        _sample("uvloop", 600.0, 2, p99=150.0),
        {**_sample("uvloop", 1e9, 3), "ok": False},
    ]
    results = report.aggregate(samples, ["c"])
    rps = report.find(results, "c", "100clients", "requests_per_s", "uvloop")
    assert rps is not None
    assert (rps["median"], rps["min"], rps["max"], rps["n"]) == (500.0, 400.0, 600.0, 3)
    assert rps["ratio"] == pytest.approx(2.5)
    assert rps["ratio_min"] == pytest.approx(2.0) and rps["ratio_max"] == pytest.approx(3.0)
    p99 = report.find(results, "c", None, "p99_us", "uvloop")
    assert p99 is not None and p99["ratio"] == pytest.approx(0.5)
    assert not p99["higher_is_better"]
    base = report.find(results, "c", None, "requests_per_s", "trio")
    assert base is not None and base["ratio"] == 1.0
    assert report.aggregate(samples, ["a"]) == []


def test_targets_use_the_right_comparison() -> None:
    samples = [_sample("trio", 100.0, 0, p99=100.0), _sample("zc:x", 160.0, 0, p99=120.0)]
    targets = report.evaluate_targets(report.aggregate(samples, ["c"]), "zc:x")
    by_text = {t["target"]: t for t in targets}
    rps = by_text["echo, 100 clients, requests/s >= 1.5x trio"]
    assert rps["met"] is True and rps["ratio"] == pytest.approx(1.6)
    assert by_text["echo, 100 clients, p99 <= 0.8x trio"]["met"] is False
    assert by_text["one stream, 4 KiB messages/s >= 2.5x trio"]["met"] is None


def test_send_metrics() -> None:
    r = SendResult(
        messages=256,
        bytes_sent=256 * MIB,
        bytes_received=256 * MIB,
        elapsed=0.5,
        cpu=0.25,
        enter_calls=512,
        rss_start_kib=1000,
        rss_end_kib=1004,
    )
    m = scenarios.send_metrics(r, MIB)
    assert m["throughput_gbps"] == pytest.approx(256 * MIB / 0.5 / 1e9)
    assert m["messages_per_s"] == 512
    assert m["cpu_s_per_gib"] == pytest.approx(1.0)
    assert m["enter_calls_per_gib"] == pytest.approx(2048)
    assert m["rss_growth_kib"] == 4
    assert m["copies_per_message"] == 0
    assert (
        scenarios.send_metrics(SendResult(1, 10, 10, 1.0, 0.1), 10)["enter_calls_per_gib"] is None
    )


def test_report_schema_and_table() -> None:
    config = Config(scenarios=("c",), reps=1)
    samples = [_sample("trio", 100.0, 0), _sample("uvloop", 150.0, 0)]
    started = datetime.datetime.now(datetime.timezone.utc)
    sink_info = {"kind": "c", "detail": "C sink (csink.c)"}
    rep = report.build_report(config, ["trio", "uvloop"], [], samples, 2, started, ["x"], sink_info)
    rep = json.loads(json.dumps(rep))
    assert report.validate(rep) == []
    assert rep["sink"] == sink_info
    assert "sink: C sink (csink.c)" in report.format_summary(rep)
    assert rep["complete"] and rep["all_bytes_arrived"]
    assert rep["machine"]["cpu_count"] >= 1 and rep["features"]["strategy"]
    table = report.format_table(rep)
    assert "1.50x" in table and "req/s" in table
    broken = dict(rep)
    del broken["samples"]
    broken["machine"] = {}
    assert report.validate(broken) == ["missing key 'samples'"]
    rep["machine"] = {}
    assert "machine info lacks 'kernel'" in report.validate(rep)


def test_incomplete_report_is_flagged() -> None:
    config = Config(scenarios=("c",), reps=1)
    started = datetime.datetime.now(datetime.timezone.utc)
    rep = report.build_report(config, ["trio"], [], [_sample("trio", 1.0, 0)], 2, started, [])
    assert not rep["complete"]


def _send_to_sink(port: int, payload: bytes, times: int) -> int:
    with socket.create_connection(("127.0.0.1", port)) as conn:
        for _ in range(times):
            conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        ack = b""
        while len(ack) < sink.ACK_SIZE:
            data = conn.recv(sink.ACK_SIZE - len(ack))
            assert data, "sink closed without its count"
            ack += data
    return sink.decode_count(ack)


def test_sink_counts_every_byte() -> None:
    s = sink.Sink()
    thread = threading.Thread(target=s.serve_forever, daemon=True)
    thread.start()
    try:
        assert _send_to_sink(s.port, b"", 0) == 0
        assert _send_to_sink(s.port, b"q" * 1000, 1) == 1000
        assert _send_to_sink(s.port, b"z" * (3 * MIB + 7), 5) == 5 * (3 * MIB + 7)
    finally:
        s.close()
        thread.join(5)
    assert s.connections == 3 and s.total == 1000 + 5 * (3 * MIB + 7)


def test_c_sink_counts_every_byte_on_many_connections(tmp_path: Path) -> None:
    """The C sink answers each of 100 concurrent connections with its own
    count, keeps answering after peers that reset or vanish, and leaves no
    thread or descriptor behind."""
    choice = csink.choose_sink(tmp_path)
    if choice.kind != csink.C:
        pytest.skip(choice.detail)
    sizes = [1 + 997 * i for i in range(100)]
    counts: dict[int, int] = {}

    with sink.sink_process(choice) as port:

        def one(i: int) -> None:
            counts[i] = _send_to_sink(port, b"s" * sizes[i], 7)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(sizes))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for _ in range(20):
            conn = socket.create_connection(("127.0.0.1", port))
            conn.sendall(b"r" * 100_000)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            conn.close()
            conn = socket.create_connection(("127.0.0.1", port))
            conn.sendall(b"v")
            conn.shutdown(socket.SHUT_WR)
            conn.close()
        assert _send_to_sink(port, b"", 0) == 0
        assert _send_to_sink(port, b"z" * (3 * MIB + 7), 5) == 5 * (3 * MIB + 7)
    assert counts == {i: 7 * size for i, size in enumerate(sizes)}


def test_sink_falls_back_to_python_without_a_compiler(tmp_path: Path) -> None:
    choice = csink.choose_sink(tmp_path, compiler="no-such-compiler-here")
    assert choice.kind == csink.PYTHON and "not found" in choice.detail
    with sink.sink_process(choice) as port:
        assert _send_to_sink(port, b"p" * 5000, 3) == 15000


def test_count_encoding() -> None:
    assert sink.decode_count(sink.encode_count(2**40 + 3)) == 2**40 + 3
    with pytest.raises(ValueError):
        sink.decode_count(b"123")


def test_percentile() -> None:
    values = [float(v) for v in range(1, 101)]
    assert loadgen.percentile(values, 0.5) == 50.0
    assert loadgen.percentile(values, 0.99) == 99.0
    assert loadgen.percentile([], 0.5) == 0.0


def test_missing_compiler_is_reported(tmp_path: Path) -> None:
    with pytest.raises(csender.CompileError, match="not found"):
        csender.build(tmp_path, compiler="no-such-compiler-here")


def test_plan_respects_selection() -> None:
    cells = scenarios.plan(Config(scenarios=("d",)))
    assert len(cells) == 1 and isinstance(cells[0], scenarios.SendCell)
    assert cells[0].sizes == Config().sizes_cpu
    remote = scenarios.plan(Config(scenarios=("a", "c"), connect=("h", 1)))
    assert [c.scenario for c in remote] == ["a"]
    assert not scenarios.applies(scenarios.EchoCell("c", 4, 1.0), "c:send")
    assert not scenarios.applies(scenarios.SendCell("b", (4096,), 100, 1.0), "c:zc")


def test_many_streams_and_echo_measure_zc_auto() -> None:
    """Scenario b at 100 streams and the echo scenario c both run zc:auto."""
    config = Config(scenarios=("b", "c"))
    lineup = scenarios.resolve_contenders(config)
    assert "zc:auto" in lineup.names
    cells = scenarios.plan(config)
    many = [c for c in cells if isinstance(c, scenarios.SendCell) and c.scenario == "b"]
    echo = [c for c in cells if isinstance(c, scenarios.EchoCell) and c.scenario == "c"]
    assert [c.streams for c in many] == [100] and [c.clients for c in echo] == [100]
    assert all(scenarios.applies(c, "zc:auto") for c in [*many, *echo])
    assert scenarios.count_samples([*many, *echo], ["zc:auto"], 1) == len(Config().sizes_many) + 1


def test_callgrind_arithmetic() -> None:
    assert callgrind.parse_total("events: Ir\nsummary: 1234\ntotals: 1234\n") == 1234
    assert callgrind.parse_total("events: Ir\ntotals: 99\n") == 99
    with pytest.raises(ValueError):
        callgrind.parse_total("events: Ir\n")
    assert callgrind.per_call(1_000_000, 1_300_000, 100, 400) == 1000.0
    with pytest.raises(ValueError):
        callgrind.per_call(1, 2, 5, 5)
    # More calls, fewer instructions: the difference measures nothing.
    assert callgrind.per_call(1_300_000, 1_000_000, 100, 400) is None
    runs = callgrind.plan_runs(["trio"], ((4096, 10, 30), (MIB, 2, 6)))
    assert [(r.counts, r.measures) for r in runs] == [
        (((4096, 10), (MIB, 2)), None),
        (((4096, 30), (MIB, 2)), 4096),
        (((4096, 10), (MIB, 6)), MIB),
    ]


def test_callgrind_echo_counts_are_checked() -> None:
    assert callgrind._echo("50:200:600") == (50, 200, 600)
    for bad in ("50:200", "0:1:2", "5:3:3", "5:0:4", "a:b:c"):
        with pytest.raises(argparse.ArgumentTypeError):
            callgrind._echo(bad)
    args = callgrind.build_parser().parse_args([])
    assert args.echo == callgrind.DEFAULT_ECHO and not args.no_echo


@pytest.mark.parametrize("contender", ["trio", "zc:auto"])
def test_counted_echo_serves_the_clients_then_exits(contender: str) -> None:
    """The echo server callgrind counts, without valgrind: it answers every
    request of the clients with the same bytes and exits once they
    have all closed, reporting what it echoed."""
    job = {
        "contender": contender,
        "host": "127.0.0.1",
        "clients": 3,
        "arena_size": Config().arena_size,
        "slice_size": Config().slice_size,
    }
    with subprocess.Popen(
        [sys.executable, "-m", "trio_uring.bench.counted_echo", json.dumps(job)],
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        try:
            line = proc.stdout.readline()
            assert line.startswith("PORT ")
            callgrind.drive_echo(int(line.split()[1]), 3, 5, 1000)
            out, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0
    assert json.loads(out) == {"echoed": 3 * 5 * 1000}


def test_callgrind_table_says_which_count_measured_nothing() -> None:
    rep: dict[str, Any] = {
        "contenders": ["trio", "zc:auto"],
        "counts": [{"size": MIB, "n1": 40, "n2": 120}],
        "sink": {"detail": "C sink"},
        "results": [
            {"contender": "trio", "size": MIB, "instructions_per_send_all": None, "ratio": None},
            {
                "contender": "zc:auto",
                "size": MIB,
                "instructions_per_send_all": 48_700.0,
                "ratio": None,
            },
        ],
    }
    table = callgrind.format_table(rep)
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[4:] if line}
    assert rows["trio"] == [callgrind.UNSTABLE] and rows["zc:auto"] == ["48.7k"]
    assert table.endswith(callgrind.UNSTABLE_NOTE)
    rep["results"][0]["instructions_per_send_all"] = 67_600.0
    assert callgrind.UNSTABLE not in callgrind.format_table(rep)


def test_callgrind_without_valgrind_skips(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(callgrind.shutil, "which", lambda name: None)
    assert callgrind.main(["--out", str(tmp_path)]) == 0
    assert "valgrind not found" in capsys.readouterr().err
    assert not (tmp_path / callgrind.REPORT_NAME).exists()


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_callgrind_counts_instructions_per_send_all(tmp_path: Path) -> None:
    """Tiny counts, trio and zc:auto: every run completes, the longer run
    executes more instructions, and the table and JSON carry the result."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "trio_uring.bench.callgrind",
            "--contenders",
            "zc:auto",
            "--counts",
            "4096:5:25",
            "--echo",
            "3:5:25",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rep = json.loads((tmp_path / callgrind.REPORT_NAME).read_text())
    assert rep["schema"] == callgrind.SCHEMA and rep["errors"] == []
    assert rep["contenders"] == ["trio", "zc:auto"]
    assert rep["sink"]["kind"] == csink.choose_sink().kind
    by_name = {r["contender"]: r for r in rep["results"]}
    assert set(by_name) == {"trio", "zc:auto"}
    for r in by_name.values():
        assert (r["size"], r["n1"], r["n2"]) == (4096, 5, 25)
        assert r["ir_n2"] > r["ir_n1"] > 0
        assert r["instructions_per_send_all"] == (r["ir_n2"] - r["ir_n1"]) / 20
    assert by_name["trio"]["ratio"] == 1.0
    assert "zc:auto" in proc.stdout and "instructions per send_all" in proc.stdout
    assert rep["echo"] == {"clients": 3, "r1": 5, "r2": 25, "size": Config().echo_size}
    echo = {r["contender"]: r for r in rep["echo_results"]}
    assert set(echo) == {"trio", "zc:auto"}
    for r in echo.values():
        assert r["ir_r2"] > r["ir_r1"] > 0
        assert r["instructions_per_request"] == (r["ir_r2"] - r["ir_r1"]) / (3 * 20)
    assert echo["trio"]["ratio"] == 1.0
    assert "per echo request" in proc.stdout


def run_bench(out: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """``python -m trio_uring.bench --quick --reps 1 *args --out out``; the
    process and its report, which must have passed validation."""
    command = [sys.executable, "-m", "trio_uring.bench", "--quick", "--reps", "1"]
    proc = subprocess.run(
        [*command, *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rep = json.loads((out / cli.REPORT_NAME).read_text())
    assert report.validate(rep) == []
    return proc, rep


def test_quick_smoke_run(tmp_path: Path) -> None:
    """The whole pipeline end to end: every cell ran, every byte arrived."""
    out = tmp_path / "results"
    proc, rep = run_bench(out, "--scenarios", "smoke")
    assert rep["complete"] and rep["all_bytes_arrived"]
    assert rep["expected_samples"] == len(rep["samples"]) > 0
    assert "trio" in rep["contenders"] and any(n.startswith("zc:") for n in rep["contenders"])
    sends = [s for s in rep["samples"] if s["kind"] == "send"]
    assert {s["contender"] for s in sends} == set(rep["contenders"])
    for s in sends:
        assert s["raw"]["bytes_sent"] == s["raw"]["bytes_received"] > 0
    echoes = [s for s in rep["samples"] if s["kind"] == "echo"]
    assert echoes and all(s["raw"]["requests"] > 0 for s in echoes)
    assert "smoke" in proc.stdout and "trio (abs)" in proc.stdout
    expected_sink = csink.choose_sink().kind
    assert rep["sink"]["kind"] == expected_sink
    assert f"sink: {rep['sink']['detail']}" in proc.stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "chart skipped" in proc.stdout
    else:
        assert (out / cli.CHART_NAME).stat().st_size > 0


# -- scenario e: static files over HTTP ------------------------------------------

_WRK_OUTPUT = """Running 1s test @ http://127.0.0.1:1/16384.bin
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     5.00ms    1.00ms  30.00ms   90.00%
  Latency Distribution
     50%    4.50ms
     75%    5.10ms
     90%    6.00ms
     99%    1.20s
  4321 requests in 1.00s, 67.60MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:   4321.00
Transfer/sec:     67.60MB
"""


def test_parse_wrk() -> None:
    out = static.parse_wrk(_WRK_OUTPUT)
    assert out["requests"] == 4321 and out["requests_per_s"] == 4321.0
    assert out["p50_us"] == pytest.approx(4500.0)
    assert out["p99_us"] == pytest.approx(1.2e6)
    assert out["errors"] == 7
    with pytest.raises(ValueError, match="unreadable wrk output"):
        static.parse_wrk("wrk: connection refused")


def test_parse_target() -> None:
    buffer = bytearray(b"GET /a.bin HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\n")
    assert static.parse_target(buffer) == "/a.bin"
    assert static.parse_target(buffer) is None
    buffer += b"\r\n"
    assert static.parse_target(buffer) == "/b"
    with pytest.raises(ValueError):
        static.parse_target(bytearray(b"POST / HTTP/1.1\r\n\r\n"))


def test_scenario_e_skipped_without_wrk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(static, "find_wrk", lambda: None)
    config = Config(scenarios=("e",), contenders=("trio",))
    assert scenarios.plan(config) == []
    lineup = scenarios.resolve_contenders(config)
    assert {"contender": "scenario e", "reason": "wrk is not installed (apt-get install wrk)"} in (
        lineup.skipped
    )


def test_scenario_e_tiny_run(tmp_path: Path) -> None:
    """Every server of scenario e answers wrk with whole responses."""
    if static.find_wrk() is None:
        pytest.skip("wrk is not installed (apt-get install wrk)")
    proc, rep = run_bench(tmp_path / "results", "--scenarios", "e", "--no-chart")
    assert rep["complete"], [s["error"] for s in rep["samples"] if not s["ok"]]
    ran = {s["contender"] for s in rep["samples"]}
    assert {"trio", "zc:auto", "asyncio"} <= ran
    assert ran <= set(static.STATIC_CONTENDERS)
    for s in rep["samples"]:
        assert s["kind"] == "static" and s["raw"]["requests"] > 0 and s["raw"]["errors"] == 0
        assert s["metrics"]["server_cpu_s_per_gib"] is not None
    assert {s["param"] for s in rep["samples"]} == {"16KiB", "1MiB"}
    assert any(t["target"].startswith("static files") for t in rep["targets"])
    assert "srv CPU s/GiB" in proc.stdout


def test_scenario_f_tiny_run(tmp_path: Path) -> None:
    """Fan-out: every subscriber gets every message; trio_uring copies each
    message once in all, trio never in user space."""
    _, rep = run_bench(
        tmp_path / "results", "--scenarios", "f", "--contenders", "zc:auto,zc:copy", "--no-chart"
    )
    assert rep["complete"], [s["error"] for s in rep["samples"] if not s["ok"]]
    copies = {s["contender"]: s["metrics"]["copies_per_message"] for s in rep["samples"]}
    assert copies == {"trio": 0, "zc:auto": 1, "zc:copy": 1}
    for s in rep["samples"]:
        assert s["streams"] == 100 and s["raw"]["bytes_received"] == s["raw"]["bytes_sent"]
        # Zero-copy sends report their notifications; trio and the copied path have none.
        if s["contender"] == "zc:auto":
            assert s["raw"]["notifications"] >= s["raw"]["messages"] > 0
        else:
            assert s["raw"]["notifications"] == 0
