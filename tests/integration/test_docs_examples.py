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
        capture_output=True,
        text=True,
        env=environ,
        timeout=120,
    )


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """``tmp_path`` as the working directory; the examples' ``tempfile.mkdtemp()`` inside it."""
    monkeypatch.chdir(tmp_path)
    made = iter(range(1000))
    real_mkdtemp = tempfile.mkdtemp
    monkeypatch.setattr(
        tempfile,
        "mkdtemp",
        lambda *a, **k: real_mkdtemp(dir=tmp_path, prefix=f"mkdtemp{next(made)}-"),
    )
    return tmp_path


# --------------------------------------------------------------------------- fMRI buckets


@pytest.fixture
def bucket(workdir):
    """A generated laion_fmri bucket standing in for the docs' ``/data/laion_fmri``."""
    from neurocube.synthetic.bucket import make_bucket

    return make_bucket(
        workdir / "laion_fmri", subjects=["sub-01", "sub-03"], sessions=2, trials=24, grid=(8, 9, 7)
    )


def expected_betas(truth, sessions, rois, nc_threshold=None, stimuli=None):
    """(values, voxel mask, kept trial rows) of a ``betas`` selection: nibabel and the truth."""
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
    assert [(s, lab) for s, lab in zip(ds.session.values, ds.label.values, strict=True)] == rows


# --------------------------------------------------------------------------- README.md


def test_readme_examples(bucket, workdir):
    doc = "README.md"
    code = blocks(doc)
    assert len(code) == 3
    shutil.copytree(
        DATA / "coco_pipe" / "eeg_foundation_embeddings",
        workdir / "derivatives" / "eeg_foundation_embeddings",
    )
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
        np.testing.assert_allclose(
            by_image.sel(image_name=name).values, ds.betas.values[rows].mean(0), rtol=1e-6
        )

    run(doc, 1, code[1], ns)
    import pyarrow.parquet as pq

    epochs = ns["ds"].embedding.values
    assert epochs.shape == (12, 4)  # 2 subjects x 2 runs x 3 windows, 4 features
    # the subject table written by write_combined_tables holds the mean of each subject's epochs
    subjects = ns["table"]
    written = pq.read_table(
        workdir
        / "derivatives/eeg_foundation_embeddings/combined"
        / "cbramod_EO_subject_embeddings.parquet"
    ).to_pandas()
    assert list(written["subject"]) == list(subjects.subject.values)
    features = [c for c in written.columns if c.startswith("embedding_")]
    np.testing.assert_allclose(subjects.embedding.values, written[features].to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(
        ns["subjects"].embedding.values, written[features].to_numpy(), rtol=1e-6
    )
    # coco-pipe's own epoch table (in the sample) holds the same rows as the NPZ files
    coco = pq.read_table(
        DATA
        / "coco_pipe/eeg_foundation_embeddings/combined"
        / "cbramod_EO_epoch_embeddings.parquet"
    ).to_pandas()
    np.testing.assert_allclose(
        np.sort(epochs, axis=0), np.sort(coco[features].to_numpy(), axis=0), rtol=1e-6
    )

    # names the public bucket (anonymous S3, network): compiled only; the same calls run
    # against a loopback S3 server in test_docs_remote.py
    compile(code[2], f"{doc} (python block 2)", "exec")


def test_readme_shell_block_runs_the_demo(workdir):
    (shell,) = blocks("README.md", "bash")
    assert shell.splitlines() == ['pip install -e ".[dev]" && neurocube demo', "pytest"]
    # `pip install` and `pytest` are this environment's setup and this suite; the demo runs
    done = neurocube_cli("demo")
    assert done.returncode == 0, done.stderr
    for step in (
        "Generated a synthetic bucket",
        "Opened sub-01",
        "Averaged the repeats",
        "first read",
        "second read",
        "Cached the selection",
        "back to NIfTI",
    ):
        assert step in done.stdout, done.stdout


# --------------------------------------------------------------------------- docs/fmri.md


def test_fmri_doc_examples(bucket, workdir, capsys):
    import nibabel as nib

    doc = "docs/fmri.md"
    code = blocks(doc)
    assert len(code) == 5
    ns: dict[str, Any] = {}
    run(doc, 0, code[0], ns, substitute={"/data/laion_fmri": str(bucket.root)})
    truth = bucket.subjects["sub-01"]
    assert ns["sub"].sessions == ["ses-01", "ses-02"]
    check_betas(ns["ds"], truth, ["ses-01", "ses-02"], ["FFA1", "FFA2", "OFA"], 15, "shared")

    # the shuffled group-by (own bucket, own namespace): image means against numpy
    grouped: dict[str, Any] = {}
    run(doc, 1, code.pop(1), grouped)
    loaded = grouped["betas"].values
    labels = grouped["betas"].image_name.values
    for name in grouped["means"].image_name.values[:5]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            expected = np.nanmean(loaded[labels == name], axis=0)
        np.testing.assert_allclose(grouped["means"].sel(image_name=name).values, expected,
                                   rtol=1e-5, atol=1e-6, equal_nan=True)

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
        values, _, _ = expected_betas(
            bucket.subjects[subject], ["ses-01", "ses-02"], ["FFA1", "FFA2", "OFA"], 10
        )
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
    values, keep, _ = expected_betas(
        truth, truth.sessions, ["FFA1", "FFA2", "OFA", "PPA"], 15, "shared"
    )
    np.testing.assert_array_equal(betas.values, values)
    written = np.asarray(nib.load(f"{ns['root']}/mean_face.nii.gz").dataobj)
    np.testing.assert_allclose(written[keep], values.mean(0), rtol=1e-6)
    assert np.isnan(written[~keep]).all()
    avg = ns["avg"]
    name = str(avg.image_name.values[0])
    np.testing.assert_allclose(
        avg.sel(image_name=name).values, values[betas.image_name.values == name].mean(0), rtol=1e-6
    )


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
        (
            "sub-01_ses-01_..._SingletrialBetas_statmap.nii.gz",
            "sub-01_..._res-1pt8_desc-brain_mask.nii.gz",
            (4, 5, 3, 1050),
        ),
        ("betas.nii.gz", "brain_mask.nii.gz", (6, 5, 4, 12)),
    ]:
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


