"""`neurocube demo` tells the story on a generated bucket (issue 12, item 8)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import neurocube
from neurocube.demo import run_demo
from neurocube.synthetic.session import make_session


def test_demo_tells_the_story_with_labelled_numbers(tmp_path):
    out = io.StringIO()
    assert run_demo(tmp_path, n_trials=12, out=out) == 0
    text = out.getvalue()
    steps = [int(m) for m in re.findall(r"^(\d)\. ", text, flags=re.M)]
    assert steps == [1, 2, 3, 4, 5, 6, 7]
    assert "sessions: ses-01, ses-02" in text
    assert re.search(r"\d+ trials x \d+ voxels", text)
    assert "noise ceiling >= 15 %" in text and "image_name" in text and "ses-02" in text
    assert re.search(r"\d+ images from 24 trials", text)
    assert re.search(r"first read, streams .*: \d+\.\d\d s", text)
    assert re.search(r"second read, .*through the index: +\d+\.\d\d s", text)
    assert "fresh Python process" in text and "identical values" in text
    assert "nibabel reads back the same map" in text
    # the map on disk is the mean over trials of the selection, NaN outside
    import nibabel as nib

    (written,) = list(tmp_path.rglob("sub-01_desc-faceMeanBeta.nii.gz"))
    back = np.asarray(nib.load(str(written)).dataobj)
    n_voxels = int(re.search(r"24 trials x (\d+) voxels", text).group(1))
    assert int(np.isfinite(back).sum()) == n_voxels


def test_demo_does_not_leak_its_cache_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROCUBE_CACHE_DIR", "/somewhere/else")
    assert run_demo(tmp_path, n_trials=8, out=io.StringIO()) == 0
    assert os.environ["NEUROCUBE_CACHE_DIR"] == "/somewhere/else"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "neurocube.cli", "demo", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("trials", ["0", "-3", "abc"])
def test_bad_trials_is_one_line_and_status_2(trials, tmp_path):
    proc = _cli("--trials", trials, "--folder", str(tmp_path))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("neurocube demo: error: argument --trials")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into read-only folders")
def test_unwritable_folder_is_one_line_and_status_2(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        proc = _cli("--folder", str(locked / "inside"), "--trials", "8")
    finally:
        locked.chmod(0o700)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "cannot write" in proc.stderr


def test_a_file_as_folder_is_one_line_and_status_2(tmp_path):
    # (works as root too: a regular file cannot hold a folder)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    proc = _cli("--folder", str(blocker / "demo"), "--trials", "8")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write into --folder" in lines[0]


def test_demo_command_line(tmp_path):
    proc = _cli("--folder", str(tmp_path), "--trials", "8")
    assert proc.returncode == 0, proc.stderr
    assert "7. Wrote the mean beta" in proc.stdout


def test_synthetic_session_is_what_it_says(tmp_path):
    s = make_session(tmp_path, grid=(10, 12, 10), n_trials=6, nan_fraction=0.05)
    import nibabel as nib

    data = nib.load(str(s.betas)).get_fdata()
    brain = nib.load(str(s.brain_mask)).get_fdata() > 0
    assert data.shape == (10, 12, 10, 6) and int(brain.sum()) == s.n_brain_voxels
    assert np.all(data[~brain] == 0)
    nan_vox = np.isnan(data[brain]).all(axis=1)
    assert nan_vox.any() and not np.isnan(data[brain][~nan_vox]).any()
    ds = neurocube.open_nifti(s.betas, mask=s.brain_mask)
    np.testing.assert_allclose(ds.data.values, data[brain].T)
