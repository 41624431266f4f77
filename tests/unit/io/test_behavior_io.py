from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

import neurocube
from neurocube.catalog.behavior import Manifest, read_index_csv
from neurocube.errors import (
    DataNotFoundError,
    FormatError,
    OutputExistsError,
    SelectionError,
    UnsafePathError,
)
from neurocube.io.behavior import save_manifest, save_tracks, write_index_csv

CM_PER_PX = 0.25


def trex_export(path, ident, n=60, lost=(7, 8), cm_per_pixel=CM_PER_PX, pose=2, head_offset=0.0):
    """A TRex per-individual export: positions in cm, lost frames = inf."""
    frame = np.arange(n, dtype=np.float64)
    x = 10.0 + frame * 0.5 + ident
    y = 20.0 + frame * 0.25 + ident
    x[list(lost)] = np.inf
    y[list(lost)] = np.inf
    arrays = {
        "frame": frame,
        "time": frame / 50.0,
        "X": x + head_offset,
        "Y": y + head_offset,
        "X#wcentroid": x,
        "Y#wcentroid": y,
        "SPEED": np.ones(n),
        "ANGLE": np.zeros(n),
        "id": np.array([ident], dtype=np.float64),
        "cm_per_pixel": np.array([cm_per_pixel]),
    }
    for k in range(pose):
        arrays[f"poseX{k}"] = x + k
        arrays[f"poseY{k}"] = y - k
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return arrays


@pytest.fixture
def trex(tmp_path):
    ds_root = tmp_path / "ds"
    m = Manifest.create(ds_root, name="trex", fps_default=50)
    m.save()
    m.ensure_roots()
    raw = tmp_path / "raw"
    exports = {}
    for video in ("fish01__speed3__loop1", "fish02__speed1__loop1"):
        for ident in (0, 1):
            exports[(video, ident)] = trex_export(raw / f"{video}_fish{ident}.npz", ident)
    return ds_root, raw, exports


def test_save_manifest_formats(tmp_path):
    data = {"manifest_version": 3, "name": "x", "unknown": {"a": [1, 2]}, "n": np.int64(3)}
    save_manifest(data, tmp_path / "dataset.json")
    assert json.loads((tmp_path / "dataset.json").read_text())["n"] == 3
    save_manifest(data, tmp_path / "dataset.yaml")
    text = (tmp_path / "dataset.yaml").read_text()
    assert text.startswith("# neurocube")
    assert yaml.safe_load(text)["unknown"] == {"a": [1, 2]}
    with pytest.raises(FormatError, match=r"\.yaml, \.yml or \.json"):
        save_manifest(data, tmp_path / "dataset.toml")


def test_write_index_csv_keeps_text(tmp_path):
    table = pd.DataFrame({"abs_path": ["a", "b"], "score": ["0.10", None], "n": ["007", "1"]})
    write_index_csv(table, tmp_path / "index.csv")
    back = read_index_csv(tmp_path / "index.csv")
    assert list(back["score"]) == ["0.10", ""]
    assert list(back["n"]) == ["007", "1"]


def test_index_tracks_raw(trex):
    ds_root, raw, _ = trex
    index = neurocube.index_tracks_raw(
        ds_root, raw, "*.npz", "trex_npz", group_pattern=r"^(fish\d+)", compute_md5=True
    )
    table = read_index_csv(index)
    assert list(table.columns) == [
        "group", "sequence", "abs_path", "src_format", "size_bytes", "mtime_iso", "md5"
    ]  # fmt: skip
    assert list(table["sequence"]) == ["fish01__speed3__loop1"] * 2 + ["fish02__speed1__loop1"] * 2
    assert list(table["group"]) == ["fish01"] * 2 + ["fish02"] * 2
    assert table["abs_path"].iloc[0] == str((raw / "fish01__speed3__loop1_fish0.npz").resolve())
    import hashlib

    expected_md5 = hashlib.md5((raw / "fish01__speed3__loop1_fish0.npz").read_bytes()).hexdigest()
    assert table["md5"].iloc[0] == expected_md5
    # files inside the dataset are stored relative; re-indexing replaces rows by path
    inner = ds_root / "tracks_raw" / "inner"
    trex_export(inner / "vidA_fish0.npz", 0)
    neurocube.index_tracks_raw(ds_root, [inner], group_from="parent")
    table = read_index_csv(index)
    assert len(table) == 5
    assert table["abs_path"].iloc[-1] == "tracks_raw/inner/vidA_fish0.npz"
    assert table["group"].iloc[-1] == "inner"
    with pytest.raises(DataNotFoundError, match="nothing to index"):
        neurocube.index_tracks_raw(ds_root, raw, "*.nothing")
    with pytest.raises(DataNotFoundError, match="search folder does not exist"):
        neurocube.index_tracks_raw(ds_root, raw / "missing")


