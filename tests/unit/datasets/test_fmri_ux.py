"""Issue 12 (items 1, 2, 3, 10): masked results align, carry their provenance, go back to NIfTI."""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest
import xarray as xr

import neurocube
from neurocube.synthetic.bucket import make_bucket


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    root = tmp_path_factory.mktemp("bucket_ux")
    return make_bucket(root, subjects=2, sessions=2, trials=16, grid=(8, 9, 7), seed=11)


def _flat_index(truth_selection):
    return np.flatnonzero(truth_selection.reshape(-1)).astype(np.int64)


# ------------------------------------------------------------------ 12.1: a voxel index


def test_voxel_dim_is_indexed_by_the_flat_grid_index(bucket):
    sub = neurocube.open_subject(bucket.root, "sub-01")
    truth = bucket.subjects["sub-01"]
    ds = sub.betas("ses-01", roi="face")
    face = truth.brain_mask & (truth.rois["FFA1"] | truth.rois["FFA2"] | truth.rois["OFA"])
    assert "voxel" in ds.indexes
    assert ds.voxel.dtype == np.int64
    np.testing.assert_array_equal(ds.voxel.values, _flat_index(face))
    # i, j, k, x, y, z stay plain coordinates along voxel
    assert not {"i", "j", "k", "x", "y", "z"} & set(ds.indexes)
    flat = np.ravel_multi_index((ds.i.values, ds.j.values, ds.k.values), truth.brain_mask.shape)
    np.testing.assert_array_equal(ds.voxel.values, flat)
    nc = sub.noise_ceiling(session="ses-01", roi="FFA1")
    assert "voxel" in nc.indexes
    many = sub.noise_ceiling(session=["ses-01", "ses-02"], roi="FFA1")
    assert "voxel" in many.indexes


def test_selections_of_one_subject_align(bucket):
    sub = neurocube.open_subject(bucket.root, "sub-01")
    truth = bucket.subjects["sub-01"]
    ds = sub.betas("ses-01", roi="face", nc_threshold=5)
    nc = sub.noise_ceiling(session="ses-01", roi="FFA1")
    assert ds.sizes["voxel"] != nc.sizes["voxel"]
    both = ds.assign(nc=nc)  # reindexed onto ds's voxels (NaN where FFA1 does not reach)
    ffa1 = truth.brain_mask & truth.rois["FFA1"]
    expected = np.where(ffa1.reshape(-1)[ds.voxel.values],
                        truth.noise_ceilings["ses-01"].reshape(-1)[ds.voxel.values], np.nan)
    np.testing.assert_allclose(both.nc.values, expected, equal_nan=True)
    a, b = xr.align(ds.betas, nc, join="inner")
    common = np.intersect1d(ds.voxel.values, nc.voxel.values)
    np.testing.assert_array_equal(a.voxel.values, common)
    np.testing.assert_array_equal(b.voxel.values, common)
    merged = xr.merge([ds.betas, nc], join="inner", compat="override")
    assert merged.sizes["voxel"] == common.size
    picked = ds.betas.sel(voxel=common[:3])
    volumes = np.asarray(nib.load(truth.betas_paths["ses-01"]).get_fdata(dtype=np.float32))
    grid = volumes.reshape(-1, volumes.shape[-1])
    np.testing.assert_allclose(picked.values, grid[common[:3]].T, equal_nan=True)


def test_open_nifti_masked_has_the_voxel_index_and_it_survives_the_cache(tmp_path):
    data = np.arange(4 * 5 * 6 * 3, dtype=np.float32).reshape(4, 5, 6, 3)
    path = tmp_path / "b.nii.gz"
    nib.Nifti1Image(data, np.eye(4)).to_filename(path)
    mask = np.zeros((4, 5, 6), bool)
    mask[1:3, 2, 1::2] = True
    ds = neurocube.open_nifti(path, mask=mask)
    np.testing.assert_array_equal(ds.voxel.values, np.flatnonzero(mask.reshape(-1)))
    assert "voxel" in ds.indexes
    cached = neurocube.cache(ds, store=tmp_path / "store", key="v")
    assert "voxel" in cached.indexes
    np.testing.assert_array_equal(cached.voxel.values, ds.voxel.values)
    again = neurocube.open_cached("v", store=tmp_path / "store")
    assert "voxel" in again.indexes and again.voxel.dtype == np.int64


# ------------------------------------------------------------------ 12.2: variables stand alone

_INTERPRETING = ("units", "subject", "affine", "grid_shape", "neurocube_sources")


