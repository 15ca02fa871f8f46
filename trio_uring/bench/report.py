"""Turn raw samples into results: medians, spreads, ratios, targets, JSON.

Every figure is reported as the median of its repetitions with the spread
(min and max), and as a ratio to trio's ``SocketStream`` measured in the
same run: absolute numbers on a shared two-core machine move with whatever
else runs, ratios from one run move much less.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import statistics
import sys
from collections.abc import Iterable
from importlib import metadata
from typing import Any

import trio_uring

from . import contenders
from .config import SCENARIO_TITLES, Config

SCHEMA = "trio_uring.bench/1"


@dataclasses.dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    higher_is_better: bool
    scale: float = 1.0


METRICS = {
    m.name: m
    for m in (
        Metric("throughput_gbps", "GB/s", True),
        Metric("messages_per_s", "msg/s", True),
        Metric("cpu_s_per_gib", "CPU s/GiB", False),
        Metric("enter_calls_per_gib", "enter/GiB", False),
        Metric("rss_growth_kib", "RSS KiB", False),
        Metric("requests_per_s", "req/s", True),
        Metric("p50_us", "p50 us", False),
        Metric("p99_us", "p99 us", False),
        Metric("server_cpu_us_per_request", "srv CPU us/req", False),
        Metric("server_cpu_s_per_gib", "srv CPU s/GiB", False),
        Metric("copies_per_message", "copies/msg", False),
    )
}

#: Table rows: (row scenario, scenario whose samples it reads, metrics).
#: Scenario d is a view of the one-stream samples.
ROWS = (
    ("a", "a", ("throughput_gbps", "messages_per_s")),
    ("b", "b", ("messages_per_s", "throughput_gbps")),
    ("c", "c", ("requests_per_s", "p50_us", "p99_us", "server_cpu_us_per_request")),
    ("d", "a", ("cpu_s_per_gib", "enter_calls_per_gib")),
    ("e", "e", ("requests_per_s", "p99_us", "server_cpu_s_per_gib")),
    ("f", "f", ("messages_per_s", "cpu_s_per_gib", "copies_per_message")),
    ("smoke", "smoke", ("throughput_gbps", "requests_per_s", "p99_us")),
)


def ratio(value: float, baseline: float) -> float | None:
    """``value / baseline``; None when the baseline is missing or zero."""
    if not baseline:
        return None
    return value / baseline


def aggregate(samples: Iterable[dict[str, Any]], scenarios: Iterable[str]) -> list[dict[str, Any]]:
    """One result per (scenario, parameter, metric, contender) of the
    selected scenarios: median, min, max over the successful repetitions,
    and the ratio of the median to the baseline contender's median."""
    chosen = set(scenarios)
    samples = [s for s in samples if s["ok"]]
    results: list[dict[str, Any]] = []
    for row, source, metric_names in ROWS:
        if row not in chosen:
            continue
        groups: dict[tuple[str, str, str], list[float]] = {}
        for s in samples:
            if s["scenario"] != source:
                continue
            for metric in metric_names:
                value = s["metrics"].get(metric)
                if value is not None:
                    groups.setdefault((s["param"], metric, s["contender"]), []).append(value)
        medians = {key: statistics.median(values) for key, values in groups.items()}
        for (param, metric, name), values in groups.items():
            median = medians[(param, metric, name)]
            base = medians.get((param, metric, contenders.BASELINE), 0.0)
            results.append(
                {
                    "scenario": row,
                    "param": param,
                    "metric": metric,
                    "unit": METRICS[metric].unit,
                    "higher_is_better": METRICS[metric].higher_is_better,
                    "contender": name,
                    "n": len(values),
                    "median": median,
                    "min": min(values),
                    "max": max(values),
                    "ratio": ratio(median, base),
                    "ratio_min": ratio(min(values), base),
                    "ratio_max": ratio(max(values), base),
                }
            )
    return results


def find(
    results: list[dict[str, Any]], scenario: str, param: str | None, metric: str, contender: str
) -> dict[str, Any] | None:
    for r in results:
        if (
            r["scenario"] == scenario
            and (param is None or r["param"] == param)
            and r["metric"] == metric
            and r["contender"] == contender
        ):
            return r
    return None