def test_convert_trex_to_mosaic_v1(trex):
    ds_root, raw, exports = trex
    neurocube.index_tracks_raw(ds_root, raw, group_pattern=r"^(fish\d+)")
    written = neurocube.convert_tracks(ds_root, row_group_size=16)
    assert len(written) == 2
    run_dirs = {p.parent.name for p in written}
    assert len(run_dirs) == 1 and next(iter(run_dirs)).startswith("convert-trex_npz.1-")
    assert (written[0].parent / "params.json").is_file()
    assert written[0].name == "fish01__fish01__speed3__loop1.parquet"
    table = pd.read_parquet(written[0])
    assert list(table.columns[:7]) == ["frame", "time", "id", "group", "sequence", "X", "Y"]
    assert not {"SPEED", "ANGLE", "X#wcentroid"} & set(table.columns)
    assert len(table) == 2 * (60 - 2)  # lost frames dropped
    src = exports[("fish01__speed3__loop1", 1)]
    rows = table[table["id"] == 1].set_index("frame")
    f = 20
    assert rows.loc[f, "X"] == pytest.approx(src["X#wcentroid"][f] / CM_PER_PX)
    assert rows.loc[f, "poseY1"] == pytest.approx(src["poseY1"][f] / CM_PER_PX)
    meta = pq.read_metadata(written[0])
    assert meta.num_row_groups == int(np.ceil(len(table) / 16))
    index = read_index_csv(ds_root / "tracks" / "index.csv")
    assert list(index["std_format"]) == ["mosaic_v1", "mosaic_v1"]
    assert list(index["n_rows"]) == ["116", "116"]
    assert list(index["frame_min"]) == ["0", "0"] and list(index["frame_max"]) == ["59", "59"]
    assert index["cm_per_pixel"].iloc[0] == "0.25"
    # read back through open_behavior: dense values follow from construction
    ds = neurocube.open_behavior(ds_root)
    dense = ds.to_dense(groups="fish01").compute()
    assert dense.attrs["units"] == "pixels"
    pos = dense["position"].sel(keypoint="0", individual=1).values
    np.testing.assert_allclose(pos[f], [src["poseX0"][f] / CM_PER_PX, src["poseY0"][f] / CM_PER_PX])
    assert np.isnan(pos[7]).all() and np.isnan(pos[8]).all()
    # a second run without overwrite leaves the files alone
    mtime = written[0].stat().st_mtime_ns
    assert neurocube.convert_tracks(ds_root) == written
    assert written[0].stat().st_mtime_ns == mtime


def test_convert_to_cm_and_errors(trex, tmp_path):
    ds_root, raw, exports = trex
    neurocube.index_tracks_raw(ds_root, raw)
    out = neurocube.convert_tracks(
        ds_root, std_format="mosaic_cm_v1", sequences="fish02__speed1__loop1"
    )
    table = pd.read_parquet(out[0])
    src = exports[("fish02__speed1__loop1", 0)]
    assert table[table["id"] == 0]["X"].iloc[0] == src["X#wcentroid"][0]
    ds = neurocube.open_behavior(ds_root)
    assert ds.tracks().attrs["units"] == "cm"
    with pytest.raises(SelectionError, match="no converter for src_format 'calms21_npy'"):
        neurocube.convert_tracks(ds_root, src_format="calms21_npy")
    with pytest.raises(SelectionError, match=r"no sequence\(s\)"):
        neurocube.convert_tracks(ds_root, sequences="nope")