# --------------------------------------------------------------------------- docs/hdf5.md


def check_repr(shown: str, ds, *, sizes: bool = True) -> int:
    """Check the ``# name (dims) dtype [values]`` lines of a repr shown in a block against ``ds``.

    Dims and dtypes always; values when the doc lists all of them (no ``...``). Returns how many
    lines were checked."""
    import shlex

    checked = 0
    for line in shown.splitlines():
        if sizes and (m := re.match(r"#\s*Dimensions:\s*\((.*)\)", line)):
            shown_sizes = dict(item.split(": ") for item in m.group(1).split(", "))
            assert {k: int(v) for k, v in shown_sizes.items()} == dict(ds.sizes), line
            continue
        m = re.match(r"#\s+\*?\s*(\w+)\s+\(([\w, ]+)\)\s+(\S+)\s*(.*)", line)
        if not m or m.group(1) not in ds.variables:
            continue
        name, dims, dtype, values = m.groups()
        var = ds[name]
        assert var.dims == tuple(d.strip() for d in dims.split(",")), line
        if dtype.startswith("<U"):
            assert var.dtype.kind == "U", line
        else:
            assert var.dtype == np.dtype(dtype), line
        if values and "..." not in values and "dask" not in values:
            expected = [float(v) if var.dtype.kind in "fi" else v for v in shlex.split(values)]
            if var.dtype.kind == "b":
                expected = [v == "True" for v in expected]
            actual = var.values.tolist()
            if var.dtype.kind == "f":
                np.testing.assert_allclose(actual, expected, rtol=1e-3, err_msg=line)
            else:
                assert actual == expected, line
        checked += 1
    return checked


@pytest.fixture
def hdf5_files(workdir):
    """The sample caches (spectralbrain's and offspect's own files) under the names the doc uses,
    and a ``caches/`` folder of two subjects' left hemispheres."""
    import h5py

    for name in ("sub-01_lh_white_spectral.h5", "bad.h5"):
        shutil.copy(DATA / "spectralbrain" / name, workdir / name)
    shutil.copy(DATA / "offspect" / "merged.hdf5", workdir / "merged.hdf5")
    (workdir / "caches").mkdir()
    rng = np.random.default_rng(5)
    for subject in ("sub-01", "sub-02"):
        with h5py.File(workdir / "caches" / f"{subject}_hemi-L_white_spectral.h5", "w") as h5:
            h5.create_dataset("eigenvalues", data=np.sort(rng.random(6)))
            h5.create_dataset(
                "eigenvectors",
                data=rng.standard_normal((40, 6)),
                compression="gzip",
                compression_opts=4,
            )
            h5.attrs["subject"] = subject
            h5.attrs["spectralbrain_version"] = "0.1.0"
    return workdir


