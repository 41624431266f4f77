"""Every single-file format the README lists opens with xr.open_dataset(engine="neurocube").

Issue 12, item 7. Each format's values are compared with its own library (nibabel, h5py,
numpy, pyarrow) reading the same file eagerly.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import xarray as xr

from neurocube.errors import NeurocubeError, ReaderNotFoundError

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"


def _open(path, **kwargs):
    return xr.open_dataset(path, engine="neurocube", **kwargs)


def test_nifti(tmp_path):
    values = np.arange(4 * 5 * 3 * 2, dtype=np.float32).reshape(4, 5, 3, 2)
    path = tmp_path / "betas.nii.gz"
    nib.save(nib.Nifti1Image(values, np.eye(4)), path)
    ds = _open(path)
    np.testing.assert_array_equal(ds.data.values, nib.load(path).get_fdata(dtype=np.float32))


def test_spectral_hdf5():
    path = DATA / "spectralbrain" / "sub-01_lh_white_spectral.h5"
    ds = _open(path)
    with h5py.File(path, "r") as f:
        names = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        eig = next(n for n in names if n.split("/")[-1] == "eigenvectors")
        np.testing.assert_array_equal(ds.eigenvectors.values, f[eig][()])


def test_trace_hdf5():
    path = DATA / "offspect" / "merged.hdf5"
    ds = _open(path, use_cache=False)
    assert ds.data.sizes["trace"] > 0
    with h5py.File(path, "r") as f:
        first = None

        def find(name, obj):
            nonlocal first
            if first is None and isinstance(obj, h5py.Dataset) and obj.ndim >= 1 and \
                    obj.shape[0] == ds.sizes["sample"]:
                first = obj[()]

        f.visititems(find)
    assert first is not None
    np.testing.assert_allclose(np.asarray(ds.data.isel(trace=0).values).reshape(first.shape),
                               first)


def test_embedding_npz():
    path = sorted((DATA / "coco_pipe" / "eeg_foundation_embeddings").rglob("*_embedding.npz"))[0]
    ds = _open(path)
    with np.load(path) as z:
        np.testing.assert_array_equal(ds.embedding.values, z["recording_embedding"][None, :])


def test_plain_npz_of_arrays(tmp_path):
    from neurocube.io import save_npz

    sample = DATA / "spectralbrain" / "sub-01_arrays.npz"
    ds = _open(sample)
    with np.load(sample) as z:
        assert set(ds.data_vars) == set(z.files)
        for name in z.files:
            np.testing.assert_array_equal(ds[name].values, z[name])
    path = save_npz(tmp_path / "maps.npz", hks=np.linspace(0, 1, 12).reshape(4, 3))
    assert _open(path).hks.dims == ("hks_dim_0", "hks_dim_1")
    np.testing.assert_array_equal(_open(path).hks.values, np.linspace(0, 1, 12).reshape(4, 3))


def test_pickled_npz_is_refused_not_unpickled(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, bad=np.array([{"a": 1}], dtype=object))
    with pytest.raises(NeurocubeError, match="pickl"):
        _open(path)


def test_tracks_parquet():
    path = next((DATA / "mosaic" / "tracks").rglob("*.parquet"))
    ds = _open(path)
    table = pq.read_table(path).to_pandas()
    assert ds.sizes["row"] == len(table)
    np.testing.assert_array_equal(ds.frame.values, table["frame"].to_numpy())
    for column in ("X", "Y", "poseX0", "poseP6"):
        np.testing.assert_array_equal(ds[column].values, table[column].to_numpy())
    assert {"group", "sequence"} <= set(ds.attrs["skipped_columns"])


def test_combined_table_parquet():
    path = DATA / "coco_pipe/eeg_foundation_embeddings/combined/cbramod_EO_epoch_embeddings.parquet"
    ds = _open(path)
    table = pq.read_table(path).to_pandas()
    features = [c for c in table.columns if c.startswith("embedding_")]
    assert ds.embedding.dims == ("epoch", "feature")
    np.testing.assert_allclose(ds.embedding.values, table[features].to_numpy())
    np.testing.assert_array_equal(ds.subject.values, table["subject"].astype(str).to_numpy())
    assert ds.attrs["model_key"] == "cbramod" and ds.attrs["condition"] == "EO"


def test_gifti_func():
    path = DATA / "spectralbrain" / "sub-01_hks.func.gii"
    ds = _open(path)
    image = nib.load(path)
    expected = np.stack([d.data for d in image.darrays], axis=1)
    np.testing.assert_array_equal(ds.data.values, expected)
    assert ds.data.dims == ("vertex", "map")


def test_gifti_written_by_neurocube(tmp_path):
    from neurocube.io import save_gifti_func

    values = np.random.default_rng(0).normal(size=(30, 2)).astype(np.float32)
    path = save_gifti_func(tmp_path / "sub-01_hemi-L_hks.func.gii", values)
    np.testing.assert_array_equal(_open(path).data.values, values)


@pytest.mark.parametrize("name", ["sub-01_conn.tsv", "sub-01_conn_nolabels.tsv"])
def test_connectome_tsv(name):
    path = DATA / "spectralbrain" / name
    ds = _open(path)
    table = pd.read_csv(path, sep="\t", index_col=0)  # both files have a label row and column
    np.testing.assert_array_equal(ds.connectome.values, table.to_numpy())
    assert [str(v) for v in ds.target.values] == [str(v) for v in table.columns]


def test_a_table_that_is_no_connectome_is_not_claimed(tmp_path):
    path = tmp_path / "trials.tsv"
    path.write_text("trial\timage_name\n0\ta.png\n1\tb.png\n")
    with pytest.raises(ReaderNotFoundError):
        _open(path)


def test_the_readme_lists_the_formats_that_open():
    readme = (ROOT / "README.md").read_text()
    line = next(t for t in readme.splitlines() if 'engine="neurocube"' in t)
    for fmt in ("NIfTI", "spectral", "trace", "NPZ", "tracks", "combined", "GIFTI", "connectome"):
        assert fmt in line or fmt in readme.split(line, 1)[1][:600], fmt


def test_suffix_does_not_decide(tmp_path):
    sample = DATA / "spectralbrain" / "sub-01_hks.func.gii"
    renamed = tmp_path / "hks.func.gii"
    shutil.copyfile(sample, renamed)
    renamed_bad = tmp_path / "hks.txt"
    shutil.copyfile(sample, renamed_bad)
    assert _open(renamed).data.shape[0] == 12
    with pytest.raises(ReaderNotFoundError):
        _open(renamed_bad)
