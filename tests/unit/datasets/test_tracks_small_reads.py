"""Small frame-range reads of behaviour tracks (issue 13 item 6).

A frame range of a few rows is read when ``tracks()`` is called (numpy-backed,
``lazy=None``); larger or unfiltered selections stay Dask-backed. Both must give
pyarrow's rows and values; the per-process caches (manifest, index, footers)
must never serve a file's old version after it was rewritten.
"""

from __future__ import annotations

import os
from pathlib import Path

import dask.array as da
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import neurocube
from neurocube.datasets import behavior as behavior_mod
from neurocube.errors import CorruptDataError, SourceChangedError
from neurocube.sources import parquet as parquet_source
from neurocube.sources import parquet_meta

N_IDS = 3
RG_FRAMES = 20  # row groups of 20 frames = 60 rows
COLUMNS = ["frame", "time", "id", "X", "Y", "poseX0", "poseY0", "poseP0", "flag"]


def _table(seed: int, n_frames: int, first: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    frame = np.repeat(np.arange(first, first + n_frames, dtype=np.int64), N_IDS)
    n = frame.size
    return pa.table({
        "frame": frame, "time": frame / 25.0, "id": np.tile(np.arange(N_IDS), n_frames),
        "group": ["g"] * n, "sequence": ["s"] * n,
        "X": rng.random(n) * 100, "Y": rng.random(n) * 100,
        "poseX0": rng.random(n), "poseY0": rng.random(n),
        "poseP0": rng.random(n).astype(np.float32), "flag": rng.integers(0, 5, n, dtype=np.int32),
    })  # fmt: skip


def _write(path: Path, table: pa.Table, checksums: bool = True) -> None:
    # plain encoding, no compression: without page checksums (a varint in each page header),
    # a rewrite with other values of the same shape has exactly the old size
    pq.write_table(table, path, row_group_size=RG_FRAMES * N_IDS, compression="none",
                   use_dictionary=False, write_page_checksum=checksums)  # fmt: skip


def _dataset(root: Path, sequences: dict[str, pa.Table], checksums: bool = True) -> Path:
    (root / "tracks" / "run1").mkdir(parents=True)
    manifest = "manifest_version: 3\nname: small\nmeta:\n  fps_default: 25\n"
    (root / "dataset.yaml").write_text(manifest)
    rows = ["abs_path,run_id,group,sequence,std_format"]
    for name, table in sequences.items():
        rel = f"tracks/run1/g__{name}.parquet"
        _write(root / rel, table, checksums)
        rows.append(f"{rel},run1,g,{name},mosaic_v1")
    (root / "tracks" / "index.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def small(tmp_path):
    # s1: frames 0-199 (10 row groups); s2: frames 50-129 (4 row groups)
    return _dataset(tmp_path / "ds", {"s1": _table(1, 200), "s2": _table(2, 80, first=50)})


def _pyarrow(path: Path, lo: int, hi: int) -> pa.Table:
    return pq.read_table(path, filters=[("frame", ">=", lo), ("frame", "<", hi)])


def _numpy_backed(ds) -> bool:
    return all(isinstance(v.data, np.ndarray) for v in ds.variables.values())


def _dask_backed(ds) -> bool:
    return all(isinstance(ds[c].data, da.Array) for c in [*ds.data_vars, "frame", "group"])


RANGES = [
    (0, 5),      # start, inside the first row group
    (0, 20),     # exactly the first row group
    (37, 43),    # across the boundary of row groups 1 and 2
    (95, 105),   # middle, across a boundary
    (19, 61),    # a whole row group and two partial ones
    (190, 200),  # end
    (195, 400),  # past the end
    (250, 300),  # no rows at all
    (-10, 1),    # before the start
]  # fmt: skip


@pytest.mark.parametrize(("lo", "hi"), RANGES)
def test_small_ranges_equal_pyarrow(small, lo, hi):
    ds = neurocube.open_behavior(small)
    eager = ds.tracks(sequences="s1", start_frame=lo, end_frame=hi)
    lazy = ds.tracks(sequences="s1", start_frame=lo, end_frame=hi, lazy=True)
    assert _numpy_backed(eager)
    assert _dask_backed(lazy)
    ref = _pyarrow(small / "tracks/run1/g__s1.parquet", lo, hi)
    computed = lazy.compute()
    for out in (eager, computed):
        assert out.sizes["row"] == ref.num_rows
        for col in COLUMNS:
            want = ref.column(col).to_numpy()
            np.testing.assert_array_equal(out[col].values, want, err_msg=col)
            assert out[col].dtype == want.dtype, col
        assert set(out["sequence"].values.tolist()) <= {"s1"}
    for name in [*eager.variables]:
        assert eager[name].dtype == computed[name].dtype, name
        np.testing.assert_array_equal(eager[name].values, computed[name].values, err_msg=name)
    assert eager.attrs == lazy.attrs
    assert eager["X"].attrs == lazy["X"].attrs


@pytest.mark.parametrize("exact", [True, False])
def test_several_files_exact_and_row_groups(small, exact):
    """Two files, frame range across both; exact=False keeps the straddling row groups whole."""
    ds = neurocube.open_behavior(small)
    eager = ds.tracks(start_frame=45, end_frame=75, exact=exact)
    lazy = ds.tracks(start_frame=45, end_frame=75, exact=exact, lazy=True).compute()
    assert _numpy_backed(eager)
    for name in eager.variables:
        assert eager[name].dtype == lazy[name].dtype, name
        np.testing.assert_array_equal(eager[name].values, lazy[name].values, err_msg=name)
    frames = eager["frame"].values
    if exact:
        parts = [_pyarrow(small / f"tracks/run1/g__{s}.parquet", 45, 75) for s in ("s1", "s2")]
        np.testing.assert_array_equal(
            frames, np.concatenate([p.column("frame").to_numpy() for p in parts])
        )
        assert list(eager["sequence"].values[[0, -1]]) == ["s1", "s2"]
    else:  # s1: row groups 40-59 and 60-79; s2: 50-69 and 70-89
        assert frames.min() == 40 and frames.max() == 89
        assert eager.attrs["frame_filter"] == "row_groups"


def test_unit_conversion_same_eager_and_lazy(small):
    ds = neurocube.open_behavior(small)
    kw = dict(start_frame=10, end_frame=30, units="cm", cm_per_pixel=0.5)
    eager = ds.tracks(**kw)
    lazy = ds.tracks(**kw, lazy=True).compute()
    ref = _pyarrow(small / "tracks/run1/g__s1.parquet", 10, 30)
    np.testing.assert_array_equal(
        eager["X"].values[: ref.num_rows], ref.column("X").to_numpy() * 0.5
    )
    for name in eager.variables:
        np.testing.assert_array_equal(eager[name].values, lazy[name].values, err_msg=name)
    assert eager.attrs["unit_conversion"] == lazy.attrs["unit_conversion"]


def test_large_or_unfiltered_reads_stay_lazy(small, monkeypatch):
    ds = neurocube.open_behavior(small)
    assert _dask_backed(ds.tracks())  # no frame range: lazy as before
    dense = ds.tracks(start_frame=0, end_frame=20, dense=True)  # the dense view: always lazy
    assert isinstance(dense["position"].data, da.Array)
    # the same range is read at once under the threshold and planned lazily above it
    assert _numpy_backed(ds.tracks(start_frame=0, end_frame=100))
    monkeypatch.setattr(behavior_mod, "SMALL_READ_BYTES", 1000)
    assert _dask_backed(ds.tracks(start_frame=0, end_frame=100))
    assert _numpy_backed(ds.tracks(start_frame=0, end_frame=100, lazy=False))
    assert _numpy_backed(ds.tracks(lazy=False))


def test_small_lazy_read_is_one_read_task(small):
    """A small range with lazy=True: one read task feeding every column (no per-row-group tasks)."""
    ds = neurocube.open_behavior(small)
    tracks = ds.tracks(sequences="s1", start_frame=15, end_frame=65, lazy=True)
    graph = dict(tracks.__dask_graph__())
    reads = [k for k in graph if isinstance(k, tuple) and str(k[0]).startswith("tracks-read-")]
    assert len(reads) == 1
    # one pick per numeric column and coordinate, one task per string coordinate
    numeric = len(tracks.data_vars) + 3  # + frame, time, id
    assert len(graph) == 1 + numeric + 2
    # the eager default builds no graph at all
    assert ds.tracks(sequences="s1", start_frame=15, end_frame=65).__dask_graph__() is None


def test_reopen_parses_nothing(small, monkeypatch):
    """A dataset reopened in the same process parses no manifest, index or footer again."""
    import yaml

    from neurocube.io.behavior import layout as io_layout  # DatasetLayout reads the indexes

    first = neurocube.open_behavior(small).tracks(sequences="s1", start_frame=3, end_frame=9)
    calls: list[str] = []
    real_yaml, real_csv, real_info = (
        yaml.safe_load, io_layout.read_index_csv, parquet_meta._parse_info
    )  # fmt: skip
    monkeypatch.setattr(yaml, "safe_load", lambda *a: calls.append("yaml") or real_yaml(*a))
    monkeypatch.setattr(
        io_layout, "read_index_csv", lambda *a: calls.append("csv") or real_csv(*a)
    )
    monkeypatch.setattr(
        parquet_meta, "_parse_info", lambda *a: calls.append("footer") or real_info(*a)
    )
    again = neurocube.open_behavior(small).tracks(sequences="s1", start_frame=3, end_frame=9)
    assert calls == []
    np.testing.assert_array_equal(again["X"].values, first["X"].values)


def _rewrite_same_size_and_mtime(path: Path, table: pa.Table) -> None:
    """Rewrite ``path`` with ``table``, keeping its size and restoring its mtime."""
    before = path.stat()
    tmp = path.with_suffix(".tmp")
    if path.suffix == ".parquet":
        _write(tmp, table, checksums=False)
    else:
        tmp.write_bytes(table)  # type: ignore[arg-type]
    assert tmp.stat().st_size == before.st_size  # precondition: only ctime can tell
    os.replace(tmp, path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_mtime_ns == before.st_mtime_ns


def test_caches_never_serve_a_rewritten_file(tmp_path):
    """Manifest, index and parquet rewritten with the same size and mtime: the new content."""
    root = _dataset(tmp_path / "ds", {"s1": _table(1, 200), "s2": _table(2, 80, first=50)},
                    checksums=False)  # fmt: skip
    s1 = root / "tracks/run1/g__s1.parquet"
    ds = neurocube.open_behavior(root)
    old = ds.tracks(sequences="s1", start_frame=30, end_frame=50)
    old_lazy = ds.tracks(sequences="s1", start_frame=30, end_frame=50, lazy=True).compute()
    assert ds.fps_default == 25.0

    # new values, and X and Y swap places: a stale footer would read Y's pages as X
    new_table = _table(99, 200)
    names = new_table.column_names
    i, j = names.index("X"), names.index("Y")
    names[i], names[j] = names[j], names[i]
    new_table = new_table.select(names)
    _rewrite_same_size_and_mtime(s1, new_table)
    manifest = root / "dataset.yaml"
    _rewrite_same_size_and_mtime(manifest, manifest.read_bytes().replace(b"25", b"50"))
    index = root / "tracks" / "index.csv"
    text = index.read_bytes().replace(b",g,s2,", b",h,s2,")
    _rewrite_same_size_and_mtime(index, text)

    ds2 = neurocube.open_behavior(root)
    assert ds2.fps_default == 50.0
    assert ds2.list_groups() == ["g", "h"]
    ref = _pyarrow(s1, 30, 50)
    fresh = ds2.tracks(groups="g", sequences="s1", start_frame=30, end_frame=50)
    fresh_lazy = ds2.tracks(groups="g", sequences="s1", start_frame=30, end_frame=50, lazy=True)
    for out in (fresh, fresh_lazy.compute()):
        np.testing.assert_array_equal(out["X"].values, ref.column("X").to_numpy())
        assert not np.array_equal(out["X"].values, old["X"].values)
    np.testing.assert_array_equal(old["X"].values, old_lazy["X"].values)


def test_eager_read_checks_crc_and_changes(small):
    path = small / "tracks/run1/g__s1.parquet"
    info = parquet_meta.read_parquet_info(path)
    cols, dtypes = ["frame", "X"], ["int64", "float64"]
    out = parquet_source.read_rows(info, cols, dtypes, filter_column="frame",
                                   filter_range=(30, 50))  # fmt: skip
    np.testing.assert_array_equal(out["X"], _pyarrow(path, 30, 50).column("X").to_numpy())
    # the file changes after its footer was read: refused, not read
    os.utime(path, ns=(info.mtime_ns + 10**9, info.mtime_ns + 10**9))
    with pytest.raises(SourceChangedError, match="changed since it was opened"):
        parquet_source.read_rows(info, cols, dtypes, filter_column="frame", filter_range=(30, 50))
    # a damaged page of a row group in range: a checksum error through tracks()
    column = pq.read_metadata(path).row_group(2).column(5)  # X of frames 40-59
    assert column.path_in_schema == "X"
    raw = bytearray(path.read_bytes())
    raw[column.data_page_offset + 100] ^= 0x10
    path.write_bytes(bytes(raw))
    ds = neurocube.open_behavior(small)
    with pytest.raises(CorruptDataError, match=r"g__s1\.parquet: .*checksum"):
        ds.tracks(sequences="s1", start_frame=30, end_frame=50)