def test_hdf5_doc_examples(hdf5_files, workdir, capsys):
    import h5py
    import nibabel as nib

    from neurocube.errors import IncompleteFileError, NeurocubeWarning

    doc = "docs/hdf5.md"
    code = blocks(doc)
    assert len(code) == 8
    ns: dict[str, Any] = {}
    run(doc, 0, code[0], ns)
    with h5py.File("sub-01_lh_white_spectral.h5") as h5:
        sample = {k: h5[k][()] for k in ("eigenvalues", "eigenvectors", "vertices", "faces")}
        sample["hks"] = h5["descriptors/hks"][()]
    np.testing.assert_array_equal(ns["first_modes"], sample["eigenvectors"][:, :20])
    # the repr shown is of a full-size surface: its variables, dims and dtypes, not its sizes
    assert check_repr(code[0], ns["ds"], sizes=False) == 6
    assert ns["ds"].attrs["neurocube_descriptors"][0] == "hks"

    with pytest.warns(NeurocubeWarning, match="incomplete"), pytest.raises(IncompleteFileError):
        run(doc, 1, code[1], ns)  # its second line is the strict=True refusal, as commented

    run(doc, 2, code[2], ns)
    assert ns["left"].eigenvectors.dims == ("subject", "vertex", "mode")
    for s, subject in enumerate(["sub-01", "sub-02"]):
        with h5py.File(f"caches/{subject}_hemi-L_white_spectral.h5") as h5:
            np.testing.assert_array_equal(ns["left"].eigenvectors.values[s], h5["eigenvectors"])

    rng = np.random.default_rng(7)
    evecs = rng.standard_normal((200, 300))
    arrays = {
        "evals": np.linspace(0.0, 1.0, 300),
        "evecs": evecs,
        "hks": rng.random((200, 16)),
        "matrix": rng.random((3, 3)),
        "verts": rng.random((200, 3)),
        "faces": rng.integers(0, 200, (390, 3)),
    }
    run(doc, 3, code[3], ns, placeholders=arrays)
    with h5py.File("sub-01_lh_spectral.h5") as h5:
        np.testing.assert_array_equal(h5["eigenvectors"], evecs)
        np.testing.assert_array_equal(h5["descriptors/hks"], arrays["hks"])
        assert h5.attrs["n_eigenvalues"] == 300 and "spectralbrain_version" in h5.attrs
    with h5py.File("copy.h5") as h5:
        for name, values in sample.items():
            path = "descriptors/hks" if name == "hks" else name
            np.testing.assert_array_equal(h5[path], values)
    connectome = nio_read_connectome("conn.tsv")
    np.testing.assert_allclose(connectome.values, arrays["matrix"], rtol=1e-9)
    assert list(connectome.source.values) == ["V1", "V2", "MT"]
    gifti = nib.load("hks.func.gii")
    np.testing.assert_allclose(
        np.stack([d.data for d in gifti.darrays], 1), arrays["hks"].astype(np.float32)
    )
    with np.load("arrays.npz") as npz:
        np.testing.assert_array_equal(npz["faces"], arrays["faces"])

    run(doc, 4, code[4], ns)
    traces = ns["ds"]
    assert check_repr(code[4], traces) >= 8
    with h5py.File("merged.hdf5") as h5:
        first = np.stack([h5["template_R001.xdf/traces"][n][()] for n in ("0", "1")])
        onset = int(h5["template_R001.xdf/traces/0"].attrs["onset_shift"])
    np.testing.assert_array_equal(ns["first_origin"].values, first)
    assert ns["accepted"].sizes["trace"] == 4  # no trace is rejected in the sample

    run(doc, 5, code[5], ns)
    with h5py.File("merged.hdf5") as h5:
        trace0 = dict(h5["template_R001.xdf/traces/0"].attrs)
        trace1 = dict(h5["template_R001.xdf/traces/1"].attrs)
    assert int(trace0["onset_shift"]) == onset + 5
    assert trace0["comment"] == "checked"
    assert trace0["reject"] == trace1["reject"] == "True"

    run(doc, 6, code[6], ns)

    capsys.readouterr()
    run(doc, 7, code[7], ns)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "((1000,), (30,))"
    with h5py.File("sub-01_hemi-L_spectral.h5") as h5:
        assert float(lines[1]) == pytest.approx(h5["eigenvectors"][:, 0].mean())
    assert lines[2] == str(np.array([str(i) for i in range(12)]))  # numeric order, not 0 1 10 11
    reject = np.zeros(12, bool)
    reject[10] = True
    assert lines[3] == str(reject)