def test_convert_refuses_missing_scale_and_pickles(tmp_path):
    ds_root = tmp_path / "ds"
    Manifest.create(ds_root).save()
    raw = tmp_path / "raw"
    trex_export(raw / "v_fish0.npz", 0, cm_per_pixel=0.0)
    neurocube.index_tracks_raw(ds_root, raw)
    with pytest.raises(FormatError, match="no usable cm_per_pixel"):
        neurocube.convert_tracks(ds_root)
    out = neurocube.convert_tracks(ds_root, cm_per_pixel=0.5)
    assert pd.read_parquet(out[0])["X"].iloc[0] == pytest.approx(10.0 / 0.5)
    raw2 = tmp_path / "raw2"
    raw2.mkdir()
    np.savez(
        raw2 / "w_fish0.npz",
        frame=np.arange(3.0),
        X=np.array([1, "a", None], dtype=object),
        Y=np.zeros(3),
    )
    ds2 = tmp_path / "ds2"
    Manifest.create(ds2).save()
    neurocube.index_tracks_raw(ds2, raw2)
    with pytest.raises(FormatError, match="not a plain TRex export"):
        neurocube.convert_tracks(ds2)


def test_save_tracks_validates_and_stays_inside(tmp_path):
    ds_root = tmp_path / "ds"
    Manifest.create(ds_root).save()
    table = pd.DataFrame(
        {
            "frame": [0, 1],
            "time": [0.0, 0.1],
            "id": [0, 0],
            "X": [1.0, 2.0],
            "Y": [3.0, 4.0],
            "SPEED": [1.0, 1.0],
        }
    )
    with pytest.raises(FormatError, match=r"derived columns \['SPEED'\] are not allowed"):
        save_tracks(ds_root, "g", "s", table, run_id="r1")
    path = save_tracks(ds_root, "g", "s", table, run_id="r1", std_format="trex_v2")
    assert path == ds_root.resolve() / "tracks" / "r1" / "g__s.parquet"
    with pytest.raises(OutputExistsError, match=r"g__s\.parquet exists; pass overwrite=True"):
        save_tracks(ds_root, "g", "s", table, run_id="r1", std_format="trex_v2")
    with pytest.raises(FormatError, match=r"missing \['Y'\]"):
        save_tracks(ds_root, "g", "t", table.drop(columns=["Y"]), run_id="r1", std_format="trex_v2")
    with pytest.raises(SelectionError, match="plain folder name"):
        save_tracks(ds_root, "g", "s", table, run_id="../x")
    m = Manifest.load(ds_root)
    m.roots["tracks"] = "../escaped"
    m.save()
    with pytest.raises(UnsafePathError, match="outside the dataset"):
        save_tracks(ds_root, "g", "s", table.drop(columns=["SPEED"]), run_id="r2")
    assert not (tmp_path / "escaped").exists()


def _snapshot(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns) for p in folder.rglob("*"))


