"""``neurocube index build``: indexes built ahead of time into an index store on S3.

A later open of the same object with ``index_store=`` (and an empty local cache) fetches
the index from the store and reads through it: no first pass over the object.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import neurocube
from neurocube import storage
from neurocube.cli import main
from tests.fixtures.nifti import write_nifti
from tests.fixtures.remote import SECRET

SHAPE = (40, 48, 40, 60)  # 307 KB volumes, ~18 MB raw: several 4 MiB index spacings


@pytest.fixture(scope="module")
def gz_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("index-cli")
    rng = np.random.default_rng(11)
    values = (rng.normal(size=SHAPE) * 3).astype(np.float32)
    write_nifti(folder / "a.nii.gz", values, compresslevel=1)
    write_nifti(folder / "b.nii.gz", values[..., :3].copy(), compresslevel=1)
    write_nifti(folder / "c.nii", values)
    mask = np.zeros(SHAPE[:3], bool)
    mask[4:28, 5:35, 3:30] = True
    return folder, values, mask


def test_index_build_into_a_store_then_read_through_it(s3, gz_files, tmp_path, capsys,
                                                       monkeypatch):
    monkeypatch.setenv("NEUROCUBE_PROGRESS", "1")
    monkeypatch.setattr("neurocube.progress.DELAY", 0.0)  # small files: show the bar anyway
    folder, values, mask = gz_files
    urls = [s3.put(folder / n, f"data/{n}") for n in ("a.nii.gz", "b.nii.gz", "c.nii")]
    store = f"{s3.url}/indexes"
    opts = json.dumps(s3.storage_options)
    code = main(["index", "build", *urls, "--store", store, "--storage-options", opts,
                 "--cache-dir", str(tmp_path / "builder")])
    out = capsys.readouterr()
    assert code == 0, out.err
    lines = dict(line.split("\t", 1) for line in out.out.strip().splitlines())
    assert lines[urls[0]].startswith(f"{store}/a.nii.gz.") and ".gzidx" in lines[urls[0]]
    assert lines[urls[1]].startswith(f"{store}/b.nii.gz.")
    assert "no index needed" in lines[urls[2]]
    # one bar for the command, none per file
    assert "indexing 3 files" in out.err
    assert "indexing a.nii.gz" not in out.err and "indexing b.nii.gz" not in out.err
    assert "\x1b[" not in out.err and "\r" not in out.err  # stderr is no terminal: plain lines
    stored = sorted(p.rsplit("/", 1)[-1] for p in s3.fs().find(f"{s3.name}/indexes"))
    assert [p.split(".")[0] for p in stored] == ["a", "a", "b", "b"]
    assert {p.rsplit(".", 1)[-1] for p in stored} == {"gzidx", "json"}
    for name in stored:
        assert SECRET not in s3.fs().cat_file(f"{s3.name}/indexes/{name}").decode("latin1")
    assert SECRET not in out.out + out.err

    # another machine: empty local cache, the store named: the index travels, not a first pass
    storage.SHARED_BLOCKS.clear()
    s3.counter.reset()
    size = (folder / "a.nii.gz").stat().st_size
    ds = neurocube.open_nifti(urls[0], mask=mask, chunks=6, storage_options=s3.storage_options,
                              cache_dir=tmp_path / "worker", index_store=store)
    assert s3.counter.count("GET", suffix=".gzidx") == 1
    assert list((tmp_path / "worker" / "gzindex").glob("a.nii.gz.*.gzidx"))
    assert s3.counter.bytes_for("a.nii.gz") <= 64 << 10  # opening: the header only
    tail = ds.isel(trial=[SHAPE[3] - 2, SHAPE[3] - 1]).data.values  # the end, no pass before it
    assert s3.counter.bytes_for("a.nii.gz") <= 0.4 * size
    np.testing.assert_array_equal(tail, values[mask][:, -2:].T)
    got = neurocube.load(ds).data.values
    np.testing.assert_array_equal(got, values[mask].T)
    assert s3.counter.bytes_for("a.nii.gz") <= 1.05 * size


def test_index_build_of_a_local_file(gz_files, tmp_path, capsys):
    folder, _, _ = gz_files
    code = main(["index", "build", str(folder / "a.nii.gz"), "--cache-dir", str(tmp_path),
                 "--no-progress"])
    out = capsys.readouterr()
    assert code == 0, out.err
    (index,) = (tmp_path / "gzindex").glob("*.gzidx")
    assert out.out.strip() == f"{folder / 'a.nii.gz'}\t{index}"
    assert out.err == ""


def test_index_build_errors(s3, gz_files, tmp_path, capsys):
    folder, _, _ = gz_files
    url = s3.put(folder / "a.nii.gz", "held-out/a.nii.gz")
    opts = json.dumps(s3.storage_options)
    base = ["index", "build", "--cache-dir", str(tmp_path), "--no-progress"]
    with pytest.raises(SystemExit) as info:
        main([*base, url, "--storage-options", opts[:-1]])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--storage-options" in err and "not valid JSON" in err and SECRET not in err
    with pytest.raises(SystemExit) as info:
        main([*base, url, "--store-options", "[1]"])
    assert info.value.code == 2
    capsys.readouterr()
    missing = f"{s3.url}/nothing/here.nii.gz"
    s3.proxy.deny.append("held-out/")
    assert main([*base, missing, url, "--storage-options", opts]) == 1
    out = capsys.readouterr()
    assert f"{missing}: no such file" in out.err
    assert "access denied" in out.err and url in out.err
    assert "Traceback" not in out.err and SECRET not in out.err + out.out