def nio_read_connectome(path):
    import neurocube.io as nio

    return nio.read_connectome(path)


# --------------------------------------------------------------------------- docs/embeddings.md


def test_embeddings_doc_examples(workdir, capsys):
    import pyarrow.parquet as pq

    doc = "docs/embeddings.md"
    code = blocks(doc)
    assert len(code) == 6
    sample = DATA / "coco_pipe" / "eeg_foundation_embeddings"
    shutil.copytree(sample, workdir / "derivatives" / "eeg_foundation_embeddings")
    ns: dict[str, Any] = {}
    run(doc, 0, code[0], ns)
    ds = ns["ds"]
    assert ds.embedding.dims == ("recording", "feature") and ds.sizes["recording"] == 4
    for row, path in enumerate(ds.artifact_path.values):
        with np.load(path) as npz:  # the NPZ files coco-pipe wrote
            np.testing.assert_array_equal(ds.embedding.values[row], npz["recording_embedding"])

    run(doc, 1, code[1], ns)
    table = ns["table"]
    assert len(table) == 4 and set(table.n_windows) == {3} and set(table.n_features) == {4}

    run(doc, 2, code[2], ns)
    subjects = ns["subjects"]
    assert list(subjects.subject.values) == ["0001", "0002"]

    run(doc, 3, code[3], ns)
    # the table neurocube wrote and reopened holds coco-pipe's own epoch table (in the sample)
    coco = pq.read_table(sample / "combined" / "cbramod_EO_epoch_embeddings.parquet").to_pandas()
    features = [c for c in coco.columns if c.startswith("embedding_")]
    epoch = ns["table"]
    order = np.lexsort((epoch.window_index.values, epoch.recording_id.values))
    coco = coco.sort_values(["recording_id", "window_index"])
    np.testing.assert_allclose(epoch.embedding.values[order], coco[features].to_numpy(), rtol=1e-6)
    # and the subject means are those of each subject's epochs
    for s, subject in enumerate(subjects.subject.values):
        rows = coco[coco.subject.astype(str) == str(subject)]
        np.testing.assert_allclose(
            subjects.embedding.values[s], rows[features].mean().to_numpy(), rtol=1e-5
        )

    rng = np.random.default_rng(11)
    w = rng.standard_normal((6, 8)).astype(np.float32)
    run(
        doc,
        4,
        code[4],
        ns,
        placeholders={
            "w": w,
            "starts": np.arange(6) * 250,
            "stops": np.arange(6) * 250 + 250,
            "idx": np.arange(6),
        },
    )
    written = "sub-01/ses-01/eeg/sub-01_ses-01_task-rest_run-01_desc-cbramodEOMean_embedding.npz"
    with np.load(written) as npz:
        np.testing.assert_array_equal(npz["window_embeddings"], w)
        np.testing.assert_array_equal(npz["recording_embedding"], w.mean(0))
    from neurocube.io import validate_embedding_derivative

    assert validate_embedding_derivative(written)["condition"] == "EO"

    capsys.readouterr()
    run(doc, 5, code[5], ns)
    out = capsys.readouterr().out
    assert "(epoch: 20, feature: 16)" in out.replace("\n", " ")
    assert out.rstrip().splitlines()[-2:] == ["(2, 16)", "(2, 16)"]
    root = ns["root"]
    expected = []
    for s in ["01", "02"]:
        runs = [
            np.load(p)["window_embeddings"]
            for p in sorted(root.glob(f"sub-{s}/eeg/*_embedding.npz"))
        ]
        expected.append(np.concatenate(runs).mean(0))
    np.testing.assert_allclose(ns["subjects"].embedding.values, expected, rtol=1e-6)


# --------------------------------------------------------------------------- docs/cache.md


