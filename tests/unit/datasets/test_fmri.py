"""Subject / betas against an eager nibabel + numpy oracle of FORMATS.md §1 rules."""

from __future__ import annotations

import shutil
from pathlib import Path

import dask
import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import xarray as xr

import neurocube
from neurocube.errors import (
    DataNotDownloadedError,
    FormatError,
    GridMismatchError,
    SelectionError,
)
from neurocube.synthetic.bucket import make_bucket

SAMPLE = Path(__file__).parents[2] / "data" / "laion_fmri_bucket"
SESSIONS = ["ses-01", "ses-02", "ses-03"]


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    root = tmp_path_factory.mktemp("bucket")
    truth = make_bucket(root, subjects=2, sessions=3, trials=24, grid=(8, 9, 7), seed=7)
    return truth


# ------------------------------------------------------------------ the oracle (nibabel + numpy)


def _load(path):
    return np.asarray(nib.load(str(path)).get_fdata(dtype=np.float64))


def _inside(volume):
    return (volume != 0) & ~np.isnan(volume)


def oracle(root, subject, sessions, roi=None, custom=None, nc=None, stimuli=None,
           mask_source="anatomical"):
    root = Path(root)
    glm = root / "derivatives/glmsingle-tedana" / subject
    if mask_source == "anatomical":
        brain = _inside(_load(
            root / f"derivatives/anatomical/{subject}/ses-PrismaAnat/anat/"
                   f"{subject}_ses-PrismaAnat_space-T1w_res-1pt8_desc-brain_mask.nii.gz"))
    else:
        brain = _inside(_load(
            glm / f"{subject}_task-images_space-T1w_stat-rsquare_desc-R2mean_statmap.nii.gz"))
    selection = brain.copy()
    if roi is not None:
        union = np.zeros_like(brain)
        tokens = [roi] if isinstance(roi, str) else roi
        for file in sorted((root / "derivatives/rois" / subject).glob("*/*_mask.nii.gz")):
            category = file.parent.name
            name = file.name.split("label-")[1].split("_")[0]
            if any(t in ("all", name, category) for t in tokens):
                union |= _inside(_load(file))
        selection &= union
    if custom is not None:
        selection &= custom
    for ses in sessions if nc is not None else []:
        ncv = _load(glm / ses / "func" /
                    f"{subject}_{ses}_task-images_space-T1w_desc-Noiseceiling_statmap.nii.gz")
        with np.errstate(invalid="ignore"):
            selection &= ncv >= nc
    blocks, tables = [], []
    for ses in sessions:
        func = glm / ses / "func"
        data = _load(next(func.glob("*SingletrialBetas_statmap.nii*")))
        table = pd.read_csv(next(func.glob("*_trials.tsv")), sep="\t")
        matrix = data[selection].T  # (trial, voxel), voxels in C order
        kinds = table["label"].str.split("_").str[0]
        keep = np.ones(len(table), bool) if stimuli is None else (kinds == stimuli).to_numpy()
        blocks.append(matrix[keep])
        tables.append(table[keep])
    return np.concatenate(blocks), pd.concat(tables, ignore_index=True), selection


# ------------------------------------------------------------------ betas


