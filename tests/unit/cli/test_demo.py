"""`neurocube demo` runs the main job end to end on its generated example."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np

import neurocube
from neurocube.demo import run_demo
from neurocube.synthetic.session import make_session


def test_demo_prints_dataset_figures_and_memory(tmp_path):
    out = io.StringIO()
    assert run_demo(tmp_path, n_trials=24, out=out) == 0
    text = out.getvalue()
    assert "Dimensions:  (trial: 24, voxel:" in text
    assert "no betas" in text and "MB/s" in text and "peak memory" in text


def test_demo_command_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "neurocube.cli", "demo", "--folder", str(tmp_path), "--trials", "8"],
        capture_output=True, text=True, check=True,
    )
    assert "Per-trial mean response" in proc.stdout


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