#: The issue's targets: (text, scenario, param, metric, compare-to, op, threshold).
TARGETS = (
    ("one stream, 4 KiB messages/s >= 2.5x trio", "a", "4KiB", "messages_per_s", "trio", ">=", 2.5),
    (
        "one stream, 4 KiB messages/s >= 1.0x uvloop",
        "a",
        "4KiB",
        "messages_per_s",
        "uvloop",
        ">=",
        1.0,
    ),
    ("one stream, 64 KiB GB/s >= 1.5x trio", "a", "64KiB", "throughput_gbps", "trio", ">=", 1.5),
    ("one stream, 1 MiB GB/s >= 1.3x trio", "a", "1MiB", "throughput_gbps", "trio", ">=", 1.3),
    ("one stream, 16 MiB GB/s >= 1.3x trio", "a", "16MiB", "throughput_gbps", "trio", ">=", 1.3),
    ("100 streams, 4 KiB msg/s >= 2.5x trio", "b", "4KiB", "messages_per_s", "trio", ">=", 2.5),
    ("100 streams, 64 KiB msg/s >= 1.5x trio", "b", "64KiB", "messages_per_s", "trio", ">=", 1.5),
    ("echo, 100 clients, requests/s >= 1.5x trio", "c", None, "requests_per_s", "trio", ">=", 1.5),
    ("echo, 100 clients, p99 <= 0.8x trio", "c", None, "p99_us", "trio", "<=", 0.8),
    (
        "echo, server CPU per request <= 0.7x trio",
        "c",
        None,
        "server_cpu_us_per_request",
        "trio",
        "<=",
        0.7,
    ),
    ("sender CPU s/GiB at 4 KiB <= 0.4x trio", "d", "4KiB", "cpu_s_per_gib", "trio", "<=", 0.4),
    ("sender CPU s/GiB at 1 MiB <= 0.8x trio", "d", "1MiB", "cpu_s_per_gib", "trio", "<=", 0.8),
    (
        "static files, 1 MiB, requests/s >= 1.5x trio",
        "e",
        "1MiB",
        "requests_per_s",
        "trio",
        ">=",
        1.5,
    ),
    (
        "static files, 16 KiB, requests/s >= 1.0x trio",
        "e",
        "16KiB",
        "requests_per_s",
        "trio",
        ">=",
        1.0,
    ),
    ("static files, 1 MiB, p99 no worse than trio", "e", "1MiB", "p99_us", "trio", "<=", 1.0),
    ("static files, 16 KiB, p99 no worse than trio", "e", "16KiB", "p99_us", "trio", "<=", 1.0),
    ("fan-out, publisher CPU s/GiB <= 0.5x trio", "f", "64KiB", "cpu_s_per_gib", "trio", "<=", 0.5),
)
#: RSS may grow by less than this over 10**6 sends.
RSS_BUDGET_KIB = 5 * 1024
RSS_SENDS = 10**6


def evaluate_targets(results: list[dict[str, Any]], contender: str) -> list[dict[str, Any]]:
    """Each target of the issue for ``contender``: the measured ratio and
    whether it is met (None when this run did not measure it)."""
    out = []
    for text, scenario, param, metric, other, op, threshold in TARGETS:
        mine = find(results, scenario, param, metric, contender)
        theirs = find(results, scenario, param, metric, other)
        value = ratio(mine["median"], theirs["median"]) if mine and theirs else None
        met = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
        out.append(
            {
                "target": text,
                "contender": contender,
                "versus": other,
                "ratio": value,
                "op": op,
                "threshold": threshold,
                "met": met,
            }
        )
    return out


