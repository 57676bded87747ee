"""bench/report.py reads the benchmarks' own text and draws PNG charts from it."""

from __future__ import annotations

import importlib.util
import struct
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("matplotlib")

DATAPLANE = """command: x; load average 1.00
  built underlay in 0.1 s: eth0
  round 1/2 underlay          tcp1   10.00 Gbit/s (retransmits 0)
  round 1/2 hand-vxlan        tcp1    8.00 Gbit/s (retransmits 0)
  round 1/2 loden-vxlan       tcp1    7.50 Gbit/s (retransmits 1)
  round 1/2 naive-udp         tcp1    0.40 Gbit/s (retransmits 9)
  round 2/2 underlay          tcp1   12.00 Gbit/s (retransmits 0)
  round 2/2 hand-vxlan        tcp1    8.40 Gbit/s (retransmits 0)
  round 2/2 loden-vxlan       tcp1    8.50 Gbit/s (retransmits 0)
  round 2/2 naive-udp         tcp1    0.60 Gbit/s (retransmits 3)
  round 1/2 underlay          udp64  900.0 kpps
  round 1/2 loden-vxlan       udp64  500.0 kpps
"""


def scale_log(peers: int, cold: float) -> str:
    return f"""command: x
metric                                          target      vxlan
peer leases (etcd) / Nodes (kube)                           {peers}
(a) agent start -> all entries in kernel, s        <= 3      {cold}{" !" if cold > 3 else ""}
(b) no-change resync, median of passes, s        <= 0.5      0.05
(c) agent VmRSS after cold start, MB             <= 100      61.2
(d) new lease -> route in kernel, closed loop: write, wait for the route, next
    p50, ms                                       <= 50      12.5
(d') new lease -> route in kernel, open loop: Poisson writes, mean gap 50 ms
    p50, ms                                       <= 50      99
"""


def load() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "bench" / "report.py"
    spec = importlib.util.spec_from_file_location("bench_report", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    return int(width), int(height)


def test_parsers_take_medians_and_rows() -> None:
    report = load()
    run = report.parse_dataplane(DATAPLANE)
    assert run.samples["tcp1"]["loden-vxlan"] == [7.5, 8.5]
    assert report.parse_scale(DATAPLANE) is None
    assert (
        report.parse_scale(scale_log(5000, 7.5)).values["vxlan"][
            "(a) agent start -> all entries in kernel, s"
        ]
        == 7.5
    )  # "7.5 !": a missed target is still the value
    point = report.parse_scale(scale_log(1000, 1.25))
    assert point.peers == 1000
    values = point.values["vxlan"]
    assert values["(a) agent start -> all entries in kernel, s"] == 1.25
    assert values["    p50, ms"] == 12.5  # the closed-loop p50, not the open-loop one


def test_charts_are_written(tmp_path: Path) -> None:
    report = load()
    logs = []
    for name, text in [("dp.log", DATAPLANE)] + [
        (f"s{p}.log", scale_log(p, p / 2000)) for p in (100, 1000, 5000)
    ]:
        (tmp_path / name).write_text(text)
        logs.append(str(tmp_path / name))
    out = tmp_path / "img"
    assert report.main(["--out", str(out), *logs]) == 0
    made = sorted(p.name for p in out.iterdir())
    assert made == ["perf-dataplane-tcp1.png", "perf-dataplane-udp64.png", "perf-scale.png"]
    assert all(png_size(out / name)[0] > 600 for name in made)
    (tmp_path / "junk.log").write_text("nothing here")
    assert report.main(["--out", str(out), str(tmp_path / "junk.log")]) == 2