def test_writers_refuse_roots_a_prefix_map_sends_outside(tmp_path):
    """Absolute roots remapped by prefix onto a folder outside the dataset: nothing writes there."""
    import shutil

    root = (tmp_path / "ds").resolve()
    m = Manifest.create(root)
    for key in ("tracks", "tracks_raw"):
        m.roots[key] = str(root / key)
    m.save()
    m.ensure_roots()
    raw = tmp_path / "raw"
    trex_export(raw / "v_fish0.npz", 0)
    neurocube.index_tracks_raw(root, raw)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(root / "tracks_raw", elsewhere / "tracks_raw")
    (elsewhere / "tracks").mkdir()
    ds = neurocube.open_behavior(root)
    path_map = {str(root): str(elsewhere)}
    expected = {"tracks": str(elsewhere / "tracks"), "tracks_raw": str(elsewhere / "tracks_raw")}
    assert ds.remap_roots(path_map, dry_run=True) == expected
    assert Manifest.load(root).roots["tracks"] == str(root / "tracks")  # dry run wrote nothing
    assert ds.remap_roots(path_map) == expected
    assert Manifest.load(root).roots["tracks"] == str(elsewhere / "tracks")
    before = _snapshot(elsewhere)
    with pytest.raises(UnsafePathError, match=r"root 'tracks_raw' is .*elsewhere.*outside"):
        neurocube.index_tracks_raw(ds, raw)
    with pytest.raises(UnsafePathError, match=r"root 'tracks' is .*elsewhere.*outside"):
        neurocube.convert_tracks(ds)
    table = pd.DataFrame({c: [0] for c in ("frame", "time", "id", "X", "Y")})
    with pytest.raises(UnsafePathError, match=r"root 'tracks' is .*outside the dataset"):
        save_tracks(ds, "g", "s", table, run_id="r1")
    with pytest.raises(UnsafePathError, match="outside the dataset"):
        ds.rewrite_index_paths({str(raw.resolve()): "/moved/raw"})  # that index lies outside
    shutil.rmtree(elsewhere / "tracks")
    assert ds.ensure_roots() == []  # roots outside are never created
    assert not (elsewhere / "tracks").exists()
    assert _snapshot(elsewhere) == [e for e in before if e[0] != "tracks"]


def test_writers_refuse_a_symlinked_root_leading_outside(tmp_path):
    root = tmp_path / "ds"
    Manifest.create(root).save()
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "tracks").symlink_to(outside, target_is_directory=True)
    table = pd.DataFrame({c: [0] for c in ("frame", "time", "id", "X", "Y")})
    with pytest.raises(UnsafePathError, match="outside the dataset"):
        save_tracks(root, "g", "s", table, run_id="r1")
    with pytest.raises(UnsafePathError, match="outside the dataset"):
        Manifest.load(root).set_root("features", "tracks/features")
    assert list(outside.iterdir()) == []


def test_convert_partial_inf_becomes_nan_row_kept(tmp_path):
    ds_root = tmp_path / "ds"
    Manifest.create(ds_root).save()
    raw = tmp_path / "raw"
    src = trex_export(raw / "v_fish3.npz", 3, lost=())
    src["poseX1"][5] = np.inf  # one keypoint lost at frame 5, the centroid still tracked
    src["poseY1"][5] = -np.inf
    np.savez(raw / "v_fish3.npz", **src)
    neurocube.index_tracks_raw(ds_root, raw)
    table = pd.read_parquet(neurocube.convert_tracks(ds_root)[0]).set_index("frame")
    assert len(table) == 60 and set(table["id"]) == {3}
    assert np.isnan(table.loc[5, "poseX1"]) and np.isnan(table.loc[5, "poseY1"])
    assert table.loc[5, "X"] == pytest.approx(src["X#wcentroid"][5] / CM_PER_PX)
    assert table.loc[5, "poseX0"] == pytest.approx(src["poseX0"][5] / CM_PER_PX)
    np.testing.assert_allclose(table["time"].to_numpy(), src["time"])


def test_tracks_index_update_is_atomic(tmp_path, monkeypatch):
    ds_root = tmp_path / "ds"
    Manifest.create(ds_root).save()
    table = pd.DataFrame({c: [0, 1] for c in ("frame", "time", "id", "X", "Y")})
    save_tracks(ds_root, "g", "s", table, run_id="r1")
    index = ds_root / "tracks" / "index.csv"
    before = index.read_text()
    original = pd.DataFrame.to_csv

    def crash(self, path, *args, **kwargs):
        original(self.iloc[:1], path, *args, **kwargs)  # half the table reaches the temp file
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", crash)
    with pytest.raises(OSError, match="disk full"):
        save_tracks(ds_root, "g", "t", table, run_id="r1")
    assert index.read_text() == before
    assert sorted(p.name for p in index.parent.iterdir()) == ["index.csv", "r1"]
