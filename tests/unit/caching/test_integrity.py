"""Complete-or-rejected cache entries: checksums, manifest, `cache verify`, old entries."""

from __future__ import annotations

import json
import shutil
import warnings

import dask.array as da
import numpy as np
import pytest
import xarray as xr

import neurocube
from neurocube import cache_cli
from neurocube.caching.integrity import ChunkArray
from neurocube.caching.store import MARKER_NAME, open_root
from neurocube.cli import main
from neurocube.errors import CacheError, CorruptDataError, NeurocubeWarning


def _dataset() -> xr.Dataset:
    values = np.arange(6 * 40, dtype=np.float32).reshape(6, 40) / 7
    return xr.Dataset(
        {
            "data": (("trial", "voxel"), da.from_array(values, chunks=(2, 40))),
            "other": (("trial",), da.from_array(np.arange(6.0) * 3, chunks=2)),
        },
        coords={"trial": np.arange(6), "label": ("trial", [f"img{i}" for i in range(6)]),
                "i": ("voxel", np.arange(40, dtype=np.int32))},
        attrs={"neurocube_sources": []},
    )  # fmt: skip


@pytest.fixture
def entry(tmp_path, monkeypatch):
    # small stored chunks: several chunk files per variable
    monkeypatch.setattr("neurocube.caching.core.MIN_CHUNK_BYTES", 1)
    ds = _dataset()
    neurocube.cache(ds, store=tmp_path, key="k")
    return tmp_path, tmp_path / "k.zarr", ds


def _flip(path, at=-10):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


def test_every_chunk_is_stored_with_crc32c_and_listed_in_the_manifest(entry):
    _, folder, _ = entry
    marker = json.loads((folder / MARKER_NAME).read_text())
    files = marker["manifest"]["files"]
    chunks = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                    if p.is_file() and "/c/" in "/" + p.relative_to(folder).as_posix())  # fmt: skip
    assert chunks and set(chunks) <= set(files)
    assert {"data/c/0/0", "data/c/1/0", "data/c/2/0"} <= set(files)
    variables = marker["manifest"]["variables"]
    assert variables["data"]["shape"] == [6, 40] and variables["data"]["chunks"] == [2, 40]
    assert variables["data"]["dims"] == ["trial", "voxel"]
    assert variables["data"]["dtype"] == "float32"
    for name in ("data", "other", "label", "i", "trial"):
        meta = json.loads((folder / name / "zarr.json").read_text())
        assert meta["codecs"][-1]["name"] == "crc32c", name


