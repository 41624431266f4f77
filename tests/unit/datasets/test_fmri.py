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
