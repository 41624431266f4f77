from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from neurocube.catalog.behavior import (
    BehaviorCatalog,
    Manifest,
    entry_key,
    longest_prefix_remap,
    read_index_csv,
)
from neurocube.errors import DataNotFoundError, FormatError, SelectionError, UnsafePathError
from tests.unit.datasets._behavior_data import (
    SAMPLE_GROUP,
    SAMPLE_SEQUENCE,
    TRACKS_COLUMNS,
    copy_sample,
    hierarchical,
    make_dataset,
    write_index,
    write_manifest,
)


@pytest.fixture
def sample(tmp_path):
    return copy_sample(tmp_path / "sample")


def test_sample_manifest(sample):
    m = Manifest.load(sample)
    assert m.name == "synthetic"
    assert m.data["manifest_version"] == 3
    assert m.roots["frames"] == "media/frames"
    assert m.roots["trex"] == "_tracking/trex"
    assert m.get_root("tracks") == sample.resolve() / "tracks"
    assert m.meta["labels"]["behavior"]["label_names"][0] == "attack"
    assert m.fps_default is None


def test_sample_index_text_cells(sample):
    table = read_index_csv(sample / "tracks" / "index.csv")
    row = table.iloc[0]
    assert row["finished_at"] == ""  # blank stays blank
    assert row["n_rows"] == "40"  # numbers stay text
    assert row["source_md5"] == "9a16a54c419dd8a6817950bec3699dd5"
    cat = BehaviorCatalog(sample)
    assert cat.list_groups() == [SAMPLE_GROUP]
    assert cat.list_sequences(SAMPLE_GROUP) == [SAMPLE_SEQUENCE]
    assert cat.label_kinds() == ["behavior", "id_tags"]
    raw = cat.read_index("tracks_raw")
    assert raw.iloc[0]["sequence"] == ""


def test_index_keeps_leading_zeros_and_decimals(tmp_path):
    write_manifest(tmp_path)
    write_index(
        tmp_path / "tracks" / "index.csv",
        [*TRACKS_COLUMNS, "score"],
        [{"abs_path": "tracks/a.parquet", "group": "007", "sequence": "s", "score": "0.10"}],
    )
    table = BehaviorCatalog(tmp_path).read_index("tracks")
    assert table.iloc[0]["group"] == "007"
    assert table.iloc[0]["score"] == "0.10"
    assert table.iloc[0]["run_id"] == ""


@pytest.mark.parametrize("name", ["dataset.yaml", "dataset.yml", "dataset.json"])
def test_manifest_roundtrip_keeps_unknown_keys(tmp_path, name):
    data = {
        "manifest_version": 3, "name": "x", "roots": {"tracks": "tracks"},
        "custom_key": {"nested": [1, 2, "three"]}, "meta": {"fps_default": 25},
    }  # fmt: skip
    path = tmp_path / name
    path.write_text(json.dumps(data) if name.endswith("json") else yaml.safe_dump(data))
    m = Manifest.load(tmp_path)
    assert m.path == path.resolve()
    assert m.fps_default == 25.0
    m.data["notes"] = "hello"
    m.save()
    again = Manifest.load(path)
    assert again.data["custom_key"] == {"nested": [1, 2, "three"]}
    assert again.data["notes"] == "hello"
    assert again.roots["tracks"] == "tracks"
    assert again.roots["frames"] == "media/frames"  # defaults filled on load


