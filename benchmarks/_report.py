"""What every benchmark script ends with: ratios judged against targets, and the JSON report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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
