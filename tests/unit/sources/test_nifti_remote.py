"""NIfTI volumes read from a real S3 server (moto on loopback) and a loopback HTTP server.

Values must equal the local read; the bytes the server sent are counted by the proxy in
front of it and held to the issue's budgets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import neurocube
from neurocube import storage
from neurocube.errors import AccessDeniedError, DataNotFoundError
from tests.fixtures.nifti import AFFINE, write_nifti
from tests.fixtures.remote import SECRET

SHAPE = (40, 48, 40, 90)  # 307 KB volumes, ~27 MB raw: several 4 MiB index spacings
VOLUME = 40 * 48 * 40 * 4


@pytest.fixture(scope="module")
def session_files(tmp_path_factory):
    """A noisy float32 session (compresses like real betas: barely), as .nii and .nii.gz."""
    folder = tmp_path_factory.mktemp("remote-nifti")
    rng = np.random.default_rng(7)
    values = (rng.normal(size=SHAPE) * 3).astype(np.float32)
    values[:4] = np.nan  # NaN is data
    mask = np.zeros(SHAPE[:3], bool)
    mask[5:35, 6:40, 4:36] = rng.random((30, 34, 32)) > 0.3
    write_nifti(folder / "betas.nii", values)
    write_nifti(folder / "betas.nii.gz", values, compresslevel=1)
    nib.Nifti1Image(mask.astype(np.uint8), AFFINE).to_filename(folder / "mask.nii.gz")
    oracle = values.reshape(-1, SHAPE[3], order="F")  # (voxel in Fortran order, trial)
    return folder, values, mask, oracle


def masked_oracle(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return values[mask].T  # (trial, voxel), voxels in C order


def test_nii_gz_first_read_moves_the_object_once_and_records_the_index(s3, session_files):
    folder, values, mask, _ = session_files
    url = s3.put(folder / "betas.nii.gz", "sub-01/betas.nii.gz")
    size = (folder / "betas.nii.gz").stat().st_size
    ds = neurocube.open_nifti(url, mask=mask, storage_options=s3.storage_options)
    assert s3.counter.bytes_for("betas.nii.gz") <= 64 << 10, "opening read more than the header"
    got = neurocube.load(ds).data.values
    np.testing.assert_array_equal(got, masked_oracle(values, mask))
    assert s3.counter.bytes_for("betas.nii.gz") <= 1.02 * size
    index_dir = Path(os.environ["NEUROCUBE_CACHE_DIR"]) / "gzindex"
    assert [p.suffix for p in sorted(index_dir.iterdir())] == [".gzidx", ".json"]
    sidecar = json.loads(next(index_dir.glob("*.json")).read_text())
    assert sidecar["path"] == url and sidecar["etag"]
    assert SECRET not in next(index_dir.glob("*.json")).read_text()


def test_dask_values_of_a_remote_nii_gz_equal_the_local_read(s3, session_files):
    folder, _, mask, _ = session_files
    url = s3.put(folder / "betas.nii.gz", "b.nii.gz")
    remote = neurocube.open_nifti(url, mask=mask, chunks=8, storage_options=s3.storage_options)
    local = neurocube.open_nifti(folder / "betas.nii.gz", mask=mask, chunks=8)
    np.testing.assert_array_equal(remote.data.values, local.data.values)  # first read: streams
    np.testing.assert_array_equal(remote.data.values, local.data.values)  # through the index
    assert remote.attrs["source"] == url


def test_second_read_in_a_new_process_uses_the_index(s3, session_files, tmp_path):
    folder, values, mask, _ = session_files
    url = s3.put(folder / "betas.nii.gz", "again/betas.nii.gz")
    size = (folder / "betas.nii.gz").stat().st_size
    neurocube.load(neurocube.open_nifti(url, mask=mask, storage_options=s3.storage_options))
    s3.counter.reset()
    np.save(tmp_path / "mask.npy", mask)
    code = (
        "import json, sys, numpy as np, neurocube\n"
        "opts = json.loads(sys.argv[2])\n"
        "ds = neurocube.open_nifti(sys.argv[1], mask=np.load(sys.argv[3]), storage_options=opts)\n"
        "np.save(sys.argv[4], ds.data.values)\n"
    )
    out = tmp_path / "out.npy"
    subprocess.run(
        [sys.executable, "-c", code, url, json.dumps(s3.storage_options),
         str(tmp_path / "mask.npy"), str(out)],
        check=True, env=os.environ.copy(), timeout=300,
    )
    np.testing.assert_array_equal(np.load(out), masked_oracle(values, mask))
    assert s3.counter.bytes_for("betas.nii.gz") <= 1.05 * size


def test_nii_masked_read_moves_the_object_once(s3, session_files):
    folder, values, mask, _ = session_files
    url = s3.put(folder / "betas.nii", "plain/betas.nii")
    size = (folder / "betas.nii").stat().st_size
    ds = neurocube.open_nifti(url, mask=mask, storage_options=s3.storage_options)
    np.testing.assert_array_equal(ds.data.values, masked_oracle(values, mask))
    assert s3.counter.bytes_for("betas.nii") <= 1.02 * size


def test_mask_given_as_a_url(s3, session_files):
    folder, values, mask, _ = session_files
    url = s3.put(folder / "betas.nii", "m/betas.nii")
    mask_url = s3.put(folder / "mask.nii.gz", "m/mask.nii.gz")
    ds = neurocube.open_nifti(url, mask=mask_url, storage_options=s3.storage_options)
    assert ds.attrs["mask_source"] == mask_url
    np.testing.assert_array_equal(ds.data.values, masked_oracle(values, mask))


def test_unmasked_grid_read_over_http(http_files, session_files):
    folder, values, _, _ = session_files
    (http_files.root / "betas.nii.gz").write_bytes((folder / "betas.nii.gz").read_bytes())
    url = f"{http_files.url}/betas.nii.gz"
    ds = neurocube.open_nifti(url)
    np.testing.assert_array_equal(ds.data[..., 10:14].values, values[..., 10:14])
    np.testing.assert_array_equal(ds.data[..., 80:].values, values[..., 80:])


def test_missing_and_denied_objects(s3, session_files):
    folder, _, mask, _ = session_files
    with pytest.raises(DataNotFoundError, match=f"s3://{s3.name}/nope.nii.gz"):
        neurocube.open_nifti(f"s3://{s3.name}/nope.nii.gz", storage_options=s3.storage_options)
    url = s3.put(folder / "betas.nii.gz", "ses-held-out/betas.nii.gz")
    s3.proxy.deny.append("ses-held-out")
    with pytest.raises(AccessDeniedError, match="storage_options") as err:
        neurocube.open_nifti(url, mask=mask, storage_options=s3.storage_options)
    assert SECRET not in str(err.value)
    assert isinstance(err.value, PermissionError)


def test_specs_carry_the_options_but_text_never_shows_the_secret(s3, session_files):
    import pickle

    from dask.base import tokenize

    folder, _, mask, _ = session_files
    url = s3.put(folder / "betas.nii.gz", "p/betas.nii.gz")
    ds = neurocube.open_nifti(url, mask=mask, storage_options=s3.storage_options)
    graph = dict(ds.data.data.__dask_graph__())
    assert SECRET.encode() in pickle.dumps(graph)  # workers get the credentials...
    texts = [repr(ds), str(ds.attrs), repr(graph), str(tokenize(ds)), ds.data.data.name]
    assert not any(SECRET in t for t in texts)  # ...nothing that prints or keys them does
    assert storage.options_for(url) is not None


def _fresh_process_state():
    """Forget every block and handle this process holds, as a new process would."""
    from neurocube.sources import gzindex

    gzindex.reset_handles()
    storage.SHARED_BLOCKS.clear()


def test_indexed_subsets_fetch_only_their_volumes(s3, session_files):
    from neurocube.sources import gzindex_store

    folder, values, mask, _ = session_files
    url = s3.put(folder / "betas.nii.gz", "subset/betas.nii.gz")
    size = (folder / "betas.nii.gz").stat().st_size
    ratio = size / (VOLUME * SHAPE[3])  # compressed bytes per uncompressed byte
    ds = neurocube.open_nifti(url, mask=mask, storage_options=s3.storage_options)
    neurocube.load(ds)  # the first read records the index
    expected = masked_oracle(values, mask)
    # compressed bytes of the volumes + 2 index spacings (in compressed bytes) per run
    budget = lambda n: n * VOLUME * ratio + 2 * gzindex_store.SPACING * ratio + (2 << 20)  # noqa: E731
    for selection in (slice(85, 90), slice(40, 45), [3, 4, 5, 6, 7]):
        _fresh_process_state()
        s3.counter.reset()
        ds = neurocube.open_nifti(url, mask=mask, storage_options=s3.storage_options)
        got = ds.data.isel(trial=selection).values
        np.testing.assert_array_equal(got, expected[selection])
        sent = s3.counter.bytes_for("betas.nii.gz")
        assert sent <= budget(5), (selection, sent, budget(5), size)
        assert sent < size / 2


def test_last_trial_costs_about_the_first(s3, session_files):
    folder, values, mask, _ = session_files
    url = s3.put(folder / "betas.nii.gz", "position/betas.nii.gz")
    neurocube.load(neurocube.open_nifti(url, mask=mask, storage_options=s3.storage_options))
    sent = {}
    for trial in (0, SHAPE[3] - 1):
        _fresh_process_state()
        ds = neurocube.open_nifti(url, mask=mask, storage_options=s3.storage_options)
        s3.counter.reset()
        np.testing.assert_array_equal(
            ds.data.isel(trial=trial).values, masked_oracle(values, mask)[trial]
        )
        sent[trial] = s3.counter.bytes_for("betas.nii.gz")
    assert sent[SHAPE[3] - 1] <= 2 * max(sent[0], 1 << 20), sent


def test_nii_subset_sends_only_its_volumes(s3, session_files):
    folder, values, mask, _ = session_files
    url = s3.put(folder / "betas.nii", "plainsubset/betas.nii")
    ds = neurocube.open_nifti(url, mask=mask, storage_options=s3.storage_options)
    s3.counter.reset()
    got = ds.data.isel(trial=[10, 11, 12, 60, 89]).values
    np.testing.assert_array_equal(got, masked_oracle(values, mask)[[10, 11, 12, 60, 89]])
    assert s3.counter.bytes_for("betas.nii") == 5 * VOLUME


def test_first_read_writes_nothing_but_the_index(s3, session_files, tmp_path, monkeypatch):
    import tempfile

    folder, _, mask, _ = session_files
    url = s3.put(folder / "betas.nii.gz", "disk/betas.nii.gz")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("TMPDIR", str(scratch))
    cache = Path(os.environ["NEUROCUBE_CACHE_DIR"])
    before = {p for p in cache.rglob("*")}
    neurocube.load(neurocube.open_nifti(url, mask=mask, storage_options=s3.storage_options))
    written = sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*") if p not in before)
    assert [w.rsplit(".", 1)[-1] for w in written if "/" in w] == ["gzidx", "json"], written
    index_bytes = sum((cache / w).stat().st_size for w in written if w.endswith(".gzidx"))
    assert index_bytes < (folder / "betas.nii.gz").stat().st_size / 2
    assert list(scratch.iterdir()) == []


def test_a_connection_lost_mid_read_is_retried(s3, session_files):
    folder, values, mask, _ = session_files
    url = s3.put(folder / "betas.nii", "flaky/betas.nii")
    ds = neurocube.open_nifti(url, mask=mask, storage_options=s3.storage_options)
    s3.proxy.drop_next(2)
    np.testing.assert_array_equal(ds.data.isel(trial=[4, 50]).values,
                                  masked_oracle(values, mask)[[4, 50]])
    assert s3.counter.count("DROP") == 2


def test_a_connection_that_keeps_failing_names_the_url_and_bytes(s3, session_files):
    from neurocube.errors import StorageError

    folder, _, mask, _ = session_files
    url = s3.put(folder / "betas.nii", "down/betas.nii")
    ds = neurocube.open_nifti(url, mask=mask, storage_options=s3.storage_options)
    s3.proxy.drop_next(1000)
    with pytest.raises(StorageError, match=rf"{url}: could not read \(bytes \d+-\d+\)") as err:
        ds.data.isel(trial=3).compute()
    assert SECRET not in str(err.value)


def test_a_changed_object_gets_a_new_index_never_wrong_data(s3, session_files, tmp_path):
    from neurocube.errors import DataChangedError
    from neurocube.sources.gzindex_store import IndexRebuildWarning

    folder, values, mask, _ = session_files
    url = s3.put(folder / "betas.nii.gz", "changing/betas.nii.gz")
    before = neurocube.open_nifti(url, mask=mask, storage_options=s3.storage_options)
    neurocube.load(before)  # index of the first version
    other = values[..., :30] * 2 + 1
    write_nifti(tmp_path / "v2.nii.gz", other)
    _fresh_process_state()
    s3.put(tmp_path / "v2.nii.gz", "changing/betas.nii.gz")  # same URL, new ETag
    with pytest.raises(DataChangedError, match="changed since it was opened"):
        before.data.isel(trial=[2]).compute()  # opened before the change: refused
    with pytest.warns(IndexRebuildWarning, match="object changed since its gzip index"):
        after = neurocube.open_nifti(url, mask=mask, storage_options=s3.storage_options)
    np.testing.assert_array_equal(after.data.values, masked_oracle(other, mask))
    index_dir = Path(os.environ["NEUROCUBE_CACHE_DIR"]) / "gzindex"
    assert len(list(index_dir.glob("*.gzidx"))) == 1


@pytest.mark.parametrize("name", ["betas.nii.gz", "betas.nii"])
def test_reads_go_out_as_concurrent_range_requests(s3, session_files, name):
    """With a latency per request (a cloud region), chunks are fetched several at a time."""
    folder, values, mask, _ = session_files
    url = s3.put(folder / name, f"concurrent/{name}")
    s3.proxy.set_latency(0.02)
    ds = neurocube.open_nifti(url, mask=mask, chunks=10, storage_options=s3.storage_options)
    s3.counter.reset()
    np.testing.assert_array_equal(ds.data.values, masked_oracle(values, mask))  # first read
    assert s3.counter.max_inflight >= 2, "the read fetched one range at a time"


@pytest.mark.parametrize("how", ["load", "values"])
def test_indexed_full_reads_in_many_pieces_move_the_object_about_once(s3, session_files, how):
    """Chunks and per-thread runs restart at seek points; shared blocks keep that from costing."""
    import dask

    folder, values, mask, _ = session_files
    url = s3.put(folder / "betas.nii.gz", f"pieces-{how}/betas.nii.gz")
    size = (folder / "betas.nii.gz").stat().st_size
    neurocube.load(neurocube.open_nifti(url, mask=mask, storage_options=s3.storage_options))
    _fresh_process_state()
    s3.counter.reset()
    ds = neurocube.open_nifti(url, mask=mask, chunks=8, storage_options=s3.storage_options)
    with dask.config.set(scheduler="threads", num_workers=2):
        got = neurocube.load(ds).data.values if how == "load" else ds.data.values
    np.testing.assert_array_equal(got, masked_oracle(values, mask))
    assert s3.counter.bytes_for("betas.nii.gz") <= 1.05 * size
