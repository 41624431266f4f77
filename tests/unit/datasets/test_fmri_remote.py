"""A betas bucket on a real S3 server (moto on loopback, behind a counting proxy).

Every value read from ``s3://`` is compared with the local read of the same files; the
proxy counts what travels: the scan is a few listings (no request per file), opening a
subject reads trial tables and sidecars only, and a held-out session answers 403.
"""

from __future__ import annotations

import inspect
import pickle
import warnings

import dask
import numpy as np
import pandas as pd
import pytest

import neurocube
from neurocube import storage
from neurocube.catalog.fmri import scan_bucket
from neurocube.errors import AccessDeniedError, DataNotFoundError, SelectionError
from neurocube.synthetic.bucket import make_bucket
from tests.fixtures.remote import SECRET

ROOT_KEY = "bucket-root"


def _remote_nifti_ready() -> bool:
    """True once open_nifti / read_volume take storage_options (the lead's branch)."""
    from neurocube.ops.masks import read_volume

    return all(
        "storage_options" in inspect.signature(f).parameters
        for f in (neurocube.open_nifti, read_volume)
    )


needs_remote_nifti = pytest.mark.skipif(
    not _remote_nifti_ready(),
    reason="open_nifti/read_volume do not take storage_options yet (lead's nifti branch)",
)


