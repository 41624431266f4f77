"""Every ```python block of README.md and docs/{behavior,cache,embeddings,fmri,hdf5,nifti}.md runs.

One test per document: its blocks run in order, in one namespace, in a fresh folder (``tmp_path``,
made the working directory) holding the files the examples name, generated or copied from the
samples in ``tests/data`` (written by the original libraries). After the blocks, the values the
examples computed are checked against an oracle (nibabel, h5py, numpy, pyarrow on the same
files, or values known by construction) and printed outputs against what the doc says.

How the examples are pointed at the data, per document:

- absolute paths of the user's machine (``/data/laion_fmri``, ``/data/trex_exports``) are
  replaced, in the block's text, by the generated folder (``SUBSTITUTE``; each must occur);
- a few blocks use names they do not define (``evals``, ``hks``, ``matrix``, ``w``, ...: the
  reader's own arrays); the test binds them before the block (``PLACEHOLDERS``), nothing else;
- a block that needs something this machine does not have (the public S3 bucket) is compiled
  only, with the reason next to it.

docs/remote.md and docs/training.md have their own tests (test_docs_remote.py,
test_docs_training.py); docs/memory-and-chunking.md has no code blocks.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"


def blocks(doc: str, lang: str = "python") -> list[str]:
    """The fenced ``lang`` blocks of ``doc`` (a path relative to the repository root)."""
    return re.findall(rf"```{lang}\n(.*?)```", (ROOT / doc).read_text(), flags=re.DOTALL)


def run(
    doc: str,
    number: int,
    block: str,
    ns: dict[str, Any],
    *,
    substitute: Mapping[str, str] | None = None,
    placeholders: Mapping[str, Any] | None = None,
) -> None:
    """Run one block in ``ns``; the file name in tracebacks says which block failed."""
    for literal, replacement in (substitute or {}).items():
        assert literal in block, f"{doc} block {number} no longer names {literal!r}"
        block = block.replace(literal, replacement)
    for name, value in (placeholders or {}).items():
        assert re.search(rf"\b{name}\b", block), f"{doc} block {number} no longer uses {name}"
        ns[name] = value
    exec(compile(block, f"{doc} (python block {number})", "exec"), ns)


def neurocube_cli(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``neurocube ARGS`` in a subprocess with this worktree's sources first on the path."""
    environ = dict(os.environ, **(env or {}))
    environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), environ.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "neurocube.cli", *args],
        capture_output=True, text=True, env=environ, timeout=120,
    )  # fmt: skip


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """``tmp_path`` as the working directory; the examples' ``tempfile.mkdtemp()`` inside it."""
    monkeypatch.chdir(tmp_path)
    made = iter(range(1000))
    real_mkdtemp = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp",
                        lambda *a, **k: real_mkdtemp(dir=tmp_path, prefix=f"mkdtemp{next(made)}-"))
    return tmp_path


# --------------------------------------------------------------------------- fMRI buckets


@pytest.fixture
def bucket(workdir):
    """A generated laion_fmri bucket standing in for the docs' ``/data/laion_fmri``."""
    from neurocube.synthetic.bucket import make_bucket

    return make_bucket(workdir / "laion_fmri", subjects=["sub-01", "sub-03"], sessions=2,
                       trials=24, grid=(8, 9, 7))  # fmt: skip


def expected_betas(truth, sessions, rois, nc_threshold=None, stimuli=None):
    """(values, voxel mask, kept trial rows) of a ``betas`` selection, from nibabel and the truth."""
    import nibabel as nib

    keep = truth.brain_mask & np.logical_or.reduce([truth.rois[r] for r in rois])
    if nc_threshold is not None:
        for ses in sessions:
            with np.errstate(invalid="ignore"):
                keep &= truth.noise_ceilings[ses] >= nc_threshold
    rows, values = [], []
    for ses in sessions:
        trials = truth.trials[ses]
        volumes = np.asarray(nib.load(truth.betas_paths[ses]).dataobj, dtype=np.float32)
        for t, label in enumerate(trials["label"]):
            if stimuli is None or label.startswith(f"{stimuli}_"):
                rows.append((ses, label))
                values.append(volumes[..., t][keep])
    return np.array(values), keep, rows


def check_betas(ds, truth, sessions, rois, nc_threshold=None, stimuli=None):
    values, keep, rows = expected_betas(truth, sessions, rois, nc_threshold, stimuli)
    assert ds.betas.shape == values.shape and values.size
    np.testing.assert_array_equal(ds.betas.values, values)
    # voxel index = flat C-order grid position, in the order of np.nonzero(mask)
    np.testing.assert_array_equal(ds.voxel.values, np.flatnonzero(keep))
    assert [(s, lab) for s, lab in zip(ds.session.values, ds.label.values)] == rows