def evaluate_rss(samples: list[dict[str, Any]], contender: str) -> dict[str, Any]:
    """RSS growth of ``contender``'s one-stream 4 KiB samples, scaled to 10**6
    sends (the samples are shorter; growth is extrapolated linearly)."""
    growth = messages = 0
    for s in samples:
        if s["ok"] and s["contender"] == contender and s["scenario"] == "a" and s["raw"]:
            if s["metrics"].get("rss_growth_kib") is not None and s["size"] == 4096:
                growth += max(0, s["raw"]["rss_end_kib"] - s["raw"]["rss_start_kib"])
                messages += s["raw"]["messages"]
    per_million = growth / messages * RSS_SENDS if messages else None
    return {
        "target": "RSS grows < 5 MiB over 10^6 sends (4 KiB, extrapolated)",
        "contender": contender,
        "sends_measured": messages,
        "rss_growth_kib": growth,
        "kib_per_million_sends": per_million,
        "met": None if per_million is None else per_million < RSS_BUDGET_KIB,
    }


def machine_info() -> dict[str, Any]:
    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {
        "platform": platform.platform(),
        "system": platform.system(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "python": sys.version.split()[0],
        "trio_uring": trio_uring.__version__,
        "trio": version("trio"),
        "uvloop": version("uvloop"),
    }


def build_report(
    config: Config,
    names: list[str],
    skipped: list[dict[str, str]],
    samples: list[dict[str, Any]],
    expected_samples: int,
    started: datetime.datetime,
    argv: list[str],
    sink: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The report of a run; ``sink`` says which receiver the senders used
    (``csink.SinkChoice.as_dict``), since it changes every send figure."""
    results = aggregate(samples, config.scenarios)
    zc = "zc:auto"
    finished = datetime.datetime.now(datetime.timezone.utc)
    sends = [s for s in samples if s["kind"] == "send"]
    return {
        "schema": SCHEMA,
        "command": argv,
        "started_at": started.isoformat(),
        "finished_at": finished.isoformat(),
        "duration_s": (finished - started).total_seconds(),
        "machine": machine_info(),
        "features": trio_uring.features().as_dict(),
        "config": config.as_dict(),
        "baseline": contenders.BASELINE,
        "contenders": names,
        "sink": sink or {"kind": "unknown", "detail": "not recorded"},
        "skipped": skipped,
        "expected_samples": expected_samples,
        "complete": len(samples) == expected_samples and all(s["ok"] for s in samples),
        "all_bytes_arrived": all(
            s["ok"] and s["raw"]["bytes_sent"] == s["raw"]["bytes_received"] for s in sends
        ),
        "samples": samples,
        "results": results,
        "targets": evaluate_targets(results, zc) if zc in names else [],
        "rss": evaluate_rss(samples, zc),
    }


_REQUIRED = {
    "schema": str,
    "command": list,
    "started_at": str,
    "finished_at": str,
    "duration_s": float,
    "machine": dict,
    "features": dict,
    "config": dict,
    "baseline": str,
    "contenders": list,
    "sink": dict,
    "skipped": list,
    "expected_samples": int,
    "complete": bool,
    "all_bytes_arrived": bool,
    "samples": list,
    "results": list,
    "targets": list,
    "rss": dict,
}
_SAMPLE_KEYS = (
    "scenario",
    "kind",
    "contender",
    "param",
    "size",
    "rep",
    "ok",
    "error",
    "raw",
    "metrics",
)
_RESULT_KEYS = (
    "scenario",
    "param",
    "metric",
    "unit",
    "higher_is_better",
    "contender",
    "n",
    "median",
    "min",
    "max",
    "ratio",
    "ratio_min",
    "ratio_max",
)


def validate(report: dict[str, Any]) -> list[str]:
    """Problems with ``report``'s shape (empty when it follows the schema).

    Kept by hand rather than with a schema library so that the bench needs
    nothing beyond the package's own dependencies to check its output.
    """
    problems = []
    for key, kind in _REQUIRED.items():
        if key not in report:
            problems.append(f"missing key {key!r}")
        elif not isinstance(report[key], kind):
            problems.append(f"{key!r} is {type(report[key]).__name__}, not {kind.__name__}")
    if problems:
        return problems
    if report["schema"] != SCHEMA:
        problems.append(f"schema is {report['schema']!r}, not {SCHEMA!r}")
    for key in ("platform", "kernel", "cpu_count"):
        if key not in report["machine"]:
            problems.append(f"machine info lacks {key!r}")
    if "kind" not in report["sink"]:
        problems.append("sink lacks 'kind'")
    if "strategy" not in report["features"]:
        problems.append("features lacks 'strategy'")
    for i, s in enumerate(report["samples"]):
        missing = [k for k in _SAMPLE_KEYS if k not in s]
        if missing:
            problems.append(f"sample {i} lacks {missing}")
        elif s["ok"] and s["kind"] == "send" and s["raw"] is None:
            problems.append(f"sample {i} is ok but has no raw measurement")
    for i, r in enumerate(report["results"]):
        missing = [k for k in _RESULT_KEYS if k not in r]
        if missing:
            problems.append(f"result {i} lacks {missing}")
    return problems


# -- the table ------------------------------------------------------------------


def _human(value: float) -> str:
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}"


def param_order(param: str) -> int:
    """Sort key of a parameter label: ``4KiB`` < ``64KiB`` < ``1MiB``."""
    digits = int("".join(c for c in param if c.isdigit()) or 0)
    return digits * (1024 if "MiB" in param else 1)


def format_table(report: dict[str, Any]) -> str:
    """Ratio of each contender's median to trio's, with the spread (max-min
    over median) of that contender's repetitions; trio's own column gives
    the absolute median."""
    results = report["results"]
    names = [n for n in report["contenders"] if n != contenders.BASELINE]
    rows: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
    for r in results:
        rows.setdefault((r["scenario"], r["param"], r["metric"]), {})[r["contender"]] = r
    order = {row: i for i, (row, _, _) in enumerate(ROWS)}
    keys = sorted(
        rows,
        key=lambda k: (
            order.get(k[0], 99),
            param_order(k[1]),
            [m for _, _, ms in ROWS for m in ms].index(k[2]),
        ),
    )
    header = ["scenario", "param", "metric", "trio (abs)", *names]
    lines = [header]
    for key in keys:
        cells = rows[key]
        base = cells.get(contenders.BASELINE)
        line = [key[0], key[1], METRICS[key[2]].unit]
        line.append(_human(base["median"]) if base else "-")
        for name in names:
            r = cells.get(name)
            if r is None:
                line.append("-")
            elif r["ratio"] is None:
                line.append(_human(r["median"]))
            else:
                spread = (r["max"] - r["min"]) / r["median"] * 100 if r["median"] else 0.0
                line.append(f"{r['ratio']:.2f}x ±{spread / 2:.0f}%")
        lines.append(line)
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = [
        "  ".join(
            cell.rjust(w) if i >= 3 else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def format_targets(report: dict[str, Any]) -> str:
    lines = []
    for t in report["targets"]:
        if t["met"] is None:
            continue
        verdict = "met" if t["met"] else "MISSED"
        lines.append(
            f"  {verdict:>6}  {t['target']}  [{t['contender']}: {t['ratio']:.2f}x vs {t['versus']}]"
        )
    rss = report["rss"]
    if rss["met"] is not None:
        lines.append(
            f"  {'met' if rss['met'] else 'MISSED':>6}  {rss['target']}  "
            f"[{rss['contender']}: {rss['kib_per_million_sends']:.0f} KiB per 10^6 sends, "
            f"{rss['sends_measured']} sends measured]"
        )
    return "\n".join(lines)


def format_summary(report: dict[str, Any]) -> str:
    parts = []
    for scenario in report["config"]["scenarios"]:
        parts.append(f"{scenario}: {SCENARIO_TITLES[scenario]}")
    parts.append(f"sink: {report['sink']['detail']}")
    parts.append(
        "cells: median ratio to trio's median; ±: half the min-max range of the repetitions, "
        "in % of the median"
    )
    text = "\n".join(parts) + "\n\n" + format_table(report)
    targets = format_targets(report)
    if targets:
        text += "\n\ntargets:\n" + targets
    for s in report["skipped"]:
        text += f"\nskipped {s['contender']}: {s['reason']}"
    failed = [s for s in report["samples"] if not s["ok"]]
    if failed:
        text += f"\n{len(failed)} samples FAILED; see 'error' in the JSON"
    return text