def test_cache_doc_examples(bucket, workdir, capsys):
    import neurocube

    doc = "docs/cache.md"
    code = blocks(doc)
    assert len(code) == 4
    truth = bucket.subjects["sub-01"]
    face = ["FFA1", "FFA2", "OFA"]
    ns: dict[str, Any] = {}
    run(doc, 0, code[0], ns, substitute={"/data/laion_fmri": str(bucket.root)})
    check_betas(ns["ds"], truth, ["ses-01"], face, 15)
    info = neurocube.cache_info()
    assert list(info.status) == ["complete"] and int(info.hits.iloc[0]) >= 1  # written once, hit

    run(doc, 1, code[1], ns)
    check_betas(ns["ds"], truth, ["ses-01"], face)
    assert set(neurocube.cache_info().key) >= {"sub01-face"}

    run(doc, 2, code[2], ns)
    assert neurocube.cache_info().empty  # its last line clears everything

    capsys.readouterr()
    run(doc, 3, code[3], ns)
    printed = capsys.readouterr().out
    assert re.search(r"demo-face\s+complete\s+\d+\s+\d+", printed), printed

    # the console block, run after the last example (the block before it clears the cache, the
    # example leaves the entry 'demo-face' for the commands to show)
    (console,) = blocks(doc, "console")
    commands = [line[2:].split() for line in console.splitlines() if line.startswith("$ ")]
    assert [c[:3] for c in commands][:3] == [
        ["neurocube", "cache", "ls"],
        ["neurocube", "cache", "du"],
        ["neurocube", "cache", "verify"],
    ]
    out, kept = {}, {}
    for command in commands:
        done = neurocube_cli(*command[1:])
        assert done.returncode == 0, (command, done.stderr)
        out[" ".join(command[1:])] = done.stdout
        kept[" ".join(command[1:])] = list(neurocube.cache_info().key)
    root = Path(os.environ["NEUROCUBE_CACHE_DIR"]) / "zarr"
    listing = out["cache ls"].splitlines()
    assert listing[0] == f"cache root: {root}"
    assert listing[1].split() == "key status on disk last used hits sources".split()
    assert re.match(r"demo-face\s+complete\s+[\d.]+ [KM]iB\s+\S+\s+\d+\s+\S+", listing[2])
    assert re.match(r"[\d.]+ [KM]iB\t1 entries\t", out["cache du"]) and str(root) in out["cache du"]
    assert re.match(r"ok\s+demo-face$", out["cache verify"].strip())
    # within budget, used today, not damaged: kept; `clear --all` removes it
    assert kept["cache evict 5GB"] == kept["cache clear --older-than 7d"] == ["demo-face"]
    assert kept["cache clear --status damaged --dry-run"] == ["demo-face"]
    assert kept["cache clear --all"] == []


# --------------------------------------------------------------------------- docs/behavior.md


