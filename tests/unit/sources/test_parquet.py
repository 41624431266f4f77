from __future__ import annotations

import os
import pickle
from pathlib import Path

import dask
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from neurocube.errors import DataNotFoundError, FormatError
from neurocube.sources import parquet as source
from neurocube.sources.parquet import lazy_columns, plan_chunks, read_chunk
from neurocube.sources.parquet_meta import common_dtypes, read_parquet_info
from neurocube.storage import IO_STATS

SAMPLE = next(
    (Path(__file__).resolve().parents[2] / "data" / "mosaic" / "tracks").glob("*/*.parquet")
)


def write(path, n=100, row_group_size=10, **extra):
    frame = np.arange(n, dtype=np.int64)
    table = pa.table({"frame": frame, "v": frame * 2.0, "s": [f"r{i}" for i in range(n)], **extra})
    pq.write_table(table, path, row_group_size=row_group_size)
    return table


def compute(specs, columns, dtypes):
    arrays = lazy_columns(specs, columns, dtypes)
    return dict(zip(columns, dask.compute(*[arrays[c] for c in columns]), strict=True))


def test_sample_footer(tmp_path):
    IO_STATS.reset()
    info = read_parquet_info(SAMPLE)
    opens, nbytes = IO_STATS.snapshot()
    assert opens == 1 and nbytes == 0
    assert info.row_group_rows == (40,)
    assert info.dtypes["frame"] == "int64" and info.dtypes["poseX0"] == "float64"
    assert info.other_columns == {"group": "large_string", "sequence": "large_string"}
    assert info.column_range("frame") == (0, 19)
    assert info.column_range("id") == (0, 1)
    cols = ["frame", "poseY5", "label"]
    out = compute(
        plan_chunks(info, cols, [info.dtypes[c] for c in cols]),
        cols,
        [info.dtypes[c] for c in cols],
    )
    ref = pq.read_table(SAMPLE, columns=cols)
    for c in cols:
        np.testing.assert_array_equal(out[c], ref.column(c).to_numpy())


def test_not_parquet_and_missing(tmp_path):
    bad = tmp_path / "x.parquet"
    bad.write_bytes(b"NOPE" + b"\0" * 20)
    with pytest.raises(FormatError, match=r"not a parquet file \(starts with b'NOPE'"):
        read_parquet_info(bad)
    with pytest.raises(DataNotFoundError, match="no such file"):
        read_parquet_info(tmp_path / "missing.parquet")
    trunc = tmp_path / "t.parquet"
    write(tmp_path / "ok.parquet")
    trunc.write_bytes((tmp_path / "ok.parquet").read_bytes()[:-30])
    with pytest.raises(FormatError, match="unreadable parquet footer"):
        read_parquet_info(trunc)


def test_chunk_plan_merges_small_row_groups(tmp_path):
    path = tmp_path / "a.parquet"
    write(path, n=95, row_group_size=10)
    info = read_parquet_info(path)
    specs = plan_chunks(info, ["v"], ["float64"], min_chunk_rows=25)
    assert [s.row_groups for s in specs] == [(0, 1, 2), (3, 4, 5), (6, 7, 8), (9,)]
    assert [s.n_rows for s in specs] == [30, 30, 30, 5]
    one = plan_chunks(info, ["v"], ["float64"], min_chunk_rows=1)
    assert len(one) == 10
    out = compute(specs, ["v"], ["float64"])
    np.testing.assert_array_equal(out["v"], np.arange(95) * 2.0)


@pytest.mark.parametrize(("lo", "hi"), [(25, 47), (None, 13), (90, None), (30, 40), (200, 300)])
def test_pushdown_exact_and_row_groups(tmp_path, lo, hi):
    path = tmp_path / "a.parquet"
    write(path)
    info = read_parquet_info(path)
    lo_v, hi_v = -np.inf if lo is None else lo, np.inf if hi is None else hi
    exact = plan_chunks(
        info,
        ["frame", "v"],
        ["int64", "float64"],
        filter_column="frame",
        filter_range=(lo, hi),
        exact=True,
        min_chunk_rows=1,
    )
    out = compute(exact, ["frame", "v"], ["int64", "float64"])
    expected = np.arange(100)[(np.arange(100) >= lo_v) & (np.arange(100) < hi_v)]
    np.testing.assert_array_equal(out["frame"], expected)
    np.testing.assert_array_equal(out["v"], expected * 2.0)
    loose = plan_chunks(info, ["frame"], ["int64"], filter_column="frame", filter_range=(lo, hi))
    groups = {g for s in loose for g in s.row_groups}
    expected_groups = {g for g in range(10) if g * 10 + 9 >= lo_v and g * 10 < hi_v}
    assert groups == expected_groups