CASES = [
    dict(roi="face", nc=15.0, stimuli="shared", mask_source="anatomical"),
    dict(roi=["FFA1", "place"], nc=None, stimuli=None, mask_source="rsquare"),
    dict(roi="all", nc=30.0, stimuli="unique", mask_source="anatomical"),
    dict(roi=None, nc=None, stimuli=None, mask_source="rsquare"),
    dict(roi="OFA", nc=5.0, stimuli=None, mask_source="rsquare"),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("subject", ["sub-01", "sub-02"])
def test_betas_match_the_oracle(bucket, subject, case):
    sub = neurocube.open_subject(bucket.root, subject)
    ds = sub.betas(SESSIONS, roi=case["roi"], nc_threshold=case["nc"], stimuli=case["stimuli"],
                   mask_source=case["mask_source"])
    want, table, selection = oracle(bucket.root, subject, SESSIONS, roi=case["roi"],
                                    nc=case["nc"], stimuli=case["stimuli"],
                                    mask_source=case["mask_source"])
    assert ds.betas.dims == ("trial", "voxel")
    assert ds.betas.shape == want.shape
    assert ds.betas.dtype == np.float32
    np.testing.assert_allclose(ds.betas.values, want, rtol=1e-6, equal_nan=True)
    i, _j, k = np.nonzero(selection)
    np.testing.assert_array_equal(ds.i.values, i)
    np.testing.assert_array_equal(ds.k.values, k)
    affine = bucket.subjects[subject].affine
    np.testing.assert_allclose(ds.x.values, affine[0, 0] * i + affine[0, 3], atol=1e-5)
    assert ds.session.values.tolist() == table.session.tolist()
    assert ds.label.values.tolist() == table.label.tolist()
    assert ds.beta_index.values.tolist() == table.beta_index.tolist()
    assert set(ds.subject.values.tolist()) == {subject}
    assert (ds.image_name.values == table.label.str.split("_", n=1).str[1].to_numpy()).all()
    all_chunks = ds.betas.data.chunks
    assert all(isinstance(c, int) for axis in all_chunks for c in axis)  # known chunk sizes


def test_nan_voxels_stay_nan(bucket):
    sub = neurocube.open_subject(bucket.root, "sub-01")
    ds = sub.betas("ses-02")
    values = ds.betas.values
    truth = bucket.subjects["sub-01"]
    nan_cols = np.isnan(values).all(axis=0)
    expected = truth.nan_voxels[truth.brain_mask]
    np.testing.assert_array_equal(nan_cols, expected)
    assert expected.any() and not np.isnan(values[:, ~expected]).any()


def test_multi_session_nc_threshold_is_the_intersection(bucket):
    sub = neurocube.open_subject(bucket.root, "sub-01")
    one = [sub.betas(s, roi="all", nc_threshold=25).sizes["voxel"] for s in SESSIONS]
    both = sub.betas(SESSIONS, roi="all", nc_threshold=25)
    truth = bucket.subjects["sub-01"]
    inter = truth.brain_mask.copy()
    inter &= np.logical_or.reduce([truth.rois[n] for n in truth.rois])
    for s in SESSIONS:
        with np.errstate(invalid="ignore"):
            inter &= truth.noise_ceilings[s] >= 25
    assert both.sizes["voxel"] == int(inter.sum())
    assert both.sizes["voxel"] < min(one)  # the sessions really differ
    assert both.attrs["voxel_rule"].startswith("intersection")


def test_custom_mask_forms_and_conflicts(bucket):
    sub = neurocube.open_subject(bucket.root, "sub-02")
    truth = bucket.subjects["sub-02"]
    rng = np.random.default_rng(3)
    custom = rng.random(truth.grid) < 0.3
    want, _, _ = oracle(bucket.root, "sub-02", ["ses-01"], custom=custom)
    for form in (custom, custom.ravel(), custom[truth.brain_mask]):
        got = sub.betas("ses-01", mask=form).betas.values
        np.testing.assert_allclose(got, want, equal_nan=True)
    with pytest.raises(SelectionError, match="either roi= or mask=, not both"):
        sub.betas("ses-01", roi="face", mask=custom)
    with pytest.raises(GridMismatchError, match=r"got an array of shape \(5,\)"):
        sub.betas("ses-01", mask=np.ones(5, bool))


def test_building_betas_reads_no_voxel_data(bucket, monkeypatch):
    from neurocube.sources import nifti

    original = nifti.NiftiSpec.read_volumes

    def refuse_betas(spec, start, stop):
        # small 3-D maps (brain mask, ROIs, noise ceilings) are read to build the voxel
        # selection; the 4-D betas must not be
        if len(spec.shape) == 4 and spec.shape[3] > 1:
            raise AssertionError("voxel data was read while the graph was built")
        return original(spec, start, stop)

    monkeypatch.setattr(nifti.NiftiSpec, "read_volumes", refuse_betas)
    with dask.config.set(scheduler=lambda *a, **k: pytest.fail("computed during build")):
        sub = neurocube.open_subject(bucket.root, "sub-01")
        ds = sub.betas(SESSIONS, roi="face", nc_threshold=10, stimuli="shared")
        means = ds.betas.groupby("image_name").mean()
        assert isinstance(means.data, dask.array.Array)
    monkeypatch.undo()
    assert np.isfinite(ds.betas.values).any()


def test_graph_names_are_deterministic(bucket):
    a = neurocube.open_subject(bucket.root, "sub-01").betas(SESSIONS, roi="face", nc_threshold=10)
    b = neurocube.open_subject(bucket.root, "sub-01").betas(SESSIONS, roi="face", nc_threshold=10)
    c = neurocube.open_subject(bucket.root, "sub-01").betas(SESSIONS, roi="face", nc_threshold=40)
    assert a.betas.data.name == b.betas.data.name
    assert dict(a.betas.data.dask).keys() == dict(b.betas.data.dask).keys()
    assert c.sizes["voxel"] < a.sizes["voxel"]
    assert a.betas.data.name != c.betas.data.name


def test_repeat_averaging_by_image(bucket):
    sub = neurocube.open_subject(bucket.root, "sub-01")
    ds = sub.betas(SESSIONS, roi="face")
    lazy = ds.betas.groupby("image_name").mean()
    assert isinstance(lazy.data, dask.array.Array)
    frame = pd.DataFrame(ds.betas.values)
    frame["image"] = ds.image_name.values
    want = frame.groupby("image").mean()
    got = lazy.compute()
    np.testing.assert_allclose(got.sel(image_name=want.index).values, want.values, rtol=1e-5)
    assert (ds.unique_or_shared.values == "shared").sum() == 3 * 12  # 6 images x 2 repeats


@pytest.mark.filterwarnings("ignore::UserWarning:zarr")  # zarr: fixed-width str, consolidated md
def test_to_zarr_round_trip(bucket, tmp_path):
    ds = neurocube.open_subject(bucket.root, "sub-01").betas(["ses-01", "ses-03"], roi="place")
    ds.to_zarr(tmp_path / "b.zarr")
    back = xr.open_zarr(tmp_path / "b.zarr")
    xr.testing.assert_identical(back.compute(), ds.compute())


# ------------------------------------------------------------------ the rest of the API


def test_metadata(bucket):
    sub = neurocube.open_subject(bucket.root, 1)
    assert sub.subject_id == "sub-02"
    meta = sub.metadata
    assert meta.index.name == "trial" and meta.index.tolist() == list(range(72))
    for column in ("session", "session_trial", "image_name", "stim_idx", "unique_or_shared",
                   "dataset", "run", "beta_index", "label"):
        assert column in meta.columns
    csv = pd.read_csv(bucket.root / "stimuli/task-images_metadata.csv")
    row = meta.iloc[30]
    assert csv.image_name[row.stim_idx] == row.image_name
    assert csv.dataset[row.stim_idx] == row.dataset
    assert meta.session_trial.tolist() == list(range(24)) * 3
    assert sub.n_stimuli() == len(csv)
    assert sub.n_stimuli("shared") == 6
    ds = sub.betas("ses-02")
    assert ds.trial.values.tolist() == list(range(24, 48))  # global trial index


def test_masks_rois_and_counts(bucket):
    sub = neurocube.open_subject(bucket.root, "sub-01")
    truth = bucket.subjects["sub-01"]
    np.testing.assert_array_equal(sub.brain_mask(), truth.brain_mask.ravel())
    assert sub.n_voxels() == truth.brain_mask.sum()
    rsq = ~np.isnan(truth.r2mean) & (truth.r2mean != 0)
    assert sub.n_voxels("rsquare") == rsq.sum()
    assert sub.n_voxels(res=None) == 8 * truth.brain_mask.sum()  # 2x finer in each axis
    face = sub.roi_mask("face")
    union = (truth.rois["FFA1"] | truth.rois["FFA2"] | truth.rois["OFA"]) & truth.brain_mask
    np.testing.assert_array_equal(face, union[truth.brain_mask])
    masks = sub.roi_masks(["face", "PPA"], mask_source="rsquare")
    assert list(masks) == ["face", "PPA"]
    np.testing.assert_array_equal(masks["PPA"], (truth.rois["PPA"] & rsq)[rsq])
    data = sub.roi_data("place", format="gii", hemi="R")
    assert sorted(data) == ["OPA", "PPA"]
    assert list(data["PPA"]) == ["gii"] and list(data["PPA"]["gii"]) == ["hemi-R"]
    gii = data["PPA"]["gii"]["hemi-R"]
    np.testing.assert_array_equal(np.flatnonzero(gii["func.gii"]), gii["label"])
    coords = sub.voxel_coordinates(roi="FFA1")
    assert len(coords) == (truth.rois["FFA1"] & truth.brain_mask).sum()
    assert list(coords.columns) == ["i", "j", "k", "x", "y", "z"]
    assert sub.has_anatomical() and sub.has_freesurfer() and sub.has_stimuli()
    assert sub.freesurfer_dir().name == "sub-01"


def test_noise_ceiling(bucket):
    sub = neurocube.open_subject(bucket.root, "sub-01")
    truth = bucket.subjects["sub-01"]
    one = sub.noise_ceiling(session="ses-02", roi="face")
    sel = truth.brain_mask & (truth.rois["FFA1"] | truth.rois["FFA2"] | truth.rois["OFA"])
    assert one.dims == ("voxel",) and isinstance(one.data, dask.array.Array)
    np.testing.assert_allclose(one.values, truth.noise_ceilings["ses-02"][sel], equal_nan=True)
    many = sub.noise_ceiling(session=["ses-01", "ses-03"])
    assert many.noise_ceiling.dims == ("session", "voxel")
    np.testing.assert_allclose(many.noise_ceiling.sel(session="ses-03").values,
                               truth.noise_ceilings["ses-03"][truth.brain_mask], equal_nan=True)
    by_desc = sub.noise_ceiling(desc=["12rep", "NoiseceilingAllrep"])
    assert by_desc.desc.values.tolist() == ["12rep", "NoiseceilingAllrep"]
    np.testing.assert_allclose(by_desc.noise_ceiling.sel(desc="12rep").values,
                               truth.subject_noise_ceilings["Noiseceiling12rep"][truth.brain_mask],
                               equal_nan=True)
    with pytest.raises(SelectionError, match=r"exactly one of session= .* and desc="):
        sub.noise_ceiling()
    with pytest.raises(SelectionError, match="no subject-level noise ceiling desc-33ses"):
        sub.noise_ceiling(desc="33ses")


def test_to_nifti_round_trip(bucket, tmp_path):
    sub = neurocube.open_subject(bucket.root, "sub-01")
    ds = sub.betas("ses-01", roi="face", nc_threshold=10)
    mean = ds.betas.mean("trial")
    path = sub.to_nifti(mean, tmp_path / "mean.nii.gz")
    written = _load(path)
    np.testing.assert_allclose(written[ds.i.values, ds.j.values, ds.k.values], mean.values,
                               rtol=1e-6, equal_nan=True)
    outside = np.ones(written.shape, bool)
    outside[ds.i.values, ds.j.values, ds.k.values] = False
    assert np.isnan(written[outside]).all()
    np.testing.assert_allclose(nib.load(path).affine, bucket.subjects["sub-01"].affine)
    flat = np.arange(sub.roi_mask("PPA").sum(), dtype=np.float32)
    path2 = sub.to_nifti(flat, tmp_path / "ppa.nii", roi="PPA")
    truth = bucket.subjects["sub-01"]
    np.testing.assert_array_equal(_load(path2)[truth.rois["PPA"] & truth.brain_mask], flat)
    with pytest.raises(GridMismatchError, match=r"3 values for .* selected voxels"):
        sub.to_nifti(np.ones(3), tmp_path / "bad.nii", roi="PPA")
    assert not (tmp_path / "bad.nii").exists()


def test_stimulus_side(bucket):
    sub = neurocube.open_subject(bucket.root, "sub-02")
    meta = sub.metadata
    emb = sub.stimulus_embeddings("dinov2")
    assert emb.embedding.dims == ("trial", "feature") and emb.embedding.dtype == np.float16
    with h5py.File(bucket.root / "stimuli/task-images_desc-DINOv2_embeddings.h5") as h5:
        ids = [v.decode() for v in h5["image_ids"][()]]
        matrix = h5["embedding"][()]
        valid = h5["valid"][()]
    rows = [ids.index(n) for n in meta.image_name]
    np.testing.assert_array_equal(emb.embedding.values, matrix[rows])
    np.testing.assert_array_equal(emb.embedding_valid.values, valid[rows])
    betas = sub.betas(["ses-01", "ses-03"], roi="face", stimuli="shared")
    merged = xr.merge([betas, emb], join="inner", compat="no_conflicts")
    assert merged.sizes["trial"] == betas.sizes["trial"]
    np.testing.assert_array_equal(merged.embedding.values, matrix[[ids.index(n) for n in
                                                                   betas.image_name.values]])
    images = sub.images
    with h5py.File(bucket.root / "stimuli/task-images_stimuli.h5") as h5:
        assert images[5] == h5["images"][meta.stim_idx[5]].tobytes()
    assert images.to_pil(5).size == (8, 8)
    stacked = images.to_dask(trials_per_chunk=10)
    assert stacked.compute()[7] == images[7]
    seg = sub.segmentations
    with h5py.File(bucket.root / "stimuli/task-images_desc-segmentations.h5") as h5:
        np.testing.assert_array_equal(seg.masks.values, h5["masks"][()])
    assert seg.image_name.dtype.kind == "U" and seg.area.dtype == np.int64
    assert set(sub.captions.columns) >= {"image_name", "caption", "ai_model"}
    with pytest.raises(DataNotDownloadedError, match="models on disk: \\['CLIP', 'DINOv2'\\]"):
        sub.stimulus_embeddings("SigLIP2")


def test_roi_means(bucket):
    subs = neurocube.open_subjects(bucket.root, ["sub-01", "sub-02"])
    out = neurocube.roi_means(subs, "face", session=["ses-01", "ses-02"], nc_threshold=10)
    assert out.roi_mean.dims == ("subject", "trial")
    assert isinstance(out.roi_mean.data, dask.array.Array)
    for sub in ("sub-01", "sub-02"):
        want, _, _ = oracle(bucket.root, sub, ["ses-01", "ses-02"], roi="face", nc=10)
        np.testing.assert_allclose(out.roi_mean.sel(subject=sub).values, np.nanmean(want, 1),
                                   rtol=1e-5)
    by_image = neurocube.roi_means(subs, "face", session="ses-01", by_image=True)
    assert by_image.roi_mean.dims == ("subject", "image_name")
    want, table, _ = oracle(bucket.root, "sub-01", ["ses-01"], roi="face")
    frame = pd.Series(np.nanmean(want, 1)).groupby(table.label.str.split("_", n=1).str[1]).mean()
    got = by_image.roi_mean.sel(subject="sub-01", image_name=frame.index.to_numpy()).values
    np.testing.assert_allclose(got, frame.values, rtol=1e-5)
    # images only sub-02 saw are NaN for sub-01
    seen = set(frame.index)
    others = [n for n in by_image.image_name.values if n not in seen]
    assert others and np.isnan(by_image.roi_mean.sel(subject="sub-01", image_name=others)).all()


def test_errors(bucket, tmp_path):
    sub = neurocube.open_subject(bucket.root, "sub-01")
    with pytest.raises(SelectionError, match=r"no session 'ses-09'.*sessions on disk: \['ses-01'"):
        sub.betas("ses-09")
    with pytest.raises(SelectionError, match="ROI query 'FFA' names no ROI"):
        sub.betas("ses-01", roi="FFA")
    with pytest.raises(SelectionError, match="stimuli='both': expected 'shared', 'unique'"):
        sub.betas("ses-01", stimuli="both")
    with pytest.raises(SelectionError, match="mask_source='r2'"):
        sub.betas("ses-01", mask_source="r2")
    with pytest.raises(SelectionError, match=r"no subject 'sub-07'.*\['sub-01', 'sub-02'\]"):
        neurocube.open_subject(bucket.root, "sub-07")
    with pytest.raises(SelectionError, match="subject index 5 out of range"):
        neurocube.open_subject(bucket.root, 5)


def _copy_subject(bucket, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(bucket.root, root)
    return root


def test_missing_files_raise_data_not_downloaded(bucket, tmp_path):
    root = _copy_subject(bucket, tmp_path)
    shutil.rmtree(root / "derivatives/anatomical/sub-01")
    (root / "stimuli/task-images_desc-CLIP_embeddings.h5").unlink()
    for f in (root / "derivatives/glmsingle-tedana/sub-01/ses-02/func").glob("*Singletrial*nii*"):
        f.unlink()
    sub = neurocube.open_subject(root, "sub-01")
    assert not sub.has_anatomical()
    with pytest.raises(DataNotDownloadedError,
                       match=r"anatomical brain mask .* not on disk; expected .*res-1pt8_desc-brain"
                             r"_mask\.nii\.gz\. To get it: download the anatomical"):
        sub.betas("ses-01")
    ds = sub.betas("ses-01", mask_source="rsquare")  # the R2mean map still works
    assert ds.sizes["voxel"] > 0
    with pytest.raises(DataNotDownloadedError, match=r"the betas of ses-02 is not on disk"):
        sub.betas("ses-02", mask_source="rsquare")
    with pytest.raises(DataNotDownloadedError, match="anatomical derivatives of sub-01"):
        sub.anatomical_dir()
    with pytest.raises(DataNotDownloadedError, match=r"task-images_desc-CLIP_embeddings\.h5"):
        sub.stimulus_embeddings("CLIP")


def test_trial_count_mismatch_is_reported(bucket, tmp_path):
    root = _copy_subject(bucket, tmp_path)
    tsv = next((root / "derivatives/glmsingle-tedana/sub-02/ses-01/func").glob("*_trials.tsv"))
    lines = tsv.read_text().splitlines()
    tsv.write_text("\n".join(lines[:-2]) + "\n")
    sub = neurocube.open_subject(root, "sub-02")
    with pytest.raises(FormatError, match=r"24 volumes, but its trial table .* has 22 rows"):
        sub.betas("ses-01")


def test_grid_mismatch_between_mask_and_betas(bucket, tmp_path):
    root = _copy_subject(bucket, tmp_path)
    anat = root / "derivatives/anatomical/sub-01/ses-PrismaAnat/anat"
    wrong = anat / "sub-01_ses-PrismaAnat_space-T1w_res-1pt8_desc-brain_mask.nii.gz"
    nib.Nifti1Image(np.ones((3, 3, 3), np.uint8), np.eye(4)).to_filename(wrong)
    sub = neurocube.open_subject(root, "sub-01")
    with pytest.raises(GridMismatchError, match="grid"):
        sub.betas("ses-01")


def test_older_layouts(tmp_path):
    root = tmp_path / "old"
    shutil.copytree(SAMPLE, root)
    func = root / "derivatives/glmsingle-tedana/sub-01/ses-01/func"
    new = next(func.glob("*SingletrialBetas_statmap.nii.gz"))
    new.rename(func / "sub-01_ses-01_task-images_desc-singletrial_stat-effect_statmap.nii.gz")
    atlas = root / "derivatives/atlases/sub-01/rois"
    atlas.mkdir(parents=True)
    shutil.copy(next((root / "derivatives/rois/sub-01/visualcat").glob("*.nii.gz")),
                atlas / "V1.nii.gz")
    sub = neurocube.open_subject(root, "sub-01")
    ds = sub.betas("ses-01", roi="V1")
    want, _, _ = oracle(SAMPLE, "sub-01", ["ses-01"], roi="visual")
    np.testing.assert_allclose(ds.betas.values, want, equal_nan=True)
    (root / "stimuli/task-images_metadata.csv").rename(root / "stimuli/stimuli.tsv")
    sub = neurocube.open_subject(root, "sub-01")
    with pytest.raises(FormatError, match=r"stimuli\.tsv: an older bucket layout .* expected "
                                          r"stimuli/task-images_metadata\.csv"):
        sub.n_stimuli()


# ------------------------------------------------------------------ the real sample bucket


def test_sample_bucket_against_nibabel():
    sub = neurocube.open_subject(SAMPLE, "sub-03")
    assert sub.sessions == ["ses-01", "ses-02"]
    ds = sub.betas(["ses-01", "ses-02"], roi="hlviscat", nc_threshold=20)
    want, _table, _ = oracle(SAMPLE, "sub-03", ["ses-01", "ses-02"], roi="hlviscat", nc=20)
    np.testing.assert_allclose(ds.betas.values, want, rtol=1e-6, equal_nan=True)
    full = neurocube.open_subject(SAMPLE, "sub-01").betas("ses-01")
    assert np.isnan(full.betas.values[0, 0])  # voxel (0,0,0) of trial 0 is NaN in the file
    assert (full.i.values[0], full.j.values[0], full.k.values[0]) == (0, 0, 0)
    meta = sub.metadata
    assert meta.image_name.iloc[0] == "stim_000" and meta.unique_or_shared.iloc[12] == "unique"
    assert meta.dataset.unique().tolist() == ["synthetic"]
    emb = sub.stimulus_embeddings("CLIP")
    with h5py.File(SAMPLE / "stimuli/task-images_desc-CLIP_embeddings.h5") as h5:
        matrix = h5["embedding"][()]
    np.testing.assert_array_equal(emb.embedding.values, matrix[meta.stim_idx.to_numpy()])
    data = sub.roi_data("hlvis")
    assert data["hlvis"]["gii"]["hemi-L"]["label"].tolist() == [0, 1]
    assert sub.noise_ceiling(desc="12rep").sizes["voxel"] == sub.n_voxels()


# ------------------------------------------------------------------ audit: layouts and edge cases


def test_older_trial_tables_with_stimulus_id(bucket, tmp_path):
    # FORMATS.md §1: older fixtures carry stimulus_id (no label), joined against the metadata
    # CSV's unique_or_shared. Sessions of one subject may differ: ses-01 names the image,
    # ses-02 gives the CSV row number, ses-03 keeps the current label column.
    root = _copy_subject(bucket, tmp_path)
    glm = root / "derivatives/glmsingle-tedana/sub-02"
    csv = pd.read_csv(root / "stimuli/task-images_metadata.csv")
    row_of = {name: i for i, name in enumerate(csv.image_name)}
    current = {s: pd.read_csv(next((glm / s / "func").glob("*_trials.tsv")), sep="\t")
               for s in SESSIONS}
    for ses, by_row in (("ses-01", False), ("ses-02", True)):
        table = current[ses].copy()
        names = table.label.str.split("_", n=1).str[1]
        table["stimulus_id"] = [str(row_of[n]) for n in names] if by_row else names
        tsv = next((glm / ses / "func").glob("*_trials.tsv"))
        table.drop(columns="label").to_csv(tsv, sep="\t", index=False)
    sub = neurocube.open_subject(root, "sub-02")
    meta = sub.metadata
    want_names = pd.concat([current[s].label.str.split("_", n=1).str[1] for s in SESSIONS],
                           ignore_index=True)
    assert meta.image_name.tolist() == want_names.tolist()
    assert (csv.image_name.to_numpy()[meta.stim_idx.to_numpy()] == want_names.to_numpy()).all()
    want_kind = csv.unique_or_shared.to_numpy()[meta.stim_idx.to_numpy()]
    assert meta.unique_or_shared.tolist() == want_kind.tolist()
    assert meta.label.tolist()[:48] == [""] * 48  # the column only ses-03 has
    assert meta.stimulus_id.tolist()[48:] == [""] * 24
    ds = sub.betas(SESSIONS, roi="face", stimuli="unique")
    want, table, _ = oracle(bucket.root, "sub-02", SESSIONS, roi="face", stimuli="unique")
    np.testing.assert_allclose(ds.betas.values, want, rtol=1e-6, equal_nan=True)
    assert ds.image_name.values.tolist() == table.label.str.split("_", n=1).str[1].tolist()
    # an id that is neither an image name nor a CSV row
    tsv = next((glm / "ses-01/func").glob("*_trials.tsv"))
    broken = pd.read_csv(tsv, sep="\t", dtype=str)
    broken.loc[3, "stimulus_id"] = "no_such_image"
    broken.to_csv(tsv, sep="\t", index=False)
    with pytest.raises(FormatError, match=r"stimulus_id 'no_such_image' is neither an "
                                          r"image_name nor a row of the stimuli metadata CSV"):
        _ = neurocube.open_subject(root, "sub-02").metadata
    (root / "stimuli/task-images_metadata.csv").unlink()
    with pytest.raises(FormatError, match=r"older trial table \(stimulus_id, no label\) needs "
                                          r"stimuli/task-images_metadata\.csv"):
        _ = neurocube.open_subject(root, "sub-02").metadata


def test_older_r2_mask_is_the_rsquare_source(bucket, tmp_path):
    # FORMATS.md §1 older layout: a desc-meanR2gt15mask_mask brain mask instead of R2mean.
    root = _copy_subject(bucket, tmp_path)
    glm = root / "derivatives/glmsingle-tedana/sub-01"
    r2 = next(glm.glob("*desc-R2mean_statmap.nii.gz"))
    image = nib.load(r2)
    values = image.get_fdata()
    with np.errstate(invalid="ignore"):
        legacy = (values > 0.15) & ~np.isnan(values)
    assert 0 < legacy.sum() < _inside(values).sum()
    nib.Nifti1Image(legacy.astype(np.uint8), image.affine).to_filename(
        glm / "sub-01_task-images_space-T1w_desc-meanR2gt15mask_mask.nii.gz")
    r2.unlink()
    sub = neurocube.open_subject(root, "sub-01")
    np.testing.assert_array_equal(sub.brain_mask("rsquare"), legacy.ravel())
    ds = sub.betas(["ses-01", "ses-03"], roi="place", nc_threshold=10, mask_source="rsquare")
    selection = legacy & np.logical_or(*(bucket.subjects["sub-01"].rois[n] for n in ("PPA", "OPA")))
    for ses in ("ses-01", "ses-03"):
        with np.errstate(invalid="ignore"):
            selection &= bucket.subjects["sub-01"].noise_ceilings[ses] >= 10
    blocks = [_load(bucket.subjects["sub-01"].betas_paths[s])[selection].T
              for s in ("ses-01", "ses-03")]
    np.testing.assert_allclose(ds.betas.values, np.concatenate(blocks), rtol=1e-6,
                               equal_nan=True)


def test_scaled_int16_betas(tmp_path):
    # The existing streaming loader ignores scl_slope/scl_inter (FORMATS.md §1): neurocube
    # must return the scaled values, as nibabel does.
    truth = make_bucket(tmp_path, subjects=1, sessions=3, trials=10, grid=(6, 7, 5),
                        dtype="int16", stimuli=False, seed=5)
    path = truth.subjects["sub-01"].betas_paths["ses-02"]
    image = nib.load(path)
    slope = float(image.dataobj.slope)  # nibabel moves scl_slope from the header to dataobj
    assert image.get_data_dtype() == np.int16 and slope != 1.0  # really a scaled file
    sub = neurocube.open_subject(tmp_path, "sub-01")
    ds = sub.betas(SESSIONS, roi="all", nc_threshold=5)
    want, _, _ = oracle(tmp_path, "sub-01", SESSIONS, roi="all", nc=5)
    assert ds.betas.dtype == np.float32
    # float32 rounding of raw * slope + inter, far below one quantum (slope) of the file
    np.testing.assert_allclose(ds.betas.values, want, rtol=1e-6, atol=1e-2 * abs(slope))


def test_roi_formats_and_resolutions(bucket, tmp_path):
    root = _copy_subject(bucket, tmp_path)
    rois = root / "derivatives/rois/sub-01"
    # a ROI published only as surface files, and one only at the anatomical 1pt5 resolution
    (rois / "body").mkdir()
    for hemi in "LR":
        for src in (rois / "place").glob(f"*hemi-{hemi}*label-PPA_mask.*"):
            shutil.copy(src, rois / "body" / src.name.replace("PPA", "EBA"))
    ppa = next((rois / "place").glob("*res-1pt8_label-PPA_mask.nii.gz"))
    shutil.copy(ppa, rois / "body" / "sub-01_space-T1w_res-1pt5_label-FBA_mask.nii.gz")
    sub = neurocube.open_subject(root, "sub-01")
    data = sub.roi_data("body")
    assert sorted(data) == ["EBA", "FBA"]
    assert "volume" not in data["EBA"] and sorted(data["EBA"]["gii"]) == ["hemi-L", "hemi-R"]
    assert data["FBA"] == {}  # nothing on the functional grid, no surface file
    assert list(sub.roi_data("PPA", format="volume")["PPA"]) == ["volume"]
    np.testing.assert_array_equal(sub.roi_data("PPA", format="nii.gz")["PPA"]["volume"],
                                  sub.roi_mask("PPA"))
    with pytest.raises(SelectionError, match=r"\['EBA'\] has no volume file on the functional "
                                             r"grid .* Use roi_data\(\)"):
        sub.betas("ses-01", roi=["PPA", "EBA"])
    with pytest.raises(SelectionError, match=r"format='surface': expected one of"):
        sub.roi_data("PPA", format="surface")
    with pytest.raises(SelectionError, match=r"hemi=\['L'\]: expected 'L', 'R', 'all' or None"):
        sub.roi_data("PPA", hemi=["L"])  # type: ignore[arg-type]


def test_embeddings_are_lazy_and_follow_repeats(bucket, monkeypatch):
    from neurocube.sources import (
        hdf5,
        stimuli,  # noqa: F401  (imported now, it binds the real reader)
    )

    original = hdf5.read_selection

    def refuse(*args, **kwargs):
        raise AssertionError("an HDF5 data read while the graph was built")

    monkeypatch.setattr(hdf5, "read_selection", refuse)
    sub = neurocube.open_subject(bucket.root, "sub-01")
    emb = sub.stimulus_embeddings("CLIP", trials_per_chunk=7)
    images = sub.images
    segmentations = sub.segmentations
    assert isinstance(emb.embedding.data, dask.array.Array)
    assert isinstance(segmentations.masks.data, dask.array.Array)
    monkeypatch.setattr(hdf5, "read_selection", original)
    meta = sub.metadata
    repeated = meta.image_name[meta.image_name.duplicated(keep=False)]
    assert len(repeated) >= 2 * 6  # shared images shown more than once
    with h5py.File(bucket.root / "stimuli/task-images_desc-CLIP_embeddings.h5") as h5:
        ids = [v.decode() for v in h5["image_ids"][()]]
        matrix = h5["embedding"][()]
    rows = np.asarray([ids.index(n) for n in meta.image_name])
    assert not (np.diff(rows) > 0).all()  # the lookup is neither sorted nor unique
    np.testing.assert_array_equal(emb.embedding.values, matrix[rows])
    first, second = repeated.index[0], repeated[repeated == repeated.iloc[0]].index[1]
    np.testing.assert_array_equal(emb.embedding.sel(trial=first).values,
                                  emb.embedding.sel(trial=second).values)
    assert images[int(first)] == images[int(second)]


def test_to_nifti_replaces_atomically(bucket, tmp_path):
    sub = neurocube.open_subject(bucket.root, "sub-01")
    target = tmp_path / "map.nii.gz"
    n = sub.n_voxels()
    sub.to_nifti(np.ones(n, np.float32), target)
    before = target.read_bytes()
    with pytest.raises(GridMismatchError, match=rf"{n - 1} values for {n} selected voxels"):
        sub.to_nifti(np.zeros(n - 1), target)
    assert target.read_bytes() == before  # a failed call leaves the old file
    sub.to_nifti(np.full(n, 2.0, np.float32), target)
    assert np.nanmax(_load(target)) == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.nii.gz"]  # no temp left


def test_noise_ceiling_selection_and_lists(bucket):
    sub = neurocube.open_subject(bucket.root, "sub-02")
    truth = bucket.subjects["sub-02"]
    with pytest.raises(SelectionError, match="exactly one of session="):
        sub.noise_ceiling(session="ses-01", desc="12rep")
    rsq = _inside(truth.r2mean)
    got = sub.noise_ceiling(session=["ses-02"], roi="OFA", mask_source="rsquare")
    assert got.noise_ceiling.dims == ("session", "voxel")  # a list, even of one, gives a dim
    np.testing.assert_allclose(got.noise_ceiling.values[0],
                               truth.noise_ceilings["ses-02"][rsq & truth.rois["OFA"]],
                               equal_nan=True)
    assert np.isnan(sub.noise_ceiling(session="ses-01").values).any()  # NaN voxels stay NaN


def test_custom_mask_as_nifti_path(bucket, tmp_path):
    sub = neurocube.open_subject(bucket.root, "sub-01")
    truth = bucket.subjects["sub-01"]
    rng = np.random.default_rng(8)
    custom = np.where(rng.random(truth.grid) < 0.4, -1.0, np.nan)  # negative = inside, NaN out
    path = tmp_path / "custom.nii.gz"
    nib.Nifti1Image(custom.astype(np.float32), truth.affine).to_filename(path)
    want, _, _ = oracle(bucket.root, "sub-01", ["ses-02"], custom=_inside(custom), nc=10)
    got = sub.betas("ses-02", mask=path, nc_threshold=10)
    np.testing.assert_allclose(got.betas.values, want, rtol=1e-6, equal_nan=True)
    shifted = truth.affine.copy()
    shifted[0, 3] += 5.0
    moved = tmp_path / "moved.nii.gz"
    nib.Nifti1Image(custom.astype(np.float32), shifted).to_filename(moved)
    with pytest.raises(GridMismatchError, match=r"moved\.nii\.gz: same shape as the functional "
                                                r"grid but another affine"):
        sub.betas("ses-02", mask=moved)


def test_stimuli_filter_needs_the_shared_flag(bucket, tmp_path):
    # labels without the shared_/unique_ prefix and no metadata CSV: the flag is unknown, so
    # filtering must refuse rather than silently drop every trial
    root = _copy_subject(bucket, tmp_path)
    tsv = next((root / "derivatives/glmsingle-tedana/sub-01/ses-01/func").glob("*_trials.tsv"))
    table = pd.read_csv(tsv, sep="\t")
    table["label"] = table.label.str.split("_", n=1).str[1]
    table.to_csv(tsv, sep="\t", index=False)
    sub = neurocube.open_subject(root, "sub-01")
    assert sub.betas("ses-01", stimuli="shared").sizes["trial"] == 12  # the CSV knows the flag
    (root / "stimuli/task-images_metadata.csv").unlink()
    sub = neurocube.open_subject(root, "sub-01")
    assert sub.betas("ses-01").sizes["trial"] == 24  # no filter: fine without the CSV
    with pytest.raises(FormatError, match=r"_trials\.tsv: stimuli='shared' needs each trial's "
                                          r"shared/unique flag, unknown for 24 trials"):
        sub.betas("ses-01", stimuli="shared")


def test_selections_that_leave_nothing_are_refused(bucket):
    from neurocube.ops.roi import NoiseCeilingUnitsWarning

    sub = neurocube.open_subject(bucket.root, "sub-01")
    ses = sub.sessions[0]
    with pytest.raises(SelectionError, match=r"nc_threshold=100 .*removed every voxel"):
        sub.betas(ses, nc_threshold=100)
    with pytest.raises(SelectionError, match=r"\[0, 100\]"):
        sub.betas(ses, nc_threshold=float("nan"))
    with pytest.raises(SelectionError, match=r"\[0, 100\]"):
        sub.voxel_selection(ses, nc_threshold=250)
    with pytest.warns(NoiseCeilingUnitsWarning, match="in percent"):
        sub.betas(ses, nc_threshold=0.2)


def test_a_stimuli_filter_that_leaves_no_trial_is_refused(tmp_path):
    make_bucket(tmp_path, subjects=1, sessions=2, trials=8, grid=(6, 7, 5), n_shared=1,
                shared_repeats=1, stimuli=False, seed=3)
    # ses-01 shows only unique images: relabel its one shared trial
    (tsv,) = tmp_path.rglob("sub-01_ses-01_*_trials.tsv")
    tsv.write_text(tsv.read_text().replace("shared_", "unique_"))
    sub = neurocube.open_subject(tmp_path, "sub-01")
    with pytest.raises(SelectionError, match=r"ses-01: stimuli='shared' leaves no trial"):
        sub.betas("ses-01", stimuli="shared")
    assert sub.betas(["ses-01", "ses-02"], stimuli="unique").betas.shape[0] == 15


def test_a_noise_ceiling_on_another_grid_names_its_file(tmp_path):
    make_bucket(tmp_path, subjects=1, sessions=1, trials=6, grid=(6, 7, 5), stimuli=False, seed=5)
    sub = neurocube.open_subject(tmp_path, "sub-01")
    path = Path(sub._nc_session_path("ses-01"))
    nib.Nifti1Image(np.full((4, 4, 4), 50.0, np.float32), np.eye(4)).to_filename(path)
    with pytest.raises(GridMismatchError, match=rf"{path.name}: the noise ceiling of ses-01 lies "
                       r"on a \(4, 4, 4\) grid"):
        sub.betas("ses-01", nc_threshold=10)