def _roi_file(root, subject, name):
    return next((root / "derivatives/rois" / subject).glob(f"*/*res-1pt8*label-{name}_mask.nii.gz"))


def test_each_variable_carries_what_interprets_it(bucket, tmp_path):
    sub = neurocube.open_subject(bucket.root, "sub-01")
    truth = bucket.subjects["sub-01"]
    ds = sub.betas(["ses-01", "ses-02"], roi="FFA1", nc_threshold=5)
    for name in _INTERPRETING:
        assert name in ds.betas.attrs, name
    assert ds.betas.attrs["subject"] == "sub-01"
    np.testing.assert_allclose(ds.betas.attrs["affine"], truth.affine)
    assert list(ds.betas.attrs["grid_shape"]) == list(truth.brain_mask.shape)
    sources = ds.betas.attrs["neurocube_sources"]
    roi = str(_roi_file(bucket.root, "sub-01", "FFA1"))
    assert roi in sources  # the ROI file the voxels depend on
    assert sum("Noiseceiling" in p for p in sources) == 2
    nc = sub.noise_ceiling(session="ses-01", roi="FFA1")
    for name in _INTERPRETING:
        assert name in nc.attrs, name
    assert roi in nc.attrs["neurocube_sources"]
    many = sub.noise_ceiling(session=["ses-01", "ses-02"], roi="FFA1")
    assert roi in many.noise_ceiling.attrs["neurocube_sources"]
    # a custom mask file is a source too
    mask_path = tmp_path / "custom.nii.gz"
    nib.Nifti1Image(truth.rois["PPA"].astype(np.uint8), truth.affine).to_filename(mask_path)
    custom = sub.betas("ses-01", mask=str(mask_path))
    assert str(mask_path) in custom.betas.attrs["neurocube_sources"]
    assert str(mask_path) in custom.attrs["neurocube_sources"]
    # open_nifti's variable too
    opened = neurocube.open_nifti(truth.betas_paths["ses-01"], mask=mask_path)
    for name in ("affine", "grid_shape", "neurocube_sources"):
        assert name in opened.data.attrs, name
    assert str(mask_path) in opened.data.attrs["neurocube_sources"]


def test_caching_a_variable_or_its_groupby_keeps_provenance(bucket, tmp_path):
    sub = neurocube.open_subject(bucket.root, "sub-01")
    ds = sub.betas("ses-01", roi="face")
    with warnings.catch_warnings():
        warnings.simplefilter("error", neurocube.errors.NeurocubeWarning)
        one = neurocube.cache(ds.betas, store=tmp_path / "s")
        grouped = neurocube.cache(ds.betas.groupby("image_name").mean(), store=tmp_path / "s")
    assert one.attrs["neurocube_sources"] == ds.betas.attrs["neurocube_sources"]
    assert grouped.attrs["neurocube_sources"] == ds.betas.attrs["neurocube_sources"]


def test_a_changed_roi_file_makes_a_named_entry_stale(tmp_path):
    truth = make_bucket(tmp_path / "b", subjects=1, sessions=1, trials=6, grid=(6, 7, 5),
                        seed=3).subjects["sub-01"]
    root = tmp_path / "b"
    sub = neurocube.open_subject(root, "sub-01")
    ds = sub.betas("ses-01", roi="FFA1")
    neurocube.cache(ds, store=tmp_path / "s", key="ffa")
    neurocube.cache(ds.betas, store=tmp_path / "s", key="ffa-var")
    roi = _roi_file(root, "sub-01", "FFA1")
    half = truth.rois["FFA1"].copy()
    half.reshape(-1)[np.flatnonzero(half)[::2]] = False
    nib.Nifti1Image(half.astype(np.uint8), truth.affine).to_filename(roi)
    for key in ("ffa", "ffa-var"):
        with pytest.raises(neurocube.errors.CacheError, match="stale"):
            neurocube.open_cached(key, store=tmp_path / "s")


# ------------------------------------------------------------------ 12.3: maps back to NIfTI


