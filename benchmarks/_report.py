"""Shared by the benchmark scripts: workers in fresh processes, their RSS, ratios judged
against targets, and the JSON report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def rss_peak() -> int:
    """Peak RSS since :func:`rss_now` reset the kernel's mark (VmHWM), in bytes.

    ``ru_maxrss`` would count the driver a worker was started from: exec keeps the
    old memory's high-water mark.
    """
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))


def rss_now() -> int:
    """RSS now, in bytes; also resets the peak mark that :func:`rss_peak` reads."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run_worker(
    script: str | Path,
    name: str,
    *args: object,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``python script --worker name *args`` in a fresh process; return its last JSON line.

    A fresh process per measurement: its peak RSS is its own, and no cache of an
    earlier method is warm. ``stdin`` is written to the worker's standard input,
    ``env`` replaces its environment.
    """
    proc = subprocess.run(
        [sys.executable, str(script), "--worker", name, *map(str, args)],
        input=stdin, capture_output=True, text=True, env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def judge(
    ratios: dict[str, float], targets: dict[str, tuple[str, float]], digits: int = 3
) -> dict[str, bool | None]:
    """Print the ratios as a Markdown table with their targets; return met/not met per ratio.

    ``targets`` maps a ratio's name to ``(">=" or "<=", bound)``; ratios without a target are
    printed for information (None).
    """
    print("\n| ratio | value | target | met |")
    print("|---|---:|---|---|")
    verdicts: dict[str, bool | None] = {}
    for key, value in ratios.items():
        op, bound = targets.get(key, ("", None))
        met = None if bound is None else (value >= bound if op == ">=" else value <= bound)
        verdicts[key] = met
        print(f"| {key} | {value:.{digits}f} | {op} {bound if bound is not None else ''} | "
              f"{'' if met is None else ('yes' if met else 'NO')} |")
    return verdicts


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write the benchmark's JSON report (creating its folder) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {path}")