# --------------------------------------------------------------------------- README.md


def test_readme_examples(bucket, workdir):
    doc = "README.md"
    code = blocks(doc)
    assert len(code) == 3
    shutil.copytree(DATA / "coco_pipe" / "eeg_foundation_embeddings",
                    workdir / "derivatives" / "eeg_foundation_embeddings")  # fmt: skip
    ns: dict[str, Any] = {}
    run(doc, 0, code[0], ns, substitute={"/data/laion_fmri": str(bucket.root)})
    truth = bucket.subjects["sub-01"]
    ds = ns["ds"]
    import neurocube

    assert list(neurocube.cache_info().status) == ["complete"]  # ds is the reopened entry
    check_betas(ds, truth, ["ses-01", "ses-02"], ["FFA1", "FFA2", "OFA"], 15, "shared")
    # repeat averaging: the mean over the trials of each image
    by_image = ns["by_image"].compute()
    for name in by_image.image_name.values[:3]:
        rows = ds.image_name.values == name
        np.testing.assert_allclose(by_image.sel(image_name=name).values,
                                   ds.betas.values[rows].mean(0), rtol=1e-6)  # fmt: skip

    run(doc, 1, code[1], ns)
    import pyarrow.parquet as pq

    epochs = ns["ds"].embedding.values
    assert epochs.shape == (12, 4)  # 2 subjects x 2 runs x 3 windows, 4 features
    # the subject table written by write_combined_tables holds the mean of each subject's epochs
    subjects = ns["table"]
    written = pq.read_table(workdir / "derivatives/eeg_foundation_embeddings/combined"
                            / "cbramod_EO_subject_embeddings.parquet").to_pandas()  # fmt: skip
    assert list(written["subject"]) == list(subjects.subject.values)
    features = [c for c in written.columns if c.startswith("embedding_")]
    np.testing.assert_allclose(subjects.embedding.values, written[features].to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(ns["subjects"].embedding.values, written[features].to_numpy(),
                               rtol=1e-6)  # fmt: skip
    # coco-pipe's own epoch table (in the sample) holds the same rows as the NPZ files
    coco = pq.read_table(DATA / "coco_pipe/eeg_foundation_embeddings/combined"
                         / "cbramod_EO_epoch_embeddings.parquet").to_pandas()  # fmt: skip
    np.testing.assert_allclose(np.sort(epochs, axis=0),
                               np.sort(coco[features].to_numpy(), axis=0), rtol=1e-6)  # fmt: skip

    # names the public bucket (anonymous S3, network): compiled only; the same calls run
    # against a loopback S3 server in test_docs_remote.py
    compile(code[2], f"{doc} (python block 2)", "exec")


def test_readme_shell_block_runs_the_demo(workdir):
    (shell,) = blocks("README.md", "bash")
    assert shell.splitlines() == ['pip install -e ".[dev]" && neurocube demo', "pytest"]
    # `pip install` and `pytest` are this environment's setup and this suite; the demo runs
    done = neurocube_cli("demo")
    assert done.returncode == 0, done.stderr
    for step in ("Generated a synthetic bucket", "Opened sub-01", "Averaged the repeats",
                 "first read", "second read", "Cached the selection", "back to NIfTI"):  # fmt: skip
        assert step in done.stdout, done.stdout


# --------------------------------------------------------------------------- docs/fmri.md


def test_fmri_doc_examples(bucket, workdir, capsys):
    import nibabel as nib

    doc = "docs/fmri.md"
    code = blocks(doc)
    assert len(code) == 4
    ns: dict[str, Any] = {}
    run(doc, 0, code[0], ns, substitute={"/data/laion_fmri": str(bucket.root)})
    truth = bucket.subjects["sub-01"]
    assert ns["sub"].sessions == ["ses-01", "ses-02"]
    check_betas(ns["ds"], truth, ["ses-01", "ses-02"], ["FFA1", "FFA2", "OFA"], 15, "shared")

    run(doc, 1, code[1], ns)
    both = ns["both"]
    check_betas(both, truth, ["ses-01"], ["FFA1", "FFA2", "OFA"])
    clip = ns["sub"].stimulus_embeddings("CLIP").compute()
    assert both.embedding.shape == (24, clip.sizes["feature"])
    np.testing.assert_array_equal(both.embedding.values, clip.embedding.values[:24])

    run(doc, 2, code[2], ns)
    means = ns["means"].roi_mean
    assert list(means.subject.values) == ["sub-01", "sub-03"]
    for s, subject in enumerate(["sub-01", "sub-03"]):
        values, _, _ = expected_betas(bucket.subjects[subject], ["ses-01", "ses-02"],
                                      ["FFA1", "FFA2", "OFA"], 10)  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a trial with no finite voxel
            expected = np.nanmean(values, axis=1)
        np.testing.assert_allclose(means.values[s, : len(expected)], expected, rtol=1e-5)
    by_image = ns["by_image"].roi_mean
    assert by_image.dims == ("subject", "image_name")

    capsys.readouterr()
    run(doc, 3, code[3], ns)
    printed = capsys.readouterr().out
    betas = ns["ds"].betas
    assert printed.startswith(f"{betas.shape} {betas.data.chunks}")
    truth = ns["truth"].subjects["sub-01"]
    values, keep, _ = expected_betas(truth, truth.sessions, ["FFA1", "FFA2", "OFA", "PPA"], 15,
                                     "shared")  # fmt: skip
    np.testing.assert_array_equal(betas.values, values)
    written = np.asarray(nib.load(f"{ns['root']}/mean_face.nii.gz").dataobj)
    np.testing.assert_allclose(written[keep], values.mean(0), rtol=1e-6)
    assert np.isnan(written[~keep]).all()
    avg = ns["avg"]
    name = str(avg.image_name.values[0])
    np.testing.assert_allclose(avg.sel(image_name=name).values,
                               values[betas.image_name.values == name].mean(0), rtol=1e-6)  # fmt: skip



# --------------------------------------------------------------------------- docs/nifti.md


def write_nifti(path, data, affine):
    import nibabel as nib

    nib.save(nib.Nifti1Image(data, affine), str(path))


@pytest.fixture
def nifti_files(workdir):
    """The files docs/nifti.md names: a 1050-trial session (its example reads trial 1049) and a
    small one, each with a brain mask (NaN outside, negative R² inside, as the doc says)."""
    rng = np.random.default_rng(3)
    affine = np.diag([1.8, 1.8, 1.8, 1.0])
    affine[:3, 3] = [-4.0, -5.0, -2.0]
    made = {}
    for betas, mask, shape in [
        ("sub-01_ses-01_..._SingletrialBetas_statmap.nii.gz",
         "sub-01_..._res-1pt8_desc-brain_mask.nii.gz", (4, 5, 3, 1050)),
        ("betas.nii.gz", "brain_mask.nii.gz", (6, 5, 4, 12)),
    ]:  # fmt: skip
        data = rng.standard_normal(shape).astype(np.float32)
        data[0, 0, 0] = np.nan  # a voxel the GLM did not fit
        r2 = rng.uniform(-0.2, 1.0, shape[:3]).astype(np.float32)
        r2[rng.random(shape[:3]) < 0.3] = 0.0
        r2[1, 1, 1] = np.nan
        write_nifti(workdir / betas, data, affine)
        write_nifti(workdir / mask, r2, affine)
        made[betas] = (data, (r2 != 0) & ~np.isnan(r2), affine)
    return made


def test_nifti_doc_examples(nifti_files, workdir):
    import nibabel as nib
    import xarray as xr

    doc = "docs/nifti.md"
    code = blocks(doc)
    assert len(code) == 3
    ns: dict[str, Any] = {}
    run(doc, 0, code[0], ns)
    data, inside, _ = nifti_files["sub-01_ses-01_..._SingletrialBetas_statmap.nii.gz"]
    flat = data[inside]  # (voxel, trial), C order of the grid
    ds = ns["ds"]
    assert ds.data.dims == ("trial", "voxel") and ds.data.dtype == np.float32
    np.testing.assert_array_equal(ds.data.values, flat.T)
    np.testing.assert_allclose(ds.data.mean("voxel").values, np.nanmean(flat, axis=0), atol=1e-6)
    three = ns["ds"].data.isel(trial=[0, 500, 1049])
    np.testing.assert_array_equal(three.values, flat[:, [0, 500, 1049]].T)

    run(doc, 1, code[1], ns)
    data, inside, affine = nifti_files["betas.nii.gz"]
    assert isinstance(ns["ds"], xr.Dataset)
    np.testing.assert_array_equal(ns["ds"].data.values, data[inside].T)

    run(doc, 2, code[2], ns)
    mean = np.asarray(nib.load("mean.nii.gz").dataobj)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = np.nanmean(data, axis=3)  # ds.data.mean skips NaN like nanmean
    np.testing.assert_allclose(mean[inside], expected[inside], atol=1e-6)
    assert np.isnan(mean[~inside]).all()
    np.testing.assert_allclose(nib.load("mean.nii.gz").affine, affine)
    four = np.asarray(nib.load("betas_in_mask.nii.gz").dataobj)
    assert four.shape == data.shape
    np.testing.assert_array_equal(four[inside], data[inside])
    assert np.isnan(four[~inside]).all()