def test_to_nifti_is_the_inverse_of_a_masked_open(tmp_path):
    rng = np.random.default_rng(5)
    volumes = rng.normal(size=(5, 6, 4, 3)).astype(np.float32)
    affine = np.array([[2.0, 0, 0, -5], [0, 2.0, 0, -6], [0, 0, 2.5, 3], [0, 0, 0, 1]])
    src = tmp_path / "src.nii.gz"
    nib.Nifti1Image(volumes, affine).to_filename(src)
    mask = rng.random((5, 6, 4)) > 0.5
    ds = neurocube.open_nifti(src, mask=mask)
    # (trial, voxel) -> 4-D: the original values inside the mask, NaN outside
    out4 = ds.data.neuro.to_nifti(tmp_path / "back4.nii.gz")
    image = nib.load(out4)
    back = np.asarray(image.get_fdata())
    assert back.shape == volumes.shape
    np.testing.assert_allclose(image.affine, affine)
    np.testing.assert_array_equal(back[mask], volumes[mask])
    assert np.isnan(back[~mask]).all()
    # (voxel, trial) is the same image
    out4t = ds.data.transpose("voxel", "trial").neuro.to_nifti(tmp_path / "back4t.nii")
    np.testing.assert_array_equal(np.asarray(nib.load(out4t).get_fdata()), back)
    # (voxel,) -> 3-D
    mean = ds.data.mean("trial")
    out3 = mean.neuro.to_nifti(tmp_path / "mean.nii.gz")
    back3 = np.asarray(nib.load(out3).get_fdata())
    assert back3.shape == mask.shape
    np.testing.assert_allclose(back3[mask], volumes[mask].mean(axis=1), rtol=1e-6)
    # re-read through the same mask: the round trip gives the values back
    again = neurocube.open_nifti(out4, mask=mask)
    np.testing.assert_array_equal(again.data.values, ds.data.values)
    with pytest.raises(neurocube.errors.FormatError, match=r"\.nii' or '\.nii\.gz'"):
        mean.neuro.to_nifti(tmp_path / "mean.png")
    with pytest.raises(neurocube.errors.SelectionError, match="dims"):
        ds.data.expand_dims(extra=2).neuro.to_nifti(tmp_path / "x.nii")


def test_subject_results_go_back_with_the_accessor(bucket, tmp_path):
    sub = neurocube.open_subject(bucket.root, "sub-02")
    truth = bucket.subjects["sub-02"]
    nc = sub.noise_ceiling(session="ses-01", roi="face")
    path = nc.neuro.to_nifti(tmp_path / "nc.nii.gz")
    back = np.asarray(nib.load(path).get_fdata())
    face = truth.brain_mask & (truth.rois["FFA1"] | truth.rois["FFA2"] | truth.rois["OFA"])
    np.testing.assert_allclose(back[face], truth.noise_ceilings["ses-01"][face], rtol=1e-6,
                               equal_nan=True)
    assert np.isnan(back[~face]).all()
    np.testing.assert_allclose(nib.load(path).affine, truth.affine)
    by_image = sub.betas("ses-01", roi="PPA").betas.groupby("image_name").mean()
    out = by_image.neuro.to_nifti(tmp_path / "by_image.nii.gz")
    assert nib.load(out).shape == (*truth.grid, by_image.sizes["image_name"])


def test_subject_to_nifti_refuses_another_subjects_values(bucket, tmp_path):
    one = neurocube.open_subject(bucket.root, "sub-01")
    two = neurocube.open_subject(bucket.root, "sub-02")
    mean = one.betas("ses-01").betas.mean("trial")
    with pytest.raises(neurocube.errors.GridMismatchError, match="sub-01"):
        two.to_nifti(mean, tmp_path / "wrong.nii.gz")
    assert not (tmp_path / "wrong.nii.gz").exists()
    # any selection of its own is fine: a ROI with a threshold, a noise-ceiling map
    sel = one.betas("ses-01", roi="face", nc_threshold=5).betas.mean("trial")
    path = one.to_nifti(sel, tmp_path / "own.nii.gz")
    back = np.asarray(nib.load(path).get_fdata())
    i, j, k = sel.i.values, sel.j.values, sel.k.values
    np.testing.assert_allclose(back[i, j, k], sel.values, rtol=1e-6, equal_nan=True)
    one.to_nifti(one.noise_ceiling(session="ses-02", roi="FFA1"), tmp_path / "nc.nii")
    with pytest.raises(neurocube.errors.FormatError, match=r"\.nii' or '\.nii\.gz'"):
        one.to_nifti(sel, tmp_path / "own.tif")
    with pytest.raises(neurocube.errors.FormatError, match=r"\.nii' or '\.nii\.gz'"):
        neurocube.io.save_nifti(tmp_path / "plain.img", np.zeros((2, 2, 2)), np.eye(4))


# ------------------------------------------------------------------ 12.10: everyday conventions


