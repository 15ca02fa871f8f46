"""Command line of ``python -m trio_uring.bench``.

python -m trio_uring.bench                         # scenarios a-d, several minutes
python -m trio_uring.bench --quick                 # about a minute
python -m trio_uring.bench --scenarios a,d --reps 7
python -m trio_uring.bench --sink 9000             # on the receiving host
python -m trio_uring.bench --connect HOST:9000     # on the sending host
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

from . import csink
from .chart import ChartUnavailable, write_chart
from .config import DEFAULT_SCENARIOS, SCENARIO_TITLES, SCENARIOS, Config
from .report import build_report, format_summary
from .scenarios import Progress, Runner, count_samples, plan, resolve_contenders
from .sink import run_sink

REPORT_NAME = "bench.json"
CHART_NAME = "bench.png"


def _scenarios(text: str) -> tuple[str, ...]:
    chosen = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown scenario {', '.join(unknown) or '(none)'}; choose from {', '.join(SCENARIOS)}"
        )
    return chosen


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    scenario_help = "; ".join(f"{k}: {v}" for k, v in SCENARIO_TITLES.items())
    parser = argparse.ArgumentParser(
        prog="python -m trio_uring.bench",
        description="Measure trio_uring against trio, asyncio, uvloop and a C sender.",
    )
    parser.add_argument(
        "--scenarios",
        type=_scenarios,
        default=DEFAULT_SCENARIOS,
        metavar="LIST",
        help=f"comma-separated ({scenario_help}); default {','.join(DEFAULT_SCENARIOS)}",
    )
    parser.add_argument("--quick", action="store_true", help="short samples: about a minute")
    parser.add_argument("--reps", type=_positive_int, help="repetitions per cell")
    parser.add_argument(
        "--out", type=Path, default=Path("bench-results"), help="directory for JSON and PNG"
    )
    parser.add_argument(
        "--contenders",
        metavar="LIST",
        help="comma-separated subset, e.g. trio,zc:vectored-fixed,uvloop (trio is always kept)",
    )
    parser.add_argument(
        "--connect", type=_host_port, metavar="HOST:PORT", help="send to a sink on another host"
    )
    parser.add_argument(
        "--sink", type=int, metavar="PORT", help="only run the sink, listening on PORT"
    )
    parser.add_argument("--sink-host", default="127.0.0.1", help="address the sink binds")
    parser.add_argument("--streams", type=_positive_int, help="streams in scenario b (100)")
    parser.add_argument("--clients", type=_positive_int, help="echo clients in scenario c (100)")
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG")
    parser.add_argument(
        "--cache-dir", type=Path, help="where the C sender and the C sink are compiled"
    )
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Config]:
    """Parse ``argv`` into the namespace (for ``--sink``) and a ``Config``."""
    args = build_parser().parse_args(argv)
    overrides: dict[str, object] = {
        "scenarios": args.scenarios,
        "out": args.out,
        "connect": args.connect,
        "chart": not args.no_chart,
        "cache_dir": args.cache_dir,
    }
    if args.reps is not None:
        overrides["reps"] = args.reps
    if args.streams is not None:
        overrides["streams"] = args.streams
    if args.clients is not None:
        overrides["clients"] = args.clients
    if args.contenders:
        chosen = [c.strip() for c in args.contenders.split(",") if c.strip()]
        overrides["contenders"] = tuple(dict.fromkeys(["trio", *chosen]))
    config = Config.quick_preset(**overrides) if args.quick else Config(**overrides)  # type: ignore[arg-type]
    return args, config


def run(config: Config, argv: list[str]) -> dict[str, object]:
    """Run the benchmark described by ``config``; write and return the report."""
    started = datetime.datetime.now(datetime.timezone.utc)
    progress = Progress(0)
    lineup = resolve_contenders(config)
    for s in lineup.skipped:
        progress.note(f"skipping {s['contender']}: {s['reason']}")
    if lineup.sink is not None and lineup.sink.kind != csink.C:
        progress.note(f"sink: {lineup.sink.detail}")
    if config.connect is not None and "c" in config.scenarios:
        progress.note("skipping scenario c with --connect: the echo servers run locally")
    cells = plan(config)
    expected = count_samples(cells, lineup.names, config.reps)
    progress.total = expected
    samples = Runner(config, lineup, progress).run(cells)
    if lineup.sink is not None:
        sink = lineup.sink.as_dict()
    else:
        sink = {"kind": "remote", "detail": "the sink of another host (--connect)"}
    report = build_report(
        config, lineup.names, lineup.skipped, samples, expected, started, argv, sink
    )
    config.out.mkdir(parents=True, exist_ok=True)
    json_path = config.out / REPORT_NAME
    json_path.write_text(json.dumps(report, indent=1))
    print(format_summary(report))
    print(f"\nraw samples and machine info: {json_path}")
    if config.chart:
        try:
            print(f"chart: {write_chart(report, config.out / CHART_NAME)}")
        except ChartUnavailable as exc:
            print(f"chart skipped: {exc}")
    return report


def serve_sink(port: int, host: str, cache_dir: Path | None) -> None:
    """``--sink``: run the sink in the foreground, the C one where it builds,
    so that a two-host run measures against the same receiver as a local one."""
    choice = csink.choose_sink(cache_dir)
    print(choice.detail, file=sys.stderr, flush=True)
    if choice.kind == csink.C:
        command = choice.command(host, port, verbose=True)
        os.execv(command[0], command)
    run_sink(port, host, verbose=True)


def main(argv: list[str] | None = None) -> int:
    raw_argv = sys.argv[1:] if argv is None else argv
    args, config = parse_args(raw_argv)
    if args.sink is not None:
        serve_sink(args.sink, args.sink_host, args.cache_dir)
        return 0
    report = run(config, ["python", "-m", "trio_uring.bench", *raw_argv])
    return 0 if report["complete"] else 1
