#!/usr/bin/env python3
"""Run every atheris harness in this directory for a bounded number of executions.

Usage: python fuzz/run_all.py [RUNS] [--max-time S]   (RUNS defaults to 100000 per harness)

Prints, per harness, the executions done, the seconds taken and whether it crashed
(also as a ``FIGURE fuzz/<harness>: ...`` line for scripts/reliability_table.py)
(an uncaught exception = a bug; libFuzzer leaves the input as ``crash-*`` in the
current directory). Exit status 1 if any harness crashed. Needs atheris importable
(see fuzz/README.md).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: Harnesses whose single execution is much costlier get fewer runs.
COST = {"fuzz_cni.py": 5, "fuzz_etcd_watch.py": 5}


def main(argv: list[str]) -> int:
    runs = int(argv[0]) if argv and argv[0].isdigit() else 100_000
    max_time = argv[argv.index("--max-time") + 1] if "--max-time" in argv else "600"
    failed = False
    out = sys.stdout
    out.write(f"{'harness':24} {'executions':>11} {'seconds':>8}  result\n")
    for harness in sorted(HERE.glob("fuzz_*.py")):
        n = max(runs // COST.get(harness.name, 1), 1)
        began = time.monotonic()
        proc = subprocess.run(
            [sys.executable, str(harness), f"-runs={n}", f"-max_total_time={max_time}"],
            capture_output=True,
            text=True,
            check=False,
        )
        seconds = time.monotonic() - began
        log = proc.stdout + proc.stderr
        done = re.search(r"Done (\d+) runs", log)
        executions = (
            int(done[1])
            if done
            else max((int(m) for m in re.findall(r"^#(\d+)", log, re.M)), default=0)
        )
        crashed = proc.returncode != 0 or "Uncaught Python exception" in log
        failed |= crashed
        result = "CRASH" if crashed else "ok, 0 crashes"
        out.write(f"{harness.name:24} {executions:>11} {seconds:>8.1f}  {result}\n")
        # For scripts/reliability_table.py, like the chaos tests' figures.
        out.write(
            f"FIGURE fuzz/{harness.stem}: executions={executions} crashes={int(crashed)} "
            f"seconds={seconds:.1f}\n"
        )
        if crashed:
            out.write("\n".join(log.splitlines()[-30:]) + "\n")
        out.flush()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
