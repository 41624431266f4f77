"""Progress bars help instead of shouting (issue 12, item 5).

One bar per user-level operation (a compute of a selection, a cache write, an
index build), none for work shorter than ``neurocube.progress.DELAY``, none at
all with ``progress=False``, and plain lines (no cursor movement) when stderr
is not a terminal. The conftest turns bars off; these tests turn them on.
"""

from __future__ import annotations

import io
import re

import numpy as np
import pytest

import neurocube
from neurocube import progress
from neurocube.sources import gzindex
from neurocube.synthetic.bucket import make_bucket


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    root = tmp_path_factory.mktemp("bars-bucket")
    make_bucket(root, subjects=2, sessions=2, trials=16, grid=(10, 12, 9), seed=5,
                stimuli=False, surface_rois=False, freesurfer=False)  # fmt: skip
    return root


@pytest.fixture
def bars_on(monkeypatch, tmp_path):
    """Progress on (as for a user: NEUROCUBE_PROGRESS unset), a fresh cache (first reads)."""
    monkeypatch.delenv("NEUROCUBE_PROGRESS", raising=False)
    monkeypatch.setenv("NEUROCUBE_CACHE_DIR", str(tmp_path / "cache"))
    gzindex.reset_handles()
    made: list[str] = []
    original = progress._new_bar

    def counting(total, description, unit):
        made.append(description)
        return original(total, description, unit)

    monkeypatch.setattr(progress, "_new_bar", counting)
    yield made
    gzindex.reset_handles()


def _done_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if ": done," in line]


def test_a_betas_compute_draws_one_bar_not_one_per_file(bucket, bars_on, monkeypatch, capfd):
    monkeypatch.setattr(progress, "DELAY", 0.0)  # small files: show every bar there would be
    sub = neurocube.open_subject(bucket, "sub-01")
    ds = sub.betas(["ses-01", "ses-02"], roi="face", nc_threshold=5)  # 2 sessions, 3 ROI files
    values = ds.betas.values  # first read of both sessions' .nii.gz: two gzip streams
    assert np.isfinite(values).any()
    err = capfd.readouterr().err
    # Opening read the brain mask, ROI and noise-ceiling files: each one a quick small read, each
    # its own "operation" with DELAY=0 (never shown at the default DELAY, see the next test);
    # the compute of both sessions is one bar, the streams inside it draw none.
    computing = [d for d in bars_on if d == "computing"]
    assert computing == ["computing"]
    assert not any(d.startswith("indexing") for d in bars_on)
    assert "\x1b[" not in err and "\r" not in err  # stderr is not a terminal: plain lines
    assert len([line for line in _done_lines(err) if line.startswith("computing")]) == 1


def test_quick_work_draws_nothing(bucket, bars_on, capfd):
    # At the default DELAY (about a second) small masks, headers and a small compute show nothing.
    subs = [neurocube.open_subject(bucket, s) for s in ("sub-01", "sub-02")]
    means = neurocube.roi_means(subs, "face").roi_mean.values
    ds = subs[0].betas("ses-01", roi="FFA1")
    assert ds.betas.values.size > 0
    assert np.isfinite(means).any()
    assert capfd.readouterr().err == ""


def test_progress_false_is_honoured_inside_cache_and_load(bucket, bars_on, monkeypatch, capfd):
    monkeypatch.setattr(progress, "DELAY", 0.0)
    sub = neurocube.open_subject(bucket, "sub-02")
    ds = sub.betas("ses-01", roi="face")
    capfd.readouterr()
    bars_on.clear()
    # the first read of the session happens inside the cache write: its stream must stay silent
    cached = neurocube.cache(ds, key="quiet", progress=False)
    assert cached.betas.shape == ds.betas.shape
    gzindex.reset_handles()
    monkeypatch.setenv("NEUROCUBE_CACHE_DIR", str(bucket.parent / "other-cache-for-load"))
    neurocube.load(sub.betas("ses-02", roi="face"), progress=False)
    assert bars_on == []
    assert capfd.readouterr().err == ""


