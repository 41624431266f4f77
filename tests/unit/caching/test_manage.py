"""cache_info, evict_cache, clear_cache and `neurocube cache ...`."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import dask.array as da
import numpy as np
import pytest
import xarray as xr

import neurocube
from neurocube import cache_cli
from neurocube.caching.manage import parse_age, parse_size
from neurocube.caching.store import LAST_USE_NAME
from neurocube.errors import CacheError

from .conftest import make_betas


def _dataset(n: int, seed: int) -> xr.Dataset:
    values = np.random.default_rng(seed).standard_normal((n, 50))  # incompressible
    return xr.Dataset(
        {"data": (("trial", "voxel"), da.from_array(values, chunks=(10, 50)))},
        attrs={"neurocube_sources": []},
    )


def _age(store, key: str, seconds: float) -> None:
    """Pretend entry ``key`` was last used ``seconds`` ago."""
    path = store / f"{key}.zarr" / LAST_USE_NAME
    record = json.loads(path.read_text())
    record["last_used_unix"] = time.time() - seconds
    path.write_text(json.dumps(record))


def test_cache_info_lists_sizes_sources_and_hits(tmp_path):
    path = make_betas(tmp_path / "b.nii")
    store = tmp_path / "c"
    neurocube.cache(neurocube.open_nifti(path), store=store, key="betas")
    neurocube.cache(neurocube.open_nifti(path), store=store, key="betas")  # a hit
    neurocube.cache(_dataset(40, 0).data.rename("noise"), store=store, key="noise")
    info = neurocube.cache_info(store=store)
    assert info["key"].tolist() == ["noise", "betas"]  # most recently used first
    betas = info.set_index("key").loc["betas"]
    assert betas["status"] == "complete"
    assert betas["sources"] == [str(path.resolve())]
    assert betas["hits"] == 2
    assert betas["nbytes"] == neurocube.open_nifti(path).nbytes == 4 * 5 * 6 * 10 * 4 + 10 * 8
    assert betas["size_bytes"] > 0
    noise = info.set_index("key").loc["noise"]
    assert noise["kind"] == "DataArray" and noise["variables"] == ["noise"]
    assert noise["size_bytes"] >= 40 * 50 * 8  # random doubles do not compress
    assert info.attrs["total_bytes"] == info["size_bytes"].sum()
    assert info.attrs["root"] == str(store)


def test_cache_info_of_an_empty_or_missing_root(tmp_path):
    info = neurocube.cache_info(store=tmp_path / "nothing")
    assert len(info) == 0 and info.attrs["total_bytes"] == 0
    assert "key" in info.columns


def test_evict_removes_least_recently_used_first(tmp_path):
    for n, key in enumerate(["a", "b", "c"]):
        neurocube.cache(_dataset(200, n), store=tmp_path, key=key)
    _age(tmp_path, "a", 10)
    _age(tmp_path, "b", 300)
    _age(tmp_path, "c", 100)
    sizes = neurocube.cache_info(store=tmp_path).set_index("key")["size_bytes"]
    budget = int(sizes.sum() - sizes["b"] - 1)  # one entry too many
    assert neurocube.evict_cache(budget, store=tmp_path) == ["b", "c"]
    assert neurocube.cache_info(store=tmp_path)["key"].tolist() == ["a"]
    assert neurocube.evict_cache("1TB", store=tmp_path) == []
    assert neurocube.evict_cache(0, store=tmp_path) == ["a"]


def test_clear_older_than_keeps_recent_entries(tmp_path):
    for n, key in enumerate(["old", "new"]):
        neurocube.cache(_dataset(20, n), store=tmp_path, key=key)
    _age(tmp_path, "old", 3 * 86400)
    assert neurocube.clear_cache(tmp_path, older_than="2d") == ["old"]
    assert neurocube.cache_info(store=tmp_path)["key"].tolist() == ["new"]
    assert neurocube.clear_cache(tmp_path) == ["new"]
    assert sorted(os.listdir(tmp_path)) == []


def test_an_entry_without_marker_is_foreign_and_rebuilt(tmp_path):
    ds = _dataset(20, 1)
    neurocube.cache(ds, store=tmp_path, key="k")
    (tmp_path / "k.zarr" / ".neurocube" / "entry.json").unlink()  # damaged by hand
    assert neurocube.cache_info(store=tmp_path)["status"].tolist() == ["foreign"]
    rebuilt = neurocube.cache(ds, store=tmp_path, key="k")
    np.testing.assert_array_equal(rebuilt.data.values, ds.data.values)
    assert neurocube.cache_info(store=tmp_path)["status"].tolist() == ["complete"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [(0, 0), (1234, 1234), ("500MB", 500_000_000), ("2GiB", 2 << 30), ("1.5 kb", 1500), ("7", 7)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"), [("30min", 1800.0), ("12h", 43200.0), ("7d", 604800.0), ("2w", 1209600.0)]
)
def test_parse_age(text, expected):
    assert parse_age(text) == expected


@pytest.mark.parametrize("bad", ["lots", "5 parsecs", "-3MB", -1])
def test_bad_sizes_are_refused(bad):
    with pytest.raises(CacheError, match=r"as a size|negative"):
        parse_size(bad)


def test_bad_ages_are_refused():
    with pytest.raises(CacheError, match=r"cannot read '3 fortnights' as an age.*'7d'"):
        parse_age("3 fortnights")


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="neurocube")
    cache_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_cli_ls_du_evict_clear(tmp_path, capsys):
    for n, key in enumerate(["first", "second"]):
        neurocube.cache(_dataset(100, n), store=tmp_path, key=key)
    _age(tmp_path, "first", 4 * 3600)

    assert _run(["cache", "ls", "--store", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"cache root: {tmp_path}" in out
    assert out.index("second") < out.index("first")  # most recent first
    assert "complete" in out and "0 files" in out

    path = make_betas(tmp_path / "b.nii")
    neurocube.cache(neurocube.open_nifti(path), store=tmp_path, key="with-source")
    assert _run(["cache", "ls", "--long", "--store", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"1 file\n    {path.resolve()}\n" in out
    assert neurocube.clear_cache(tmp_path, older_than="1d") == []
    shutil.rmtree(tmp_path / "with-source.zarr")

    assert _run(["cache", "du", "--store", str(tmp_path)]) == 0
    assert "2 entries" in capsys.readouterr().out

    assert _run(["cache", "clear", "--older-than", "1h", "--store", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == "removed first"

    assert _run(["cache", "evict", "0", "--store", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == "evicted second"

    assert _run(["cache", "ls", "--store", str(tmp_path)]) == 0
    assert "(empty)" in capsys.readouterr().out


def test_cli_uses_the_cache_folder_by_default(capsys):
    neurocube.cache(_dataset(10, 3), key="default-root")
    assert _run(["cache", "ls"]) == 0
    out = capsys.readouterr().out
    assert str(neurocube.config.cache_dir() / "zarr") in out and "default-root" in out


def test_cli_bad_age_is_a_clean_error(tmp_path):
    with pytest.raises(CacheError, match="as an age"):
        _run(["cache", "clear", "--older-than", "soon", "--store", str(tmp_path)])


def test_cli_is_registered_in_the_main_command():
    from neurocube import cli

    assert "neurocube.cache_cli" in cli.COMMAND_MODULES
