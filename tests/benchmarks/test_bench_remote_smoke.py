"""The remote benchmark runs end to end on a small file (its figures are not checked here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_remote.py"


@pytest.mark.slow
def test_bench_remote_quick(tmp_path):
    out = tmp_path / "remote.json"
    subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--latency", "0.005", "--data",
         str(tmp_path / "data"), "--out", str(out)],
        check=True, capture_output=True, text=True,
    )
    report = json.loads(out.read_text())
    assert {"neurocube_first", "neurocube_indexed", "neurocube_subset", "download_nibabel",
            "nibabel_stream", "transfer_limit"} <= set(report["results"])
    assert all(v["values_ok"] is not False for v in report["results"].values())
    assert "first_read_time_vs_limit" in report["targets_met"]