def test_a_cache_write_is_one_bar(bucket, bars_on, monkeypatch, capfd):
    monkeypatch.setattr(progress, "DELAY", 0.0)
    sub = neurocube.open_subject(bucket, "sub-02")
    ds = sub.betas(["ses-01", "ses-02"], roi="place")
    bars_on.clear()
    neurocube.cache(ds, key="shown")
    assert bars_on == ["caching shown"]
    err = capfd.readouterr().err
    assert "\x1b[" not in err and _done_lines(err)[-1].startswith("caching shown: done")


def test_a_terminal_gets_a_tqdm_bar_that_waits(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr("sys.stderr", term)
    bar = progress._new_bar(10, "computing", "task")
    try:
        assert type(bar).__module__.startswith("tqdm") and bar.delay == progress.DELAY
    finally:
        bar.close()
    assert term.getvalue() == ""  # closed before DELAY: never drawn


def test_log_lines_come_every_interval_then_at_the_end(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("neurocube.progress.time.monotonic", lambda: clock[0])
    out = io.StringIO()
    bar = progress._LineBar(4 << 20, "indexing 2 files", "B", out)
    bar.update(1 << 20)  # before DELAY: nothing
    clock[0] += 2
    bar.update(1 << 20)  # first line
    clock[0] += 1
    bar.update(1 << 20)  # within LOG_INTERVAL: nothing
    clock[0] += progress.LOG_INTERVAL
    bar.update(1 << 20)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines == [
        "indexing 2 files: running, 2.0 MiB of 4.0 MiB (50%), 2.0 s",
        "indexing 2 files: running, 4.0 MiB of 4.0 MiB (100%), 13.0 s",
        "indexing 2 files: done, 4.0 MiB of 4.0 MiB (100%), 13.0 s",
    ]
    assert not re.search(r"[\r\x1b]", out.getvalue())


def test_computes_of_other_graphs_get_no_bar(bars_on, monkeypatch, capfd):
    import dask.array as da

    monkeypatch.setattr(progress, "DELAY", 0.0)
    assert callable(neurocube.open_nifti)  # the NIfTI reader (and its compute watcher) loaded
    assert int(da.ones(100, chunks=10).sum().compute()) == 100
    assert bars_on == [] and capfd.readouterr().err == ""


def test_the_readme_claim_neurocube_progress_0(bucket, bars_on, monkeypatch, capfd):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert "`NEUROCUBE_PROGRESS=0` in the environment turns every bar off" in readme
    monkeypatch.setenv("NEUROCUBE_PROGRESS", "0")
    monkeypatch.setattr(progress, "DELAY", 0.0)
    sub = neurocube.open_subject(bucket, "sub-01")
    ds = sub.betas(["ses-01", "ses-02"], roi="face")
    neurocube.cache(ds, key="env-off")
    neurocube.load(sub.betas("ses-02", roi="place"))
    assert bars_on == [] and capfd.readouterr().err == ""


def test_an_open_stream_does_not_hold_other_bars_back(tmp_path, bars_on, monkeypatch, capfd):
    # A .nii.gz read outside any operation keeps its gzip stream open for later reads; that
    # must not count as a running operation, or every later bar would stay silent.
    import nibabel as nib

    monkeypatch.setattr(progress, "DELAY", 0.0)
    values = np.arange(4 * 4 * 4 * 6, dtype=np.float32).reshape(4, 4, 4, 6)
    path = tmp_path / "open.nii.gz"
    nib.save(nib.Nifti1Image(values, np.eye(4)), path)
    ds = neurocube.open_nifti(path, chunks=2)
    np.testing.assert_array_equal(ds.data.isel(trial=0).values, values[..., 0])
    assert not progress.busy()
    with progress.operation("later work", 10, unit="step") as bar:
        bar.update(10)
    assert "later work: done" in capfd.readouterr().err