@pytest.mark.parametrize("name", ["map.nii", "map.nii.gz"])
def test_a_masked_3d_image_is_data_over_voxels(tmp_path, name):
    rng = np.random.default_rng(2)
    volume = rng.normal(size=(5, 4, 3)).astype(np.float32)
    path = tmp_path / name
    nib.Nifti1Image(volume, np.eye(4)).to_filename(path)
    mask = volume > 0
    ds = neurocube.open_nifti(path, mask=mask)
    assert ds.data.dims == ("voxel",)
    np.testing.assert_array_equal(ds.data.values, volume[mask])
    np.testing.assert_array_equal(ds.voxel.values, np.flatnonzero(mask.reshape(-1)))
    opened = xr.open_dataset(path, engine="neurocube", mask=mask)
    assert opened.data.dims == ("voxel",)
    np.testing.assert_array_equal(opened.data.values, volume[mask])
    back = ds.data.neuro.to_nifti(tmp_path / f"back_{name}")
    np.testing.assert_array_equal(np.asarray(nib.load(back).get_fdata())[mask], volume[mask])


@pytest.mark.parametrize("written", ["ses-02", "02", "2", " 2"])
def test_the_trial_table_session_column_may_hold_the_number(tmp_path, written):
    import pandas as pd

    make_bucket(tmp_path, subjects=1, sessions=2, trials=5, grid=(5, 6, 4), seed=1)
    tsv = next((tmp_path / "derivatives/glmsingle-tedana/sub-01/ses-02/func").glob("*_trials.tsv"))
    table = pd.read_csv(tsv, sep="\t", dtype=str, keep_default_na=False)
    table["session"] = written
    table.to_csv(tsv, sep="\t", index=False)
    sub = neurocube.open_subject(tmp_path, "sub-01")
    assert set(sub.metadata["session"]) == {"ses-01", "ses-02"}
    assert sub.betas("ses-02").sizes["trial"] == 5


@pytest.mark.parametrize("written", ["ses-01", "1", "03", "ses-2x"])
def test_a_different_session_in_the_trial_table_is_refused(tmp_path, written):
    import pandas as pd

    make_bucket(tmp_path, subjects=1, sessions=2, trials=5, grid=(5, 6, 4), seed=1)
    tsv = next((tmp_path / "derivatives/glmsingle-tedana/sub-01/ses-02/func").glob("*_trials.tsv"))
    table = pd.read_csv(tsv, sep="\t", dtype=str, keep_default_na=False)
    table["session"] = written
    table.to_csv(tsv, sep="\t", index=False)
    with pytest.raises(neurocube.errors.FormatError, match="'session' column"):
        _ = neurocube.open_subject(tmp_path, "sub-01").metadata


# ------------------------------------------------------------------ issue 13, item 4


def test_betas_chunks_count_the_selected_voxels_not_whole_volumes(bucket, monkeypatch):
    """A ROI's session is one chunk, so a lazy group-by works on few, large pieces."""
    from neurocube.datasets import fmri
    from neurocube.sources import nifti

    truth = bucket.subjects["sub-01"]
    volume_bytes = int(np.prod(truth.grid)) * 4
    # the proportions of a real session: 32 MiB chunks hold ~12 whole 2.5 MB volumes
    monkeypatch.setattr(nifti, "DEFAULT_CHUNK_BYTES", 12 * volume_bytes)
    monkeypatch.setattr(fmri, "BETAS_CHUNK_BYTES", 12 * volume_bytes, raising=False)
    sub = neurocube.open_subject(bucket.root, "sub-01")
    ds = sub.betas(["ses-01", "ses-02"], roi="face")
    per_session = [len(t) for t in (truth.trials["ses-01"], truth.trials["ses-02"])]
    assert ds.betas.data.chunks[0] == tuple(per_session)  # one chunk per session
    means = ds.betas.groupby("image_name").mean()
    assert len(means.data.__dask_graph__()) < 40
    # the whole brain: chunks of many trials, still about the same bytes each
    whole = sub.betas(["ses-01"]).betas
    n_vox = whole.sizes["voxel"]
    assert whole.data.chunks[0][0] == min(per_session[0], 12 * volume_bytes // (4 * n_vox))
    # values against numpy
    values = ds.betas.values
    labels = ds.image_name.values
    names = np.unique(labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = np.stack([np.nanmean(values[labels == n], axis=0) for n in names])
    np.testing.assert_allclose(means.sel(image_name=names).values, expected, rtol=1e-5,
                               equal_nan=True)