def test_a_flipped_bit_is_a_corrupt_data_error_naming_entry_and_chunk(entry):
    store, folder, ds = entry
    _flip(folder / "data" / "c" / "1" / "0")
    reopened = neurocube.open_cached("k", store=store)  # same size: the listing passes
    np.testing.assert_array_equal(reopened.data[:2].values, ds.data[:2].values)  # chunk 0 fine
    with pytest.raises(CorruptDataError, match=r"'k'.*chunk data/c/1/0 failed its crc32c"):
        _ = reopened.data.values
    # through plain zarr the same bytes fail Zarr's own crc32c codec
    with pytest.raises(ValueError, match="checksum"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr's note about the .neurocube folder
        _ = xr.open_zarr(folder, consolidated=False).data.values


def test_a_flipped_bit_in_an_in_memory_coordinate_fails_at_reopen(entry):
    store, folder, _ = entry
    _flip(folder / "i" / "c" / "0")
    with pytest.raises(CorruptDataError, match=r"chunk i/c/0"):
        neurocube.open_cached("k", store=store)


@pytest.mark.parametrize("damage", ["chunk", "variable", "string chunk"])
def test_a_missing_chunk_or_variable_makes_the_entry_incomplete(entry, damage):
    store, folder, ds = entry
    if damage == "chunk":
        (folder / "data" / "c" / "2" / "0").unlink()
        match = r"incomplete: chunk data/c/2/0 missing"
    elif damage == "variable":
        shutil.rmtree(folder / "other")
        match = r"incomplete: variable\(s\) 'other' are missing"
    else:
        (folder / "label" / "c" / "0").unlink()
        match = r"incomplete: chunk label/c/0 missing"
    with pytest.raises(CacheError, match=match) as info:
        neurocube.open_cached("k", store=store)
    assert "neurocube.cache(obj, key='k')" in str(info.value)
    assert neurocube.cache_info(store=store)["status"].tolist() == ["incomplete"]
    with pytest.warns(NeurocubeWarning, match="Rebuilding it from the sources"):
        rebuilt = neurocube.cache(ds, store=store, key="k")
    xr.testing.assert_identical(rebuilt.compute(), ds.compute())
    assert neurocube.cache_info(store=store)["status"].tolist() == ["complete"]
    xr.testing.assert_identical(neurocube.open_cached("k", store=store).compute(), ds.compute())


def test_a_chunk_deleted_after_reopen_is_an_error_not_nan(entry):
    store, folder, _ = entry
    reopened = neurocube.open_cached("k", store=store)
    (folder / "data" / "c" / "1" / "0").unlink()
    (folder / "other" / "c" / "0").unlink()
    with pytest.raises(CacheError, match=r"data/c/1/0 is missing.*never filled"):
        _ = reopened.data.values
    with pytest.raises(CacheError, match=r"other/c/0 is missing"):
        _ = reopened.other.values


@pytest.mark.parametrize("what", ["empty chunk", "garbage zarr.json", "truncated chunk"])
def test_damaged_files_are_neurocube_errors_naming_the_entry(entry, what):
    store, folder, ds = entry
    if what == "empty chunk":
        (folder / "data" / "c" / "0" / "0").write_bytes(b"")
    elif what == "garbage zarr.json":
        (folder / "data" / "zarr.json").write_text("{not json at all")
    else:
        path = folder / "data" / "c" / "0" / "0"
        path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(CorruptDataError, match=r"cache entry 'k' .*k\.zarr.*damaged"):
        neurocube.open_cached("k", store=store)
    assert neurocube.cache_info(store=store)["status"].tolist() == ["damaged"]
    with pytest.warns(NeurocubeWarning, match="damaged"):
        rebuilt = neurocube.cache(ds, store=store, key="k")
    xr.testing.assert_identical(rebuilt.compute(), ds.compute())


def test_same_size_garbage_in_zarr_json_is_caught_by_its_crc(entry):
    store, folder, _ = entry
    path = folder / "data" / "zarr.json"
    text = path.read_text()
    damaged = text.replace('"float32"', '"float64"').replace("dimension_names", "dimension_nameX")
    path.write_text(damaged)
    with pytest.raises(CorruptDataError, match=r"data/zarr.json differs from what was written"):
        neurocube.open_cached("k", store=store)


def test_a_damaged_marker_is_refused_and_rebuilt(entry):
    store, folder, ds = entry
    marker = json.loads((folder / MARKER_NAME).read_text())
    marker["string_dtypes"]["label"] = "<U2"  # would truncate the labels: the checksum says no
    (folder / MARKER_NAME).write_text(json.dumps(marker))
    with pytest.raises(CacheError, match="completion marker is damaged"):
        neurocube.open_cached("k", store=store)
    assert neurocube.cache_info(store=store)["status"].tolist() == ["damaged"]
    rebuilt = neurocube.cache(ds, store=store, key="k")
    xr.testing.assert_identical(rebuilt.compute(), ds.compute())


def test_an_entry_of_the_previous_format_is_stale_and_rebuilt(entry):
    store, folder, ds = entry
    marker = json.loads((folder / MARKER_NAME).read_text())
    old = {k: v for k, v in marker.items() if k not in ("manifest", "checksum")}
    old["format"] = 1  # what neurocube wrote before entries had checksums
    (folder / MARKER_NAME).write_text(json.dumps(old))
    assert neurocube.cache_info(store=store)["status"].tolist() == ["stale"]
    with pytest.raises(CacheError, match="another cache format"):
        neurocube.open_cached("k", store=store)
    rebuilt = neurocube.cache(ds, store=store, key="k")
    xr.testing.assert_identical(rebuilt.compute(), ds.compute())
    assert neurocube.cache_info(store=store)["status"].tolist() == ["complete"]


def test_cache_verify_reports_damage_and_exits_non_zero(entry, capsys):
    store, folder, ds = entry
    neurocube.cache(ds.isel(trial=[0, 1]), store=store, key="sound")
    assert main(["cache", "verify", "--store", str(store)]) == 0
    assert "ok       k" in capsys.readouterr().out
    _flip(folder / "data" / "c" / "2" / "0")
    _flip(folder / "label" / "zarr.json", at=5)
    assert main(["cache", "verify", "--store", str(store)]) == 1
    out = capsys.readouterr()
    assert "DAMAGED  k" in out.out and "data/c/2/0: crc32c mismatch" in out.out
    assert "label/zarr.json: differs from what was written" in out.out
    assert "ok       sound" in out.out and "1 damaged" in out.err
    assert main(["cache", "verify", "sound", "--store", str(store)]) == 0
    capsys.readouterr()
    assert main(["cache", "verify", "nope", "--store", str(store)]) != 0
    assert "no cache entry named 'nope'" in capsys.readouterr().err


def test_cli_clear_needs_all_or_a_filter_and_has_dry_run(entry, capsys):
    store, folder, ds = entry
    assert main(["cache", "clear", "--store", str(store)]) == 2
    assert "nothing removed" in capsys.readouterr().err and folder.exists()
    assert main(["cache", "clear", "--all", "--dry-run", "--store", str(store)]) == 0
    assert capsys.readouterr().out.strip() == "would remove k" and folder.exists()
    (folder / "data" / "c" / "0" / "0").unlink()
    neurocube.cache(ds.isel(trial=[0]), store=store, key="fine")
    assert main(["cache", "clear", "--status", "incomplete", "--store", str(store)]) == 0
    assert capsys.readouterr().out.strip() == "removed k" and not folder.exists()
    assert main(["cache", "clear", "--key", "fine", "--store", str(store)]) == 0
    assert neurocube.cache_info(store=store).empty


def test_cli_counts_gzip_indexes_beside_the_cache(tmp_path, capsys):
    root = tmp_path / "nc"
    (root / "gzindex").mkdir(parents=True)
    (root / "gzindex" / "b.nii.gz.abc.gzidx").write_bytes(b"x" * 3000)
    (root / "gzindex" / "b.nii.gz.abc.json").write_bytes(b"{}")
    neurocube.cache(_dataset(), store=root / "zarr", key="e")
    assert main(["cache", "du", "--store", str(root / "zarr")]) == 0
    assert "1 entries" in (out := capsys.readouterr().out) and "1 gzip indexes (2.9 KiB)" in out
    assert main(["cache", "ls", "--store", str(root / "zarr")]) == 0
    assert "b.nii.gz.abc.gzidx" in (out := capsys.readouterr().out) and "gzip index" in out
    assert main(["cache", "evict", "0", "--dry-run", "--store", str(root / "zarr")]) == 0
    assert "would evict b.nii.gz.abc.gzidx" in capsys.readouterr().out
    assert (root / "gzindex" / "b.nii.gz.abc.gzidx").exists()
    assert main(["cache", "evict", "0", "--store", str(root / "zarr")]) == 0
    assert not list((root / "gzindex").iterdir()) and not (root / "zarr" / "e.zarr").exists()


@pytest.mark.parametrize("action", ["ls", "du", "verify", "clear", "evict"])
def test_every_cache_subcommand_help_is_plain_text_with_defaults(action, capsys):
    with pytest.raises(SystemExit) as info:
        main(["cache", action, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "--store" in out and "default" in out


def test_direct_reader_matches_numpy_indexing(entry):
    store, folder, ds = entry
    root = open_root(store)
    marker = json.loads((folder / MARKER_NAME).read_text())
    spec = marker["manifest"]["variables"]["data"]
    reader = ChunkArray(root, str(folder), "k", "data", spec, np.dtype("float32"))
    want = ds.data.values
    for key in [(slice(None),), (slice(1, 5), slice(3, 30)), (3,), (np.array([0, 5, 2]),),
                (slice(None, None, 2), np.array([1, 39])), (np.array([True] * 3 + [False] * 3),),
                (Ellipsis, 7), (slice(4, 2),)]:  # fmt: skip
        np.testing.assert_array_equal(reader[key], want[key])
    assert cache_cli is not None


def test_a_damaged_last_use_record_costs_only_the_hit_count(entry):
    store, folder, ds = entry
    (folder / ".neurocube" / "last_use.json").write_text('{"hits": "many", "last_used_unix": []}')
    xr.testing.assert_identical(neurocube.open_cached("k", store=store).compute(), ds.compute())
    info = neurocube.cache_info(store=store)
    assert info["status"].tolist() == ["complete"] and info["hits"].tolist() == [1]
