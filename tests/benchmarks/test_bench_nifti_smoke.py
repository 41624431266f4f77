"""The NIfTI benchmark runs end to end on a tiny file (its figures are not checked here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_nifti.py"


@pytest.mark.slow
def test_bench_nifti_quick(tmp_path):
    out = tmp_path / "nifti.json"
    subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--data", str(tmp_path / "data"),
         "--out", str(out)],
        check=True, capture_output=True, text=True,
    )
    report = json.loads(out.read_text())
    assert {"neurocube_first", "neurocube_indexed", "laion_streaming"} <= set(report["results"])
    assert "first_read_vs_zlib_stream" in report["ratios"]


@pytest.mark.slow
def test_bench_nifti_verification_quick(tmp_path):
    out = tmp_path / "verification.json"
    subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--verification", "--data",
         str(tmp_path / "data"), "--out", str(out)],
        check=True, capture_output=True, text=True,
    )
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"neurocube_indexed", "neurocube_indexed_noverify",
                                      "neurocube_indexed_compute",
                                      "neurocube_indexed_compute_noverify"}
    assert report["results"]["neurocube_indexed"]["cpu_seconds_median"] > 0
    assert "unverified_vs_verified_load_cpu" in report["ratios"]