def test_build_reads_nothing_without_exact(tmp_path, monkeypatch):
    path = tmp_path / "a.parquet"
    write(path)
    info = read_parquet_info(path)

    def boom(*a, **k):
        raise AssertionError("read while planning")

    monkeypatch.setattr(source, "read_table", boom)
    IO_STATS.reset()
    specs = plan_chunks(info, ["v"], ["float64"], filter_column="frame", filter_range=(5, 55))
    arrays = lazy_columns(specs, ["v"], ["float64"])
    assert IO_STATS.snapshot() == (0, 0)
    assert arrays["v"].chunks == ((60,),)
    with pytest.raises(AssertionError, match="read while planning"):
        plan_chunks(
            info, ["v"], ["float64"], filter_column="frame", filter_range=(5, 55), exact=True
        )


def test_column_projection_and_bytes(tmp_path, monkeypatch):
    path = tmp_path / "a.parquet"
    write(path, w=np.ones(100))
    info = read_parquet_info(path)
    seen = []
    original = pq.ParquetFile.read_row_groups

    def spy(self, row_groups, columns=None, **kw):
        seen.append(list(columns))
        return original(self, row_groups, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", spy)
    IO_STATS.reset()
    specs = plan_chunks(info, ["w"], ["float64"], min_chunk_rows=1000)
    compute(specs, ["w"], ["float64"])
    assert seen == [["w"]]
    meta = pq.read_metadata(path)
    w_bytes = sum(meta.row_group(i).column(3).total_compressed_size for i in range(10))
    assert IO_STATS.snapshot()[1] == w_bytes


def test_missing_columns_fill_nan_and_dtypes(tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    write(a, n=10, extra=np.arange(10))
    write(b, n=5)
    infos = [read_parquet_info(a), read_parquet_info(b)]
    dtypes = common_dtypes(infos, ["extra", "v"])
    assert dtypes == ["float64", "float64"]
    specs = [s for i in infos for s in plan_chunks(i, ["extra", "v"], dtypes)]
    out = compute(specs, ["extra", "v"], dtypes)
    np.testing.assert_array_equal(out["extra"][:10], np.arange(10.0))
    assert np.isnan(out["extra"][10:]).all()


def test_integer_nulls_become_float_nan(tmp_path):
    path = tmp_path / "n.parquet"
    pq.write_table(pa.table({"id": pa.array([1, None, 3], pa.int64())}), path)
    info = read_parquet_info(path)
    assert info.dtypes["id"] == "float64"
    out = compute(plan_chunks(info, ["id"], ["float64"]), ["id"], ["float64"])
    np.testing.assert_array_equal(out["id"], [1.0, np.nan, 3.0])
    # a writer without statistics: nulls are found at read time and reported
    nostats = tmp_path / "ns.parquet"
    pq.write_table(
        pa.table({"id": pa.array([1, None], pa.int64())}), nostats, write_statistics=False
    )
    info = read_parquet_info(nostats)
    assert info.dtypes["id"] == "int64"
    with pytest.raises(FormatError, match="holds nulls but its footer statistics announced none"):
        read_chunk(plan_chunks(info, ["id"], ["int64"])[0])


def test_spec_pickles_and_names_are_deterministic(tmp_path):
    path = tmp_path / "a.parquet"
    write(path)
    info = read_parquet_info(path)
    specs = plan_chunks(info, ["v"], ["float64"], min_chunk_rows=1)
    assert pickle.loads(pickle.dumps(specs[3])) == specs[3]
    a = lazy_columns(specs, ["v"], ["float64"])["v"]
    b = lazy_columns(
        plan_chunks(read_parquet_info(path), ["v"], ["float64"], min_chunk_rows=1),
        ["v"],
        ["float64"],
    )["v"]
    assert a.name == b.name
    c = lazy_columns(specs[:5], ["v"], ["float64"])["v"]
    assert c.name != a.name


def test_changed_file_refused(tmp_path):
    path = tmp_path / "a.parquet"
    write(path)
    specs = plan_chunks(read_parquet_info(path), ["v"], ["float64"])
    write(path, n=50)
    with pytest.raises(FormatError, match="changed since it was opened"):
        read_chunk(specs[0])


def test_page_crcs_are_verified_and_a_change_is_source_changed(tmp_path):
    import pyarrow as pa

    from neurocube.errors import CorruptDataError, SourceChangedError
    from neurocube.sources.parquet import lazy_columns, plan_chunks
    from neurocube.sources.parquet_meta import read_parquet_info

    path = tmp_path / "crc.parquet"
    x = np.random.default_rng(0).standard_normal(4000)
    pq.write_table(pa.table({"frame": np.arange(4000), "x": x}), path, row_group_size=1000,
                   write_page_checksum=True, compression="none", use_dictionary=False)

    def values():
        info = read_parquet_info(path)
        chunks = plan_chunks(info, ["x"], ["float64"])
        return lazy_columns(chunks, ["x"], ["float64"])["x"].compute()

    np.testing.assert_array_equal(values(), x)
    column = pq.read_metadata(path).row_group(2).column(1)
    raw = bytearray(path.read_bytes())
    raw[column.data_page_offset + 200] ^= 0x10  # inside the first data page
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptDataError, match=r"crc\.parquet: row groups \[.*checksum"):
        values()
    info = read_parquet_info(path)
    arrays = lazy_columns(plan_chunks(info, ["x"], ["float64"]), ["x"], ["float64"])
    os.utime(path, ns=(info.mtime_ns + 10**9, info.mtime_ns + 10**9))
    with pytest.raises(SourceChangedError, match=r"crc\.parquet: changed since it was opened"):
        arrays["x"].compute()


def _rewrite_keeping_size_and_mtime(path, values):
    """Rewrite ``path`` in place with other values of the same size, then set its mtime back."""
    before = path.stat()
    write_same = values(path)
    assert path.stat().st_size == before.st_size, write_same
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert after.st_ctime_ns != before.st_ctime_ns


def _same_size_other_values(seed):
    def rewrite(path):
        x = np.random.default_rng(seed).standard_normal(400)
        pq.write_table(pa.table({"frame": np.arange(400), "x": x}), path, row_group_size=100,
                       compression="none", use_dictionary=False)
        return x
    return rewrite


def test_a_rewrite_that_keeps_size_and_resets_mtime_is_source_changed(tmp_path):
    import time

    from neurocube.errors import SourceChangedError

    path = tmp_path / "same.parquet"
    _same_size_other_values(0)(path)
    arrays = lazy_columns(plan_chunks(read_parquet_info(path), ["x"], ["float64"]), ["x"],
                          ["float64"])
    time.sleep(0.02)  # the ctime clock must move on (coarse on some filesystems)
    _rewrite_keeping_size_and_mtime(path, _same_size_other_values(1))
    with pytest.raises(SourceChangedError, match=r"same\.parquet: changed since it was opened"):
        arrays["x"].compute()


def test_the_table_footer_cache_and_reads_see_a_rewrite_that_resets_mtime(tmp_path):
    import time

    from neurocube.errors import SourceChangedError
    from neurocube.sources import table

    path = tmp_path / "same.parquet"
    _same_size_other_values(0)(path)
    layout = table.parquet_layout(str(path))
    spec = table.ParquetRowGroup(layout.path, layout.size, layout.mtime_ns, 0, ("x",), "<f8",
                                 ctime_ns=layout.ctime_ns)
    time.sleep(0.02)
    _rewrite_keeping_size_and_mtime(path, _same_size_other_values(1))
    with pytest.raises(SourceChangedError, match=r"same\.parquet: changed since it was opened"):
        table.read_feature_rowgroup(spec)
    with pytest.raises(SourceChangedError, match="changed since it was opened"):
        table.read_columns(layout, ["x"])
    # opened again: a new layout, a new footer cache entry (keyed by ctime), the new values
    fresh = table.parquet_layout(str(path))
    assert fresh.ctime_ns != layout.ctime_ns
    np.testing.assert_array_equal(
        table.read_columns(fresh, ["x"])["x"], pq.read_table(path)["x"].to_numpy()
    )
    footer = table._metadata(fresh.path, fresh.size, fresh.mtime_ns, "", None, fresh.ctime_ns)
    on_disk = pq.read_metadata(path)
    assert footer.row_group(0).column(1).statistics.max == (
        on_disk.row_group(0).column(1).statistics.max
    )