@pytest.fixture(scope="module")
def local_bucket(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote-bucket")
    return make_bucket(root, subjects=2, sessions=3, trials=12, grid=(6, 7, 5), seed=3)


def _relative(table: pd.DataFrame, root: str) -> pd.DataFrame:
    out = table.copy()
    out["path"] = [storage.relative(p, root) for p in out["path"]]
    return out


def _list_requests(counter) -> int:
    return counter.count("GET", query="list-type")


# ------------------------------------------------------------------ catalog


def test_scan_over_s3_equals_the_local_scan(local_bucket, s3):
    url = s3.put(local_bucket.root, ROOT_KEY)
    local = scan_bucket(local_bucket.root)
    remote = scan_bucket(url, s3.storage_options)
    assert all(p.startswith(url + "/") for p in remote["path"])
    pd.testing.assert_frame_equal(_relative(remote, url), _relative(local, str(local_bucket.root)))
    # names only: listings, no HEAD and no GET of any object
    requests = s3.counter.requests
    assert requests and all(m == "GET" and "list-type" in p for m, p, _, _ in requests), requests
    assert s3.counter.count("HEAD") == 0


def test_scan_listings_do_not_grow_with_the_files(tmp_path, s3):
    counts = []
    for sessions, key in ((1, "small"), (6, "large")):
        root = tmp_path / key
        make_bucket(root, subjects=2, sessions=sessions, trials=4, grid=(4, 4, 4),
                    embedding_models=("CLIP",))
        url = s3.put(root, key)
        table = scan_bucket(url, s3.storage_options)
        assert (table.kind == "betas").sum() == 2 * sessions
        counts.append((len(table), _list_requests(s3.counter), len(s3.counter.requests)))
    (small_files, small_lists, small_all), (large_files, large_lists, large_all) = counts
    assert large_files >= small_files + 25
    # one listing of the root, of derivatives/, of derivatives/freesurfer/ and one recursive
    # listing per other folder: the same count whatever the number of files
    assert small_lists == large_lists == small_all == large_all
    assert large_lists <= 8


def test_missing_root_and_subject_name_the_url(local_bucket, s3):
    url = s3.put(local_bucket.root, ROOT_KEY)
    missing = f"{s3.url}/no-such-root"
    with pytest.raises(DataNotFoundError, match=f"{missing}: not a folder"):
        scan_bucket(missing, s3.storage_options)
    with pytest.raises(DataNotFoundError, match="no-such-root"):
        neurocube.open_subject(missing, "sub-01", storage_options=s3.storage_options)
    with pytest.raises(SelectionError, match=rf"{url}: no subject 'sub-07'"):
        neurocube.open_subject(url, "sub-07", storage_options=s3.storage_options)
    with pytest.raises(SelectionError, match=rf"{url}: subject index 4 out of range"):
        neurocube.open_subject(url, 4, storage_options=s3.storage_options)


# ------------------------------------------------------------------ subject, trial tables


def test_open_subject_reads_trial_tables_and_sidecars_only(local_bucket, s3):
    url = s3.put(local_bucket.root, ROOT_KEY)
    sub = neurocube.open_subject(url, "sub-02", storage_options=s3.storage_options)
    local = neurocube.open_subject(local_bucket.root, "sub-02")
    assert sub.sessions == local.sessions == ["ses-01", "ses-02", "ses-03"]
    assert sub.root == url and isinstance(local.root, type(local_bucket.root))
    assert storage.options_for(f"{url}/derivatives/x.nii.gz") == sub.storage_options
    pd.testing.assert_frame_equal(sub.metadata, local.metadata)
    pd.testing.assert_frame_equal(_relative(sub.files, url),
                                  _relative(local.files, str(local_bucket.root)))
    assert sub.n_stimuli() == local.n_stimuli() and sub.n_stimuli("shared") > 0
    pd.testing.assert_frame_equal(sub.captions, local.captions)
    # what travelled: listings, the trial tables and the stimuli CSV; no volume, no HDF5
    got = [p for m, p, n, _ in s3.counter.requests if m == "GET" and "list-type" not in p]
    read = {p.rsplit("/", 1)[-1] for p in got}
    assert len(got) == len(read)  # each file once
    assert {p for p in read if p.endswith(".tsv")} == {
        f"sub-02_ses-0{i}_task-images_desc-SingletrialBetas_trials.tsv" for i in (1, 2, 3)
    }
    assert read - {p for p in read if p.endswith(".tsv")} == {
        "task-images_metadata.csv", "task-images_desc-captions.csv"
    }
    sidecars = sum(
        (local_bucket.root / storage.relative(f, url)).stat().st_size
        for f in sub.files["path"] if f.endswith(".tsv")
    )
    assert s3.counter.bytes_for(".tsv") == sidecars  # each table once, nothing more
    assert s3.counter.bytes_for(".nii.gz") == 0 and s3.counter.bytes_for(".h5") == 0
    # credentials never show
    assert SECRET not in repr(sub) and SECRET not in repr(sub.storage_options)
    assert SECRET not in str(sub.files.to_numpy()) and SECRET not in str(sub.metadata)


def test_open_subjects_and_surface_rois(local_bucket, s3):
    url = s3.put(local_bucket.root, ROOT_KEY)
    subs = neurocube.open_subjects(url, storage_options=s3.storage_options)
    assert [s.subject_id for s in subs] == ["sub-01", "sub-02"]
    assert all(s.storage_options == subs[0].storage_options for s in subs)
    local = neurocube.open_subject(local_bucket.root, "sub-01")
    remote = subs[0]
    assert remote.roi_categories("any") == local.roi_categories("any")
    got = remote.roi_data("all", format="gii")
    want = local.roi_data("all", format="gii")
    assert got.keys() == want.keys() and got
    for roi, entry in want.items():
        for hemi, kinds in entry.get("gii", {}).items():
            for kind, values in kinds.items():
                np.testing.assert_array_equal(got[roi]["gii"][hemi][kind], values)
    assert remote.has_freesurfer() and remote.freesurfer_dir() == (
        f"{url}/derivatives/freesurfer/sub-01"
    )
    assert remote.anatomical_dir() == f"{url}/derivatives/anatomical/sub-01"


def test_held_out_session_is_access_denied(local_bucket, s3):
    url = s3.put(local_bucket.root, ROOT_KEY)
    s3.proxy.deny.append("sub-01/ses-02/")
    sub = neurocube.open_subject(url, "sub-01", storage_options=s3.storage_options)
    assert sub.sessions == ["ses-01", "ses-02", "ses-03"]  # the listing still shows it
    with pytest.warns(neurocube.errors.NeurocubeWarning, match=r"access denied .*\['ses-02'\]"):
        meta = sub.metadata
    assert sorted(set(meta.session)) == ["ses-01", "ses-03"]
    local = neurocube.open_subject(local_bucket.root, "sub-01").metadata
    want = local[local.session != "ses-02"].reset_index(drop=True)
    pd.testing.assert_frame_equal(meta.reset_index(drop=True), want)
    with pytest.raises(AccessDeniedError, match=r"access denied to session ses-02") as info:
        sub.betas("ses-02")
    assert isinstance(info.value, PermissionError)
    assert "sub-01/ses-02/func/" in str(info.value) and "storage_options" in str(info.value)
    assert SECRET not in str(info.value)
    with pytest.raises(AccessDeniedError):
        sub.betas(None)  # every session: the held-out one included


# ------------------------------------------------------------------ stimuli


def test_stimuli_over_s3_equal_the_local_files(local_bucket, s3):
    url = s3.put(local_bucket.root, ROOT_KEY)
    sub = neurocube.open_subject(url, "sub-01", storage_options=s3.storage_options)
    local = neurocube.open_subject(local_bucket.root, "sub-01")
    s3.counter.reset()
    emb = sub.stimulus_embeddings("CLIP")
    built = s3.counter.total_bytes
    want = local.stimulus_embeddings("CLIP")
    assert emb.embedding.dtype == np.float16
    np.testing.assert_array_equal(emb.embedding.values, want.embedding.values)
    np.testing.assert_array_equal(emb.embedding_valid.values, want.embedding_valid.values)
    assert emb.attrs["neurocube_sources"] == [f"{url}/stimuli/task-images_desc-CLIP_embeddings.h5"]
    h5_size = (local_bucket.root / "stimuli/task-images_desc-CLIP_embeddings.h5").stat().st_size
    assert built <= h5_size + 64 * 1024  # the graph build reads what HDF5 asks for
    images = sub.images
    assert len(images) == len(local.images)
    for trial in (0, 5, len(images) - 1):
        assert images[trial] == local.images[trial]
    assert images.to_pil(3).size == local.images.to_pil(3).size
    np.testing.assert_array_equal(images.to_dask(trials_per_chunk=5).compute(),
                                  local.images.to_dask(trials_per_chunk=5).compute())
    seg, seg_local = sub.segmentations, local.segmentations
    np.testing.assert_array_equal(seg.masks.values, seg_local.masks.values)
    for name in seg_local.coords:
        np.testing.assert_array_equal(seg[name].values, seg_local[name].values)
    assert seg.attrs["neurocube_sources"][1] == (
        f"{url}/stimuli/task-images_desc-segmentations_metadata.csv"
    )
    # the specs carry the options (workers read with them), their text never does
    spec = images._spec
    assert spec.storage_options == storage.as_options(s3.storage_options)
    assert SECRET not in repr(spec) and SECRET not in dask.base.tokenize(spec)
    assert pickle.loads(pickle.dumps(spec)) == spec
    for text in (repr(emb), str(emb.attrs), repr(seg), repr(images)):
        assert SECRET not in text


def test_stimuli_read_in_worker_processes(local_bucket, s3):
    url = s3.put(local_bucket.root, ROOT_KEY)
    sub = neurocube.open_subject(url, "sub-02", storage_options=s3.storage_options)
    want = neurocube.open_subject(local_bucket.root, "sub-02").stimulus_embeddings("DINOv2")
    emb = sub.stimulus_embeddings("DINOv2", trials_per_chunk=7)
    with dask.config.set(scheduler="processes", num_workers=2):
        values = emb.embedding.compute().values
    np.testing.assert_array_equal(values, want.embedding.values)


def test_missing_and_denied_stimuli(local_bucket, s3):
    url = s3.put(local_bucket.root, ROOT_KEY)
    sub = neurocube.open_subject(url, "sub-01", storage_options=s3.storage_options)
    s3.proxy.deny.append("task-images_stimuli.h5")
    with pytest.raises(AccessDeniedError, match=r"task-images_stimuli\.h5"):
        _ = sub.images
    s3.fs().rm(f"{s3.name}/{ROOT_KEY}/stimuli/task-images_desc-CLIP_embeddings.h5")
    with pytest.raises(DataNotFoundError, match=r"task-images_desc-CLIP_embeddings\.h5"):
        sub.stimulus_embeddings("CLIP")


# ------------------------------------------------------------------ betas (lead's nifti branch)


@needs_remote_nifti
def test_betas_noise_ceiling_and_roi_means_over_s3(tmp_path, s3):
    truth = make_bucket(tmp_path / "b", subjects=2, sessions=2, trials=30, grid=(24, 24, 20),
                        seed=5, embedding_models=("CLIP",))
    url = s3.put(truth.root, ROOT_KEY)
    opts = s3.storage_options
    sub = neurocube.open_subject(url, "sub-01", storage_options=opts)
    local = neurocube.open_subject(truth.root, "sub-01")
    s3.counter.reset()
    ds = sub.betas(["ses-01", "ses-02"], roi="face", nc_threshold=10)
    # building the graph reads headers, masks and noise ceilings: at most a header's block
    # per betas file, never its volumes
    for ses in ("ses-01", "ses-02"):
        name = storage.basename(sub.betas_path(ses))
        size = (truth.root / storage.relative(sub.betas_path(ses), url)).stat().st_size
        assert size > 256 * 1024
        assert s3.counter.bytes_for(name) <= storage.SMALL_BLOCK, name
    want = local.betas(["ses-01", "ses-02"], roi="face", nc_threshold=10)
    np.testing.assert_array_equal(ds.betas.values, want.betas.values)
    for name in ("image_name", "session", "i", "j", "k"):
        np.testing.assert_array_equal(ds[name].values, want[name].values)
    assert all(p.startswith(url) for p in ds.attrs["neurocube_sources"])
    assert SECRET not in str(ds.attrs) and SECRET not in repr(ds)
    nc = sub.noise_ceiling(["ses-01", "ses-02"], roi="face")
    np.testing.assert_array_equal(nc.noise_ceiling.values,
                                  local.noise_ceiling(["ses-01", "ses-02"], roi="face")
                                  .noise_ceiling.values)
    subs = neurocube.open_subjects(url, storage_options=opts)
    got = neurocube.roi_means(subs, "face", session="ses-01")
    ref = neurocube.roi_means(neurocube.open_subjects(truth.root), "face", session="ses-01")
    np.testing.assert_allclose(got.roi_mean.values, ref.roi_mean.values, rtol=1e-6)
    with dask.config.set(scheduler="processes", num_workers=2):
        np.testing.assert_array_equal(
            sub.betas("ses-02", roi="place").betas.compute().values,
            local.betas("ses-02", roi="place").betas.values,
        )
    # a held-out betas file (its trial table readable): 403 when that session is read
    s3.proxy.deny.append(storage.relative(sub.betas_path("ses-02"), s3.url))
    fresh = neurocube.open_subject(url, "sub-01", storage_options=opts)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(AccessDeniedError, match="SingletrialBetas"):
            fresh.betas("ses-02", roi="face").betas.values  # noqa: B018
    assert not [w for w in caught if "access denied" in str(w.message)]  # the tables are readable
    np.testing.assert_array_equal(fresh.betas("ses-01", roi="face").betas.values,
                                  local.betas("ses-01", roi="face").betas.values)


def test_remote_embeddings_move_only_the_rows_needed(tmp_path, s3):
    import h5py

    from neurocube.sources.stimuli import open_trial_embeddings

    n, d = 40_000, 128
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((n, d)).astype(np.float16)
    ids = np.asarray([f"img{i:05d}" for i in range(n)], dtype="S8")
    path = tmp_path / "task-images_desc-Big_embeddings.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("embedding", data=matrix, chunks=(1000, d))
        h5.create_dataset("image_ids", data=ids)
        h5.create_dataset("valid", data=np.ones(n, dtype=bool))
    size = path.stat().st_size
    assert size > 10 * 2**20
    url = s3.put(path, "stimuli/big.h5")
    names = np.asarray(["img30500", "img20003", "missing", "img30500"])
    values, valid = open_trial_embeddings(url, names, trials_per_chunk=2,
                                          storage_options=s3.storage_options)
    built = s3.counter.total_bytes
    assert built < 2**20  # the header, the ids and the flags (~0.4 MB), not the matrix
    got = values.compute()
    np.testing.assert_array_equal(got[[0, 1, 3]], matrix[[30500, 20003, 30500]])
    assert np.isnan(got[2]).all() and valid.tolist() == [True, True, False, True]
    # two 1000-row chunks (256 KB each) in 1 MiB blocks, plus readahead: far from the file
    assert s3.counter.total_bytes - built < 6 * 2**20
