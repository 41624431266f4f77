"""Secrets audit: a planted secret in ``storage_options`` must show up nowhere.

Open a subject bucket, a NIfTI and a spectral HDF5 from S3 with explicit options that hold
``SECRET``; cache a selection into an ``s3://`` store and a local one and reopen it; trigger
a missing object and a 403; then search every text a user or a log could see: reprs, attrs,
cache keys, every file the cache wrote (read back), error messages, warnings, logs and the
output of ``neurocube cache ls``.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import dask.base
import numpy as np
import pytest

import neurocube
from neurocube.caching.keys import fingerprint
from neurocube.cli import main
from neurocube.synthetic.bucket import make_bucket
from tests.fixtures.nifti import write_nifti
from tests.fixtures.remote import KEY, SECRET
from tests.unit.datasets.test_spectral import write_cache


def test_the_secret_appears_nowhere(s3, tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    opts = s3.storage_options
    assert SECRET in json.dumps(opts)  # the audit is meaningful
    texts: list[str] = []
    written: dict[str, bytes] = {}

    truth = make_bucket(tmp_path / "bucket", subjects=1, sessions=2, trials=8, grid=(5, 6, 4),
                        seed=1)
    bucket = s3.put(truth.root, "bucket")
    values = np.random.default_rng(2).normal(size=(6, 5, 4, 10)).astype(np.float32)
    write_nifti(tmp_path / "betas.nii.gz", values, compresslevel=1)
    write_cache(tmp_path / "spectral.h5")
    nii = s3.put(tmp_path / "betas.nii.gz", "files/betas.nii.gz")
    h5 = s3.put(tmp_path / "spectral.h5", "files/spectral.h5")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sub = neurocube.open_subject(bucket, "sub-01", storage_options=opts)
        betas = sub.betas("ses-01")
        texts += [repr(sub), repr(betas), str(betas.attrs)]
        meta = sub.metadata
        texts += [repr(meta)]
        ds = neurocube.open_nifti(nii, storage_options=opts, chunks=4)
        spectral = neurocube.open_spectral(h5, storage_options=opts)
        texts += [repr(ds), str(ds.attrs), repr(ds.data.data), repr(spectral),
                  str(spectral.attrs), dask.base.tokenize(ds), dask.base.tokenize(spectral)]
        selection = ds.isel(trial=slice(2, 7))
        texts.append(fingerprint(selection).key)
        texts.append(json.dumps(fingerprint(selection).sources))

        # cache into an s3:// store and a local store, reopen both
        store = f"{s3.url}/cache"
        remote = neurocube.cache(selection, store=store, storage_options=opts, key="sel")
        auto = neurocube.cache(spectral, store=store, storage_options=opts)
        local = neurocube.cache(selection, store=tmp_path / "cache")
        np.testing.assert_array_equal(remote.data.values, values[..., 2:7])
        np.testing.assert_array_equal(local.data.values, remote.data.values)
        again = neurocube.open_cached("sel", store=store, storage_options=opts)
        np.testing.assert_array_equal(again.data.values, remote.data.values)
        texts += [repr(remote), str(remote.attrs), repr(auto), repr(local), repr(again)]
        info_remote = neurocube.cache_info(store=store, storage_options=opts)
        info_local = neurocube.cache_info(store=tmp_path / "cache")
        texts += [info_remote.to_string(), repr(info_remote.attrs), info_local.to_string()]
        texts += list(info_remote.key) + list(info_local.key)

        # errors: a missing object, a held-out (403) one, a missing entry
        errors: list[BaseException] = []
        for call in (
            lambda: neurocube.open_nifti(f"{s3.url}/files/none.nii.gz", storage_options=opts),
            lambda: neurocube.open_spectral(f"{s3.url}/files/none.h5", storage_options=opts),
            lambda: neurocube.open_cached("nothing", store=store, storage_options=opts),
        ):
            with pytest.raises(Exception) as info:
                call()
            errors.append(info.value)
        s3.proxy.deny.append("files/")
        for call in (
            lambda: neurocube.open_nifti(nii, storage_options=opts),
            lambda: neurocube.open_spectral(h5, storage_options=opts),
            lambda: neurocube.open_cached("sel", store=store, storage_options=opts),
        ):
            with pytest.raises(Exception) as info:
                call()
            errors.append(info.value)
        s3.proxy.deny.clear()
        assert any(isinstance(e, PermissionError) for e in errors)
        for exc in errors:
            chain: BaseException | None = exc
            while chain is not None:  # the whole chain, as a traceback would print it
                texts += [str(chain), repr(chain)]
                chain = chain.__cause__ or chain.__context__

    texts += [str(w.message) for w in caught]

    # every file the cache wrote, read back: S3 store and local store
    fs = s3.fs()
    for path in fs.find(f"{s3.name}/cache"):
        written[path] = fs.cat_file(path)
    for path in Path(tmp_path / "cache").rglob("*"):
        if path.is_file():
            written[str(path)] = path.read_bytes()
    assert any(p.endswith("zarr.json") for p in written)
    assert any(p.endswith(".neurocube/entry.json") for p in written)

    # the command line
    capsys.readouterr()
    assert main(["cache", "ls", "-l", "--store", store, "--storage-options", json.dumps(opts)]) == 0
    out = capsys.readouterr()
    assert "sel" in out.out
    texts += [out.out, out.err]
    assert caplog.records  # the backends' DEBUG logs were captured too
    texts += [r.getMessage() for r in caplog.records] + [caplog.text]

    leaks = [t for t in texts if SECRET in t]
    assert not leaks, leaks[:3]
    files = [p for p, data in written.items() if SECRET.encode() in data]
    assert not files, files
    assert not [p for p, data in written.items() if KEY.encode() in data]