def trex_export(path: Path, ident: int, n: int = 80, cm_per_pixel: float = 0.25) -> dict:
    """A TRex per-individual export as TRex writes it: positions in cm, ``inf`` where lost."""
    frame = np.arange(n, dtype=np.float64)
    x, y = 10.0 + frame * 0.5 + ident, 20.0 + frame * 0.25 + ident
    x[[5, 6]] = y[[5, 6]] = np.inf
    arrays = {
        "frame": frame,
        "time": frame / 50.0,
        "X": x,
        "Y": y,
        "X#wcentroid": x,
        "Y#wcentroid": y,
        "SPEED": np.ones(n),
        "poseX0": x + 1,
        "poseY0": y - 1,
        "id": np.array([float(ident)]),
        "cm_per_pixel": np.array([cm_per_pixel]),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return arrays


@pytest.fixture
def behavior_data(workdir):
    """``my_dataset``: two fish x three speeds (``fish01`` / ``speed3__loop1``, ...), 2,500 frames
    of two animals with poses and behaviour labels, values known by construction
    (tests/unit/datasets/_behavior_data.py, written with pyarrow, not neurocube); and TRex exports
    standing in for ``/data/trex_exports``."""
    from tests.unit.datasets._behavior_data import hierarchical, make_dataset

    gen = make_dataset(
        workdir / "my_dataset", hierarchical(n_fish=2, n_speed=3, n_frames=2500), row_group_size=500
    )
    exports = {
        (video, ident): trex_export(workdir / "trex_exports" / f"{video}_fish{ident}.npz", ident)
        for video in ("fish01__speed3__loop1", "fish02__speed1__loop1")
        for ident in (0, 1)
    }
    return gen, exports


def test_behavior_doc_examples(behavior_data, workdir, capsys):
    from tests.unit.datasets._behavior_data import value

    gen, exports = behavior_data
    seqs = [(s.group, s.sequence) for s in gen.seqs]
    doc = "docs/behavior.md"
    code = blocks(doc)
    assert len(code) == 6
    ns: dict[str, Any] = {}
    run(doc, 0, code[0], ns)
    ds = ns["ds"]
    assert ds.list_groups() == ["fish01", "fish02"]
    assert ds.list_sequences(group="fish01") == ["speed1__loop1", "speed2__loop1", "speed3__loop1"]
    meta = ns["meta"]
    row = meta[(meta["group"] == "fish01") & (meta["sequence"] == "speed3__loop1")].iloc[0]
    assert (row["fish"], row["speed"], row["loop"]) == ("fish01", "speed3", "loop1")

    run(doc, 1, code[1], ns)
    long = ns["long"].compute()
    assert long.sizes["row"] == 3 * 1000 * 2  # three sequences of fish01, 1000 frames, 2 animals
    s_index = np.array([seqs.index(("fish01", str(q))) for q in long.sequence.values])
    np.testing.assert_array_equal(
        long.poseX0.values, value(s_index, long.frame.values, long.id.values, 0, 0)
    )
    np.testing.assert_array_equal(
        long.poseY0.values, value(s_index, long.frame.values, long.id.values, 0, 1)
    )
    assert long.frame.values.min() == 1000 and long.frame.values.max() == 1999

    run(doc, 2, code[2], ns)
    dense = ns["dense"]
    position = dense["position"]
    assert position.dims == ("sequence", "frame", "space", "keypoint", "individual")
    assert list(position.space.values) == ["x", "y"]
    for q, sequence in enumerate(["speed1__loop1", "speed2__loop1"]):
        s = seqs.index(("fish01", sequence))
        np.testing.assert_array_equal(
            position.isel(sequence=q).sel(space="x", keypoint="2").values,
            value(s, np.arange(2500)[:, None], np.array([0, 1])[None, :], 2, 0),
        )
    np.testing.assert_allclose(dense["confidence"].sel(keypoint="1").values, 0.51)

    from neurocube.errors import NeurocubeWarning

    # the NPZ files hold a pickled label_names member, as mosaic writes them: skipped, as the
    # doc's "No pickles" paragraph says
    with pytest.warns(NeurocubeWarning, match="needs pickle"):
        run(doc, 3, code[3], ns)
    events = ns["events"].compute()
    assert ns["ds"].label_map("behavior") == {0: "rest", 1: "swim", 2: "turn"}
    with np.load(
        gen.root / "labels/behavior/lab-run/fish01__speed1__loop1.npz", allow_pickle=False
    ) as npz:
        frames, labels = npz["frames"], npz["labels"]
    first = events.sel(event=events.sequence == "speed1__loop1")
    np.testing.assert_array_equal(first.frames.values, frames)
    np.testing.assert_array_equal(first.labels.values, labels)
    assert ns["dense_labels"]["labels"].dims == ("frame", "individual", "label")

    run(doc, 4, code[4], ns, substitute={"/data/trex_exports": str(workdir / "trex_exports")})
    import neurocube

    built = neurocube.open_behavior("zebrafish")
    assert built.list_sequences(group="fish01") == ["fish01__speed3__loop1"]  # the video name
    table = built.tracks(groups="fish01", columns=["X", "Y"]).compute()
    src = exports[("fish01__speed3__loop1", 0)]
    rows = table.id.values == 0
    found = dict(zip(table.frame.values[rows].tolist(), table.X.values[rows].tolist(), strict=True))
    assert 5 not in found  # lost (inf) in both animals: no row
    assert found[10] == pytest.approx(src["X#wcentroid"][10] / 0.25)  # pixels = cm / cm_per_pixel

    capsys.readouterr()
    run(doc, 5, code[5], ns)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "40 None"  # 40 rows, small: read at once
    assert lines[1] == "((40,),)"  # lazy=True: Dask chunks
    assert lines[2] == "[12.  1.]"


# --------------------------------------------------------------------------- coverage


def test_every_document_with_code_has_its_test():
    """A new page with python blocks gets a test here (or in its own test_docs_<page>.py)."""
    here = Path(__file__).read_text()
    tested = set(re.findall(r'doc = "([\w/.-]+\.md)"', here))
    for own in Path(__file__).parent.glob("test_docs_*.py"):  # remote, training, reliability, ...
        tested.add(f"docs/{own.stem.removeprefix('test_docs_')}.md")
    with_code = {
        str(p.relative_to(ROOT))
        for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
        if "```python" in p.read_text()
    }
    assert with_code <= tested, sorted(with_code - tested)