def test_manifest_save_is_atomic(tmp_path, monkeypatch):
    write_manifest(tmp_path)
    before = (tmp_path / "dataset.yaml").read_text()
    m = Manifest.load(tmp_path)
    m.data["bad"] = object()  # not YAML-plain: fails before anything replaces the file
    with pytest.raises(FormatError, match="not YAML/JSON-plain"):
        m.save()
    assert (tmp_path / "dataset.yaml").read_text() == before
    import neurocube.io.behavior.manifest as manifest_io

    def crash(*a, **k):
        raise RuntimeError("disk full")

    m.data.pop("bad")
    m.data["name"] = "changed"
    monkeypatch.setattr(manifest_io.yaml, "safe_dump", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        m.save()
    assert (tmp_path / "dataset.yaml").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["dataset.yaml"]


def test_manifest_errors(tmp_path):
    with pytest.raises(DataNotFoundError, match="no dataset manifest"):
        Manifest.load(tmp_path)
    (tmp_path / "dataset.yaml").write_text("manifest_version: 4\n")
    with pytest.raises(FormatError, match="manifest_version 4 is newer"):
        Manifest.load(tmp_path)
    (tmp_path / "dataset.yaml").write_text("- a\n- b\n")
    with pytest.raises(FormatError, match="expected a mapping"):
        Manifest.load(tmp_path)
    (tmp_path / "dataset.yaml").write_text("!!python/object:os.system ls\n")
    with pytest.raises(FormatError, match="not valid YAML"):
        Manifest.load(tmp_path)


def test_roots_set_ensure_and_escape(tmp_path):
    write_manifest(tmp_path / "ds")
    m = Manifest.load(tmp_path / "ds")
    with pytest.raises(SelectionError, match="no root named 'nope'"):
        m.get_root("nope")
    folder = m.set_root("features", "derived/features")
    assert folder.is_dir() and m.roots["features"] == "derived/features"
    with pytest.raises(UnsafePathError, match="outside the dataset"):
        m.set_root("evil", "../elsewhere")
    assert not (tmp_path / "elsewhere").exists()
    with pytest.raises(UnsafePathError):
        m.set_root("evil", tmp_path / "abs")
    m.roots["outside"] = "../outside_root"
    created = m.ensure_roots()
    assert not (tmp_path / "outside_root").exists()
    assert (tmp_path / "ds" / "media" / "frames") in created


def test_remap_roots_longest_prefix(tmp_path):
    write_manifest(tmp_path)
    m = Manifest.load(tmp_path)
    m.roots["media_raw"] = "/old/lab/videos"
    m.roots["labels_raw"] = "/old/lab/data/labels"
    path_map = {"/old/lab": "/new/lab", "/old/lab/data": "/fast/data"}
    dry = m.remap_roots(path_map, dry_run=True)
    assert dry == {"media_raw": "/new/lab/videos", "labels_raw": "/fast/data/labels"}
    assert m.roots["media_raw"] == "/old/lab/videos"
    m.remap_roots(path_map)
    assert m.roots["labels_raw"] == "/fast/data/labels"
    assert longest_prefix_remap("/old/labx/v.mp4", path_map) is None


def test_resolve_path(tmp_path):
    write_manifest(tmp_path)
    (tmp_path / "moved").mkdir()
    (tmp_path / "moved" / "f.parquet").write_bytes(b"x")
    cat = BehaviorCatalog(tmp_path, path_map={"/gone/lab": str(tmp_path / "moved")})
    assert cat.resolve_path("tracks/a.parquet") == tmp_path.resolve() / "tracks" / "a.parquet"
    assert cat.resolve_path(tmp_path / "moved" / "f.parquet") == tmp_path / "moved" / "f.parquet"
    assert cat.resolve_path("/gone/lab/f.parquet") == tmp_path / "moved" / "f.parquet"
    assert str(cat.resolve_path("/other/f.parquet")) == "/other/f.parquet"


def test_entry_key():
    assert entry_key("g 1", "s/2") == "g%201__s%2F2"
    assert entry_key("", "s") == "s"


def test_queries_and_metadata(tmp_path):
    gen = make_dataset(tmp_path, hierarchical(2, 2), labels=False)
    cat = BehaviorCatalog(gen.root)
    assert cat.list_groups() == ["fish01", "fish02"]
    assert cat.query_sequences(group_endswith="02") == [
        ("fish02", "speed1__loop1"), ("fish02", "speed2__loop1")
    ]  # fmt: skip
    assert cat.query_sequences(group_contains="sh0", sequence_endswith="loop1",
                               sequence_startswith="speed1") == [
        ("fish01", "speed1__loop1"), ("fish02", "speed1__loop1")
    ]  # fmt: skip
    assert cat.query_sequences(sequence_contains="zzz") == []
    meta = cat.sequence_metadata(level_names=["fish", "speed", "loop"])
    assert list(meta["fish"]) == ["fish01", "fish01", "fish02", "fish02"]
    assert list(meta["loop"]) == ["loop1"] * 4
    assert list(meta["sequence_safe"]) == ["speed1__loop1", "speed2__loop1"] * 2
    short = cat.sequence_metadata(level_names=["fish", "rest"])
    assert short["rest"].iloc[0] == "speed1__loop1"
    longer = cat.sequence_metadata(level_names=["a", "b", "c", "d"])
    assert list(longer["d"]) == [""] * 4


def _run_rows():
    base = {"group": "g", "sequence": "s"}
    return [
        {**base, "abs_path": "tracks/r1/g__s.parquet", "run_id": "r1",
         "started_at": "2026-01-01T00:00:00+00:00", "finished_at": "2026-01-01T00:01:00+00:00"},
        {**base, "abs_path": "tracks/r2/g__s.parquet", "run_id": "r2",
         "started_at": "2026-02-01T00:00:00+00:00", "finished_at": "2026-02-01T00:01:00+00:00"},
        {**base, "abs_path": "tracks/r0/g__s.parquet", "run_id": "r0",
         "started_at": "2025-12-01T00:00:00+00:00", "finished_at": ""},
        {"group": "g", "sequence": "t", "abs_path": "tracks/g__t.parquet", "run_id": ""},
    ]  # fmt: skip


def test_newest_run_and_run_id(tmp_path):
    write_manifest(tmp_path)
    write_index(tmp_path / "tracks" / "index.csv", TRACKS_COLUMNS, _run_rows())
    cat = BehaviorCatalog(tmp_path)
    chosen = cat.tracks_table()
    assert list(chosen["run_id"]) == ["r2", ""]
    assert list(cat.tracks_table("r1")["abs_path"]) == ["tracks/r1/g__s.parquet"]
    with pytest.raises(
        SelectionError, match=r"no rows with run_id 'r9'; runs present: \['r0', 'r1', 'r2'\]"
    ):
        cat.tracks_table("r9")


def test_make_portable_and_dry_run(tmp_path):
    root = tmp_path / "ds"
    write_manifest(root)
    inside = str(root.resolve() / "tracks" / "r" / "a.parquet")
    outside = str(tmp_path / "elsewhere" / "b.parquet")
    write_index(root / "tracks" / "index.csv", TRACKS_COLUMNS, [
        {"abs_path": inside, "group": "g", "sequence": "a", "run_id": "r"},
        {"abs_path": outside, "group": "g", "sequence": "b", "run_id": "r"},
        {"abs_path": "tracks/r/c.parquet", "group": "g", "sequence": "c", "run_id": "r"},
    ])  # fmt: skip
    m = Manifest.load(root)
    m.roots["media"] = str(root.resolve() / "media")
    m.save()
    cat = BehaviorCatalog(root)
    before = (root / "tracks" / "index.csv").read_text()
    report = cat.make_portable(dry_run=True)
    assert report == {
        str(root.resolve() / "dataset.yaml"): 1,
        str(root.resolve() / "tracks" / "index.csv"): 1,
    }
    assert (root / "tracks" / "index.csv").read_text() == before
    cat.make_portable()
    table = read_index_csv(root / "tracks" / "index.csv")
    assert list(table["abs_path"]) == ["tracks/r/a.parquet", outside, "tracks/r/c.parquet"]
    assert Manifest.load(root).roots["media"] == "media"
    assert BehaviorCatalog(root).make_portable() == {}  # idempotent


def test_rewrite_index_paths_never_writes_outside(tmp_path):
    root = tmp_path / "ds"
    write_manifest(root, extra="")
    write_index(
        root / "tracks" / "index.csv",
        TRACKS_COLUMNS,
        [{"abs_path": "/old/x/a.parquet", "group": "g", "sequence": "a"}],
    )
    cat = BehaviorCatalog(root)
    assert cat.rewrite_index_paths({"/old/x": "/new/x"}, dry_run=True) == {
        str(root.resolve() / "tracks" / "index.csv"): 1
    }
    cat.rewrite_index_paths({"/old/x": "/new/x"})
    assert read_index_csv(root / "tracks" / "index.csv").iloc[0]["abs_path"] == "/new/x/a.parquet"
    # a tracks root that escapes the dataset: its index is read but never rewritten
    outside = tmp_path / "outside_tracks"
    write_index(
        outside / "index.csv",
        TRACKS_COLUMNS,
        [{"abs_path": "/old/x/b.parquet", "group": "g", "sequence": "b"}],
    )
    m = Manifest.load(root)
    m.roots["tracks"] = "../outside_tracks"
    m.save()
    before = (outside / "index.csv").read_text()
    cat = BehaviorCatalog(root)
    assert cat.list_sequences() == ["b"]
    with pytest.raises(UnsafePathError, match="outside the dataset"):
        cat.rewrite_index_paths({"/old/x": "/new/x"})
    assert (outside / "index.csv").read_text() == before


def test_missing_and_bad_indexes(tmp_path):
    write_manifest(tmp_path)
    cat = BehaviorCatalog(tmp_path)
    with pytest.raises(DataNotFoundError, match=r"no tracks index.*convert_tracks"):
        cat.list_groups()
    (tmp_path / "tracks").mkdir()
    (tmp_path / "tracks" / "index.csv").write_text("")
    with pytest.raises(FormatError, match="empty index CSV"):
        BehaviorCatalog(tmp_path).list_groups()
    (tmp_path / "tracks" / "index.csv").write_text("group,sequence\ng,s\n")
    with pytest.raises(FormatError, match="no 'abs_path' column"):
        BehaviorCatalog(tmp_path).list_groups()


# ----------------------------------------------------------------------------- audit additions


def test_sample_manifest_survives_a_save(sample):
    original = yaml.safe_load((sample / "dataset.yaml").read_text())
    m = Manifest.load(sample)
    m.save()
    again = yaml.safe_load((sample / "dataset.yaml").read_text())
    assert again["manifest_version"] == 3
    assert again["meta"] == original["meta"]
    assert {k: again[k] for k in original} == original  # every key and value kept
    assert list(again)[: len(original)] == list(original)  # in their order


def test_manifest_version_written_and_checked(tmp_path):
    (tmp_path / "dataset.json").write_text('{"name": "old", "roots": {}}')
    m = Manifest.load(tmp_path)
    m.save()
    saved = json.loads((tmp_path / "dataset.json").read_text())
    assert next(iter(saved)) == "manifest_version" and saved["manifest_version"] == 3
    assert saved["name"] == "old"
    (tmp_path / "dataset.json").write_text('{"manifest_version": "3"}')
    with pytest.raises(FormatError, match=r"manifest_version must be an integer \(3\), found '3'"):
        Manifest.load(tmp_path)


def test_sequence_metadata_custom_separator(tmp_path):
    write_manifest(tmp_path)
    rows = [
        {"abs_path": "tracks/a.parquet", "group": "exp1-arenaA", "sequence": "day2-h03"},
        {"abs_path": "tracks/b.parquet", "group": "", "sequence": "exp2-arenaB-day1-h10"},
    ]
    write_index(tmp_path / "tracks" / "index.csv", TRACKS_COLUMNS, rows)
    cat = BehaviorCatalog(tmp_path)
    meta = cat.sequence_metadata(["experiment", "arena", "day", "hour"], separator="-")
    assert meta[["experiment", "arena", "day", "hour"]].values.tolist() == [
        ["exp2", "arenaB", "day1", "h10"],  # blank group: the sequence alone is split
        ["exp1", "arenaA", "day2", "h03"],
    ]
    default = cat.sequence_metadata(["experiment", "rest"])  # "__" joins group and sequence
    assert list(default["experiment"]) == ["exp2-arenaB-day1-h10", "exp1-arenaA"]
    assert list(default["rest"]) == ["", "day2-h03"]
    assert "experiment" not in cat.sequence_metadata().columns
    with pytest.raises(SelectionError, match="level name 'group' clashes"):
        cat.sequence_metadata(["group"])
    assert cat.query_sequences(group_startswith="exp1", sequence_endswith="h03") == [
        ("exp1-arenaA", "day2-h03")
    ]
    assert cat.query_sequences(group_endswith="") == [
        ("", "exp2-arenaB-day1-h10"), ("exp1-arenaA", "day2-h03")
    ]  # fmt: skip


def test_resolve_path_longest_prefix_wins(tmp_path):
    write_manifest(tmp_path / "ds")
    path_map = {"/lab": str(tmp_path / "short"), "/lab/fast": str(tmp_path / "long")}
    cat = BehaviorCatalog(tmp_path / "ds", path_map=path_map)
    assert cat.resolve_path("/lab/fast/t.parquet") == tmp_path / "long" / "t.parquet"
    assert cat.resolve_path("/lab/slow/t.parquet") == tmp_path / "short" / "slow" / "t.parquet"
    assert cat.resolve_path("/labx/t.parquet") == Path("/labx/t.parquet")  # whole components only
    with pytest.raises(FormatError, match="empty path in an index row"):
        cat.resolve_path("  ")
