"""The PNG chart: each contender's median as a ratio to trio, per cell.

Ratios rather than absolute values so that panels with GB/s, messages/s and
microseconds share one reading: above 1.0 is more than trio (better for
throughput, worse for latency and CPU; each panel's title says which).
Error bars span the repetitions' min and max.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import contenders
from .report import METRICS, param_order

#: (scenario, metric) panels, in order; those without data are left out.
PANELS = (
    ("a", "throughput_gbps"),
    ("b", "messages_per_s"),
    ("c", "requests_per_s"),
    ("c", "p99_us"),
    ("d", "cpu_s_per_gib"),
    ("e", "requests_per_s"),
    ("e", "server_cpu_s_per_gib"),
    ("smoke", "throughput_gbps"),
    ("smoke", "requests_per_s"),
)
TITLES = {
    "a": "one stream",
    "b": "concurrent streams",
    "c": "echo server",
    "d": "sender CPU per GiB",
    "e": "static files over HTTP",
    "smoke": "smoke",
}


class ChartUnavailable(RuntimeError):
    """matplotlib is not installed (it is in the ``bench`` extra)."""


def write_chart(report: dict[str, Any], path: Path) -> Path:
    """Draw the report's ratios into ``path`` (PNG); return the path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ChartUnavailable(
            "matplotlib is not installed; pip install 'trio_uring[bench]' for the chart"
        ) from exc
    results = report["results"]
    panels = [
        (sc, m)
        for sc, m in PANELS
        if any(r["scenario"] == sc and r["metric"] == m for r in results)
    ]
    names = report["contenders"]
    cols = 2 if len(panels) > 1 else 1
    rows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 3.6 * rows), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (scenario, metric) in zip(axes.flat, panels, strict=False):
        cells = [r for r in results if r["scenario"] == scenario and r["metric"] == metric]
        params = sorted({r["param"] for r in cells}, key=param_order)
        width = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            xs, ys, lo, hi = [], [], [], []
            for j, param in enumerate(params):
                r = next((c for c in cells if c["contender"] == name and c["param"] == param), None)
                if r is None or r["ratio"] is None:
                    continue
                xs.append(j + (i - (len(names) - 1) / 2) * width)
                ys.append(r["ratio"])
                lo.append(max(0.0, r["ratio"] - r["ratio_min"]))
                hi.append(max(0.0, r["ratio_max"] - r["ratio"]))
            if xs:
                ax.bar(
                    xs,
                    ys,
                    width,
                    yerr=[lo, hi],
                    label=name,
                    color=colors(i % 10),
                    capsize=2,
                    error_kw={"elinewidth": 0.8},
                )
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(params)))
        ax.set_xticklabels(params)
        m = METRICS[metric]
        better = "higher is better" if m.higher_is_better else "lower is better"
        ax.set_title(f"{TITLES[scenario]}: {m.unit} ({better})", fontsize=10)
        ax.set_ylabel(f"ratio to {contenders.BASELINE}")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8)
    machine = report["machine"]
    fig.suptitle(
        f"trio_uring bench: {machine['kernel']}, {machine['cpu_count']} CPUs, "
        f"ratios to trio SocketStream (median, min-max)",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
