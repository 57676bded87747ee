"""Turn benchmark output into PNG charts for docs/performance.md.

    .venv/bin/python bench/dataplane.py ... > dataplane.log
    .venv/bin/python bench/scale.py --peers N ... > scale-N.log      # one per peer count
    .venv/bin/python bench/report.py --out docs/img dataplane.log scale-*.log

Reads the text the benchmarks print (each file is recognised by its content):

* bench/dataplane.py: every ``round R/N <config> <test> <value> Gbit/s|kpps`` line; the
  median per configuration and test is charted as a ratio to the underlay of the same
  run, grouped as the underlay, the hand-made twins, Loden's agents and the udp
  references (the naive Python forwarder, flannel's C proxy design) ->
  ``perf-dataplane-<test>.png``;
* bench/scale.py: the result table (``peer leases in etcd``, cold start, no-change
  resync, RSS, new-lease latency), one file per peer count -> ``perf-scale.png`` with one
  curve per backend and store.

Needs matplotlib (``pip install -e '.[pictures]'``).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROUND = re.compile(
    r"round \d+/\d+\s+(?P<config>\S+)\s+(?P<test>tcp1|tcp4|udp64)\s+(?P<value>[\d.]+)\s+"
    r"(?P<unit>Gbit/s|kpps)"
)
TEST_TITLES = {
    "tcp1": "pod to pod TCP, 1 stream",
    "tcp4": "pod to pod TCP, 4 streams",
    "udp64": "pod to pod 64-byte UDP, packets/s",
}
#: Scale-table rows charted, with the axis label and the figure's name for each.
SCALE_ROWS = {
    "(a) agent start -> all entries in kernel, s": "cold start: agent start to all routes (s)",
    "(b) no-change resync, median of passes, s": "no-change resync (s)",
    "(c) agent VmRSS after cold start, MB": "agent RSS after cold start (MB)",
    "    p50, ms": "new lease to route, p50 (ms)",
}


@dataclass
class DataplaneRun:
    #: test -> config -> samples
    samples: dict[str, dict[str, list[float]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list))
    )


@dataclass
class ScalePoint:
    peers: int
    #: column (backend / store) -> row label -> value
    values: dict[str, dict[str, float]]


def parse_dataplane(text: str) -> DataplaneRun | None:
    run = DataplaneRun()
    for match in ROUND.finditer(text):
        run.samples[match["test"]][match["config"]].append(float(match["value"]))
    return run if run.samples else None


def parse_scale(text: str) -> ScalePoint | None:
    lines = text.splitlines()
    header = next((line for line in lines if line.startswith("metric ")), None)
    # "peer leases in etcd" or "peer leases (etcd) / Nodes (kube)": the count ends the line
    peers_line = next((line for line in lines if line.startswith("peer leases")), None)
    if header is None or peers_line is None:
        return None
    columns = header.split()[2:]  # "metric target <kind> <kind> ..."
    peers = int(peers_line.split()[-1])
    values: dict[str, dict[str, float]] = {c: {} for c in columns}
    first_p50 = True
    for line in lines:
        for label in SCALE_ROWS:
            if not line.startswith(label):
                continue
            if label == "    p50, ms":  # the closed-loop one (the first of the p50 rows)
                if not first_p50:
                    continue
                first_p50 = False
            tokens: list[str] = []
            for token in line[len(label) :].split():
                if token == "!" and tokens:  # a missed target: "7.19 !" is one cell
                    tokens[-1] += token
                else:
                    tokens.append(token)
            cells = tokens[-len(columns) :]
            for column, cell in zip(columns, cells, strict=True):
                try:
                    values[column][label] = float(cell.rstrip("!").strip())
                except ValueError:
                    pass
    return ScalePoint(peers, values)


BACKEND_ORDER = ("host-gw", "vxlan", "udp", "wireguard")


def position(config: str) -> tuple[int, int, str]:
    """Underlay first, then per backend its hand-made twin above Loden's agent, the udp
    references (naive-udp, cproxy-udp) after Loden's udp."""
    if config == "underlay":
        return (-1, 0, config)
    base = config.split("-", 1)[1] if "-" in config else config
    if config in ("naive-udp", "cproxy-udp"):
        base = "udp"
    backend = next((i for i, b in enumerate(BACKEND_ORDER) if base.startswith(b)), 99)
    return (backend, family(config)[0], config)


def family(config: str) -> tuple[int, str]:
    if config == "underlay":
        return 0, "#607d8b"
    if config.startswith("hand-"):
        return 1, "#90a4ae"
    if config.startswith("loden-"):
        return 2, "#2e7d32"
    return 3, "#ef6c00"  # naive-udp, cproxy-udp: the udp references


def chart_dataplane(run: DataplaneRun, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[Path] = []
    for test, by_config in run.samples.items():
        medians = {c: statistics.median(v) for c, v in by_config.items()}
        base = medians.get("underlay")
        configs = sorted(medians, key=position)
        values = [medians[c] / base if base else medians[c] for c in configs]
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(configs) + 1.4))
        bars = ax.barh(configs, values, color=[family(c)[1] for c in configs])
        ax.invert_yaxis()
        unit = "Gbit/s" if test != "udp64" else "kpps"
        for bar, config in zip(bars, configs, strict=True):
            ax.text(
                bar.get_width(),
                bar.get_y() + bar.get_height() / 2,
                f" {medians[config]:.2f} {unit}",
                va="center",
                fontsize=9,
            )
        ax.set_xlabel("ratio to the underlay (same run)" if base else unit)
        rounds = max(len(v) for v in by_config.values())
        ax.set_title(f"{TEST_TITLES[test]}: median of {rounds} round(s)")
        ax.set_xlim(0, max(values) * 1.3)
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        path = out / f"perf-dataplane-{test}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made


def chart_scale(points: list[ScalePoint], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted(points, key=lambda p: p.peers)
    columns = sorted({c for p in points for c in p.values})
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (label, title) in zip(axes.flat, SCALE_ROWS.items(), strict=True):
        for column in columns:
            xs = [p.peers for p in points if label in p.values.get(column, {})]
            ys = [p.values[column][label] for p in points if label in p.values.get(column, {})]
            if xs:
                ax.plot(xs, ys, marker="o", label=column)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("peer leases")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=9)
    fig.suptitle("one agent against N peer leases (bench/scale.py)")
    fig.tight_layout()
    path = out / "perf-scale.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("logs", nargs="+", type=Path, help="outputs of bench/*.py")
    parser.add_argument("--out", type=Path, default=Path("docs/img"), help="PNG directory")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs: list[DataplaneRun] = []
    points: list[ScalePoint] = []
    for log in args.logs:
        text = log.read_text(errors="replace")
        if (run := parse_dataplane(text)) is not None:
            runs.append(run)
        elif (point := parse_scale(text)) is not None:
            points.append(point)
        else:
            print(f"{log}: neither bench/dataplane.py nor bench/scale.py output", file=sys.stderr)
            return 2
    made: list[Path] = []
    for run in runs[-1:]:  # the newest dataplane run (charts compare within one run)
        made += chart_dataplane(run, args.out)
    if points:
        made += chart_scale(points, args.out)
    for path in made:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
