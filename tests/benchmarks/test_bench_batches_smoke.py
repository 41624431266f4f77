"""The batches benchmark runs end to end on a tiny session (its figures are not checked here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_batches.py"


@pytest.mark.slow
def test_bench_batches_quick(tmp_path):
    out = tmp_path / "batches.json"
    subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--data", str(tmp_path / "data"),
         "--out", str(out)],
        check=True, capture_output=True, text=True,
    )
    report = json.loads(out.read_text())
    loops = {"isel_loop", "isel_loop_zarr"}  # timed on a subset of trials
    assert {"load", "batches_gz", "batches_zarr", "map_random", "nibabel_loop",
            "map_random_zarr", *loops} <= set(report["results"])
    assert all(report["results"][k]["extrapolated"] for k in loops)
    assert {"a_batches_gz_vs_load", "b_batches_zarr_vs_batches_gz",
            "c_map_random_vs_isel_loop", "c_zarr_map_random_vs_isel_loop"} <= set(report["ratios"])
    # every method summed the same first voxel over the same trials
    sums = {k: round(v["checksum"], 2) for k, v in report["results"].items() if k not in loops}
    assert len(set(sums.values())) == 1, sums
    # the two loops read the same random subset, one from the .nii.gz, one from the Zarr cache
    assert round(report["results"]["isel_loop"]["checksum"], 2) == round(
        report["results"]["isel_loop_zarr"]["checksum"], 2)
