"""Progress bars: shown when asked, silent with NEUROCUBE_PROGRESS=0."""

from __future__ import annotations

import subprocess
import sys

import dask.array as da
import numpy as np
import pytest
import xarray as xr

import neurocube
from neurocube.progress import active_client, compute, progress_bar


@pytest.fixture(autouse=True)
def _no_delay(monkeypatch):
    """These operations are quick: show their bars from the start."""
    monkeypatch.setattr("neurocube.progress.DELAY", 0.0)


def test_compute_shows_a_task_bar_when_enabled(capsys):
    (total,) = compute(da.ones(100, chunks=10).sum(), description="summing", progress=True)
    assert int(total) == 100
    err = capsys.readouterr().err
    assert "summing" in err and "task" in err


def test_environment_turns_bars_off(capsys, monkeypatch):
    monkeypatch.setenv("NEUROCUBE_PROGRESS", "0")
    (total,) = compute(da.ones(100, chunks=10).sum(), description="summing")
    assert int(total) == 100
    with progress_bar(1000, "inflating") as bar:
        bar.update(1000)
    assert capsys.readouterr().err == ""


def test_environment_turns_bars_on(capsys, monkeypatch):
    monkeypatch.setenv("NEUROCUBE_PROGRESS", "1")
    with progress_bar(4 << 20, "inflating betas.nii.gz") as bar:
        bar.update(4 << 20)
    err = capsys.readouterr().err
    assert "inflating betas.nii.gz" in err and "100%" in err and "4.0 MiB" in err


def test_cache_write_shows_progress(tmp_path, capsys):
    ds = xr.Dataset(
        {"v": ("t", da.from_array(np.arange(40.0), chunks=10))}, attrs={"neurocube_sources": []}
    )
    neurocube.cache(ds, store=tmp_path, key="shown", progress=True)
    assert "caching shown" in capsys.readouterr().err
    neurocube.cache(ds, store=tmp_path, key="silent", progress=False)
    assert capsys.readouterr().err == ""


def test_no_client_without_distributed_imported():
    script = (
        "import sys, neurocube.progress as p; print(p.active_client(), "
        "'distributed' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.split() == ["None", "False"]
    assert active_client() is None
