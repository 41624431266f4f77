"""open_embeddings / write_combined_tables / open_combined_table against numpy.load and pyarrow."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import dask
import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import neurocube
import neurocube.sources.npz as npz_source
from neurocube.datasets.embeddings import aggregate_mean, open_combined_table, write_combined_tables
from neurocube.errors import (
    CorruptDataError,
    DataNotFoundError,
    FormatError,
    NeurocubeWarning,
    SelectionError,
    TruncatedFileError,
    UnsafeDataError,
)
from neurocube.storage import IO_STATS
from tests.fixtures.embeddings_tree import make_tree, recording_values, token_values, window_values

SAMPLE = Path(__file__).parents[2] / "data" / "coco_pipe" / "eeg_foundation_embeddings"


@pytest.fixture
def no_array_reads(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("array data was read")

    monkeypatch.setattr(npz_source, "_fill", forbidden)
    monkeypatch.setattr(npz_source, "_inflate", forbidden)


@pytest.fixture
def tree(tmp_path):
    recordings = make_tree(tmp_path)
    return tmp_path, recordings


def _sample_paths(kind="embedding"):
    suffix = "_embedding.npz" if kind == "embedding" else "_tokens.npz"
    return sorted(SAMPLE.rglob(f"*{suffix}"))


# --------------------------------------------------------------------------- real sample


def test_sample_recording_matches_numpy_load():
    ds = neurocube.open_embeddings(SAMPLE)
    expected = np.stack([np.load(p)["recording_embedding"] for p in _sample_paths()])
    assert ds.embedding.dims == ("recording", "feature")
    assert ds.embedding.dtype == np.float32
    np.testing.assert_array_equal(ds.embedding.values, expected)
    assert list(ds.subject.values) == ["0001", "0001", "0002", "0002"]
    assert list(ds.recording_id.values) == [
        json.loads(p.with_suffix(".json").read_text())["recording_id"] for p in _sample_paths()
    ]
    assert list(ds.feature.values) == [f"embedding_{i:04d}" for i in range(4)]
    assert ds.attrs["neurocube_sources"] == [str(p.resolve()) for p in _sample_paths()]
    json.dumps(ds.attrs)


def test_sample_epoch_matches_numpy_load_and_combined_table():
    ds = neurocube.open_embeddings(SAMPLE, "epoch")
    loads = [np.load(p) for p in _sample_paths()]
    np.testing.assert_array_equal(
        ds.embedding.values, np.concatenate([z["window_embeddings"] for z in loads])
    )
    for key in ("window_index", "window_start", "window_stop"):
        np.testing.assert_array_equal(ds[key].values, np.concatenate([z[key] for z in loads]))
    # the table coco-pipe's merge step wrote holds the same rows
    table = pq.read_table(SAMPLE / "combined" / "cbramod_EO_epoch_embeddings.parquet").to_pandas()
    features = [c for c in table.columns if c.startswith("embedding_")]
    np.testing.assert_array_equal(ds.embedding.values, table[features].to_numpy())
    np.testing.assert_array_equal(ds.recording_id.values, table["recording_id"].to_numpy(str))
    np.testing.assert_array_equal(ds.window_index.values, table["window_index"].to_numpy())


def test_sample_tokens_keep_native_axes():
    ds = neurocube.open_embeddings(SAMPLE, "token")
    assert ds.embedding.dims == ("epoch", "channel", "patch", "feature")
    expected = np.concatenate([np.load(p)["token_embeddings"] for p in _sample_paths("token")])
    np.testing.assert_array_equal(ds.embedding.values, expected)


def test_sample_open_reads_no_arrays(no_array_reads):
    IO_STATS.reset()
    ds = neurocube.open_embeddings(SAMPLE, "epoch")
    ds = ds.sel(feature=["embedding_0001", "embedding_0003"]).isel(epoch=slice(2, 9))
    _, nbytes = IO_STATS.snapshot()
    total = sum(p.stat().st_size for p in _sample_paths())
    assert nbytes <= total + 10_000  # small files are read whole once while the directory is parsed
    with pytest.raises(AssertionError, match="array data was read"):
        _ = ds.embedding.values


# --------------------------------------------------------------------------- generated trees


def test_generated_recording_values(tree):
    root, recordings = tree
    ds = neurocube.open_embeddings(root, model_key="CBRAMOD", condition="EO")
    chosen = [r for r in recordings if r.model_key == "cbramod" and r.condition == "EO"]
    chosen.sort(key=lambda r: str(r.path))
    assert ds.sizes == {"recording": 6, "feature": 6}
    expected = np.stack([recording_values(r.number, 6) for r in chosen])
    np.testing.assert_array_equal(ds.embedding.values, expected)
    np.testing.assert_array_equal(
        ds.embedding.values, np.stack([np.load(r.path)["recording_embedding"] for r in chosen])
    )
    assert list(ds.subject.values) == [r.subject for r in chosen]
    assert list(ds.session.values) == [r.session for r in chosen]
    assert ds.sfreq.dtype == np.float64 and ds.n_channels.dtype == np.int64
    assert ds.normalize_embeddings.dtype == bool
    assert list(ds.n_windows.values) == [r.n_windows for r in chosen]
    assert "embedding_shape" not in ds.coords  # lists are not coordinates


def test_generated_epoch_values_many_chunks(tree):
    root, recordings = tree
    ds = neurocube.open_embeddings(root, "epoch", "labram", files_per_chunk=4)
    chosen = sorted((r for r in recordings if r.model_key == "Labram"), key=lambda r: str(r.path))
    assert ds.embedding.data.chunks[0] == tuple(
        sum(r.n_windows for r in chosen[i : i + 4]) for i in range(0, len(chosen), 4)
    )
    expected = np.concatenate([window_values(r.number, r.n_windows, 8) for r in chosen])
    np.testing.assert_array_equal(ds.embedding.values, expected)
    np.testing.assert_array_equal(
        ds.window_start.values, np.concatenate([np.arange(r.n_windows) * 500 for r in chosen])
    )
    assert list(ds.recording_id.values) == [
        f"subject-{r.subject}_session-{r.session}_run-01"
        for r in chosen
        for _ in range(r.n_windows)
    ]


def test_generated_tokens_float16(tree):
    root, recordings = tree
    ds = neurocube.open_embeddings(root, "token", model_key="cbramod", condition="EC")
    chosen = sorted(
        (r for r in recordings if r.model_key == "cbramod" and r.condition == "EC"),
        key=lambda r: str(r.token_path),
    )
    assert ds.embedding.dtype == np.float16
    assert ds.embedding.dims == ("epoch", "channel", "patch", "feature")
    expected = np.concatenate([token_values(r.number, r.n_windows, (3, 2, 5)) for r in chosen])
    np.testing.assert_array_equal(ds.embedding.values, expected)


def test_stored_archives_are_read_and_crc_checked(tmp_path):
    # stored (np.savez) members are read straight into the output and checked against the
    # ZIP directory's CRC-32: a flipped byte is an error naming the file, never a value
    recordings = make_tree(tmp_path, models=("cbramod",), conditions=("EO",), compressed=False)
    ds = neurocube.open_embeddings(tmp_path, "epoch")
    ordered = sorted(recordings, key=lambda r: str(r.path))
    np.testing.assert_array_equal(
        ds.embedding.values,
        np.concatenate([window_values(r.number, r.n_windows, 6) for r in ordered]),
    )
    victim = ordered[1].path
    member = npz_source.read_npz_directory(victim)["window_embeddings"]
    raw = bytearray(victim.read_bytes())
    raw[member.data_offset + member.npy_header_size + 3] ^= 0x01
    victim.write_bytes(bytes(raw))
    ds = neurocube.open_embeddings(tmp_path, "epoch")
    with pytest.raises(CorruptDataError, match=victim.name):
        ds.embedding.compute()


def test_deflated_members_inflated_per_chunk(tree, monkeypatch):
    # opening inflates nothing; computing one chunk inflates exactly that chunk's files
    root, recordings = tree
    inflated = []
    real = npz_source._inflate

    def spy(member, fh):
        inflated.append((member.path, member.name))
        return real(member, fh)

    monkeypatch.setattr(npz_source, "_inflate", spy)
    ds = neurocube.open_embeddings(root, "epoch", "cbramod", "EO", files_per_chunk=2)
    assert inflated == []
    chosen = sorted(
        os.path.abspath(r.path)
        for r in recordings
        if r.model_key == "cbramod" and r.condition == "EO"
    )
    assert len(ds.embedding.data.chunks[0]) == len(chosen) // 2
    block = ds.embedding.data.blocks[1].compute(scheduler="sync")
    assert inflated == [(p, "window_embeddings") for p in chosen[2:4]]
    np.testing.assert_array_equal(
        block, np.concatenate([np.load(p)["window_embeddings"] for p in chosen[2:4]])
    )


def _corrupt_deflate_tail(path):
    member = npz_source.read_npz_directory(path)["window_embeddings"]
    assert member.compressed_size > 400  # the damage lies past the .npy header
    raw = bytearray(path.read_bytes())
    end = member.data_offset + member.compressed_size
    raw[end - 120 : end - 40] = bytes(80)
    path.write_bytes(bytes(raw))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:200])


def _drop_sidecar(path):
    path.with_suffix(".json").unlink()


def _list_sidecar(path):
    path.with_suffix(".json").write_text('["not", "an", "object"]')


def _object_member(path):
    with np.load(path) as payload:
        arrays = dict(payload)
    arrays["window_start"] = arrays["window_start"].astype(object)
    np.savez_compressed(path, **arrays)


@pytest.mark.parametrize(
    ("damage", "error", "message"),
    [
        (_truncate, TruncatedFileError, r"\.npz: not a complete NPZ"),
        (_drop_sidecar, DataNotFoundError, r"\.json: missing embedding sidecar"),
        (_list_sidecar, FormatError, r"\.json: expected a JSON object .* list"),
        (_object_member, UnsafeDataError, r"\.npz: array 'window_start' has an object dtype"),
    ],
)
def test_bad_artifact_in_a_tree_is_named_when_opening(tmp_path, damage, error, message):
    recordings = make_tree(
        tmp_path, models=("m",), conditions=("EO",), tokens=False, manifest=False
    )
    victim = recordings[3].path
    damage(victim)
    with pytest.raises(error, match=re.escape(str(victim)[: -len(".npz")]) + message):
        neurocube.open_embeddings(tmp_path, "epoch")


def test_corrupt_member_is_named_when_computing(tmp_path):
    recordings = make_tree(
        tmp_path,
        models=("m",),
        conditions=("EO",),
        n_features={"m": 512},
        windows_of=lambda n: 40,
        tokens=False,
        manifest=False,
    )
    victim = recordings[2].path
    _corrupt_deflate_tail(victim)
    ds = neurocube.open_embeddings(tmp_path, "epoch")  # headers are intact: opening works
    with pytest.raises(
        FormatError,
        match=re.escape(victim.name) + r": array 'window_embeddings' (does not "
        r"inflate|fails its ZIP CRC)",
    ):
        _ = ds.embedding.values


def test_explicit_paths_checked_for_model_and_kind(tree):
    _, recordings = tree
    first = [r for r in recordings if r.condition == "EO" and r.subject == "01"]
    paths = [r.path for r in first if r.session == "01"]  # one cbramod, one Labram
    with pytest.raises(
        FormatError,
        match=r"Requested model_key='cbramod', but 1 artifacts hold another model, "
        r"e\.g\. .*desc-LabramEOMean_embedding\.npz",
    ):
        neurocube.open_embeddings(paths, model_key="cbramod")
    with pytest.raises(
        FormatError,
        match=r"desc-cbramodEONative_tokens\.npz: is not a pooled embedding artifact, so it "
        r"has no array for representation 'epoch'",
    ):
        neurocube.open_embeddings([first[0].token_path], "epoch")


def test_mixed_models_refused(tree):
    root, _ = tree
    with pytest.raises(
        FormatError,
        match=r"several foundation models .*'cbramod': .*_embedding\.npz \(12 files\); 'labram'",
    ):
        neurocube.open_embeddings(root)


def test_mixed_widths_refused(tmp_path):
    make_tree(
        tmp_path / "a",
        models=("m",),
        conditions=("EO",),
        subjects=("01",),
        n_features={"m": 4},
        failed_record=False,
    )
    make_tree(
        tmp_path / "b",
        models=("m",),
        conditions=("EO",),
        subjects=("02",),
        n_features={"m": 5},
        failed_record=False,
    )
    paths = sorted((tmp_path / "a").rglob("*_embedding.npz")) + sorted(
        (tmp_path / "b").rglob("*_embedding.npz")
    )
    with pytest.raises(
        FormatError, match=r"different embedding widths: \(4,\): .*sub-01.*\(5,\): .*sub-02"
    ):
        neurocube.open_embeddings(paths)


def test_nothing_found_and_bad_arguments(tmp_path, tree):
    root, _ = tree
    with pytest.raises(DataNotFoundError, match=r"No embedding artifacts found .*model_key='nope'"):
        neurocube.open_embeddings(root, model_key="nope")
    with pytest.raises(SelectionError, match=r"representation must be one of .*'subject'"):
        neurocube.open_embeddings(root, "subject", model_key="cbramod")
    with pytest.raises(SelectionError, match=r"aggregate_by='window_index' is read lazily"):
        neurocube.open_embeddings(root, "epoch", "cbramod", aggregate_by="window_index")
    with pytest.raises(
        SelectionError, match=r"aggregate_by='age' is not a coordinate along 'epoch'"
    ):
        neurocube.open_embeddings(root, "epoch", "cbramod", aggregate_by="age")
    with pytest.raises(DataNotFoundError, match=r"no such derivative folder"):
        neurocube.open_embeddings(tmp_path / "missing")


def test_graph_is_deterministic_and_lazy(tree, no_array_reads):
    root, _ = tree
    first = neurocube.open_embeddings(root, "epoch", "cbramod", "EO")
    second = neurocube.open_embeddings(root, "epoch", "cbramod", "EO")
    assert first.embedding.data.name == second.embedding.data.name
    assert first.window_index.data.name == second.window_index.data.name
    other = neurocube.open_embeddings(root, "epoch", "cbramod", "EC")
    assert other.embedding.data.name != first.embedding.data.name
    assert all(not np.isnan(c).any() for c in first.embedding.data.chunks)
    agg = neurocube.open_embeddings(root, "epoch", "cbramod", "EO", aggregate_by="subject")
    assert agg.embedding.shape == (3, 6)


def test_subject_aggregation_is_mean_of_epoch_rows(tree):
    root, recordings = tree
    ds = neurocube.open_embeddings(root, "epoch", "labram", "EC", aggregate_by="subject")
    chosen = [r for r in recordings if r.model_key == "Labram" and r.condition == "EC"]
    assert list(ds.subject.values) == ["01", "02", "03"]
    for i, subject in enumerate(ds.subject.values):
        rows = np.concatenate(
            [window_values(r.number, r.n_windows, 8) for r in chosen if r.subject == subject]
        )
        np.testing.assert_allclose(ds.embedding.values[i], rows.mean(axis=0), rtol=1e-6)
        assert ds.row_count.values[i] == len(rows)
    assert set(ds.condition.values) == {"EC"} and "session" not in ds.coords
    # several keys: one row per (condition, subject)
    both = neurocube.open_embeddings(root, "epoch", "labram", aggregate_by=["condition", "subject"])
    assert both.sizes["group"] == 6
    np.testing.assert_allclose(
        both.embedding.values[(both.condition == "EC").values], ds.embedding.values, rtol=1e-6
    )


def test_aggregation_ignores_nan_like_the_original(tmp_path):
    recordings = make_tree(
        tmp_path, models=("m",), conditions=("EO",), subjects=("01",), sessions=("01", "02")
    )
    with np.load(recordings[0].path) as payload:
        arrays = dict(payload)
    arrays["window_embeddings"][0, 0] = np.nan
    arrays["window_embeddings"][:, 1] = np.nan
    np.savez_compressed(recordings[0].path, **arrays)
    ds = aggregate_mean(neurocube.open_embeddings(tmp_path, "epoch"), "subject")
    rows = np.concatenate([np.load(r.path)["window_embeddings"] for r in recordings])
    np.testing.assert_allclose(ds.embedding.values[0], np.nanmean(rows, axis=0), rtol=1e-6)


def test_matches_coco_pipe_loader(tree):
    coco = pytest.importorskip("coco_pipe.io.embeddings")
    root, _ = tree
    for representation in ("recording", "epoch"):
        original = coco.load_embedding_derivatives(root, representation, model_key="cbramod")
        ours = neurocube.open_embeddings(root, representation, "cbramod")
        np.testing.assert_array_equal(ours.embedding.values, np.asarray(original.X))
    original = coco.load_embedding_derivatives(
        root, "epoch", model_key="cbramod", aggregate_by="subject"
    )
    ours = neurocube.open_embeddings(root, "epoch", "cbramod", aggregate_by="subject")
    np.testing.assert_allclose(ours.embedding.values, np.asarray(original.X), rtol=1e-6)


# --------------------------------------------------------------------------- combined tables


def test_combined_tables_reproduce_the_sample(tmp_path):
    root = tmp_path / "d"
    shutil.copytree(SAMPLE, root)
    written = write_combined_tables(root, "cbramod", representations=("epoch", "recording"))
    assert [p.name for p in written] == [
        "cbramod_EO_epoch_embeddings.parquet",
        "cbramod_EO_recording_embeddings.parquet",
    ]
    for path in written:
        ours = pq.read_table(path)
        original = pq.read_table(SAMPLE / "combined" / path.name)
        assert ours.schema.remove_metadata().equals(original.schema.remove_metadata())
        assert ours.to_pandas().equals(original.to_pandas())


def test_combined_tables_row_groups_and_roundtrip(tree):
    root, _ = tree
    written = write_combined_tables(root, "cbramod", chunk_bytes=60, parallel_chunks=2)
    assert len(written) == 6  # 2 conditions x 3 levels
    for condition in ("EC", "EO"):
        for level in ("epoch", "recording", "subject"):
            path = root / "combined" / f"cbramod_{condition}_{level}_embeddings.parquet"
            lazy = (
                neurocube.open_embeddings(
                    root, "epoch", "cbramod", condition, aggregate_by="subject"
                )
                if level == "subject"
                else neurocube.open_embeddings(root, level, "cbramod", condition)
            )
            table = open_combined_table(root, "cbramod", condition, level)
            assert table.embedding.dims == (level, "feature")
            metadata = pq.read_metadata(path)
            assert table.embedding.data.chunks[0] == tuple(
                metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)
            )
            if level != "subject":
                assert metadata.num_row_groups > 1
            np.testing.assert_array_equal(table.embedding.values, lazy.embedding.values)
            plain = pq.read_table(path).to_pandas()
            features = [c for c in plain.columns if c.startswith("embedding_")]
            np.testing.assert_array_equal(table.embedding.values, plain[features].to_numpy())
            np.testing.assert_array_equal(table.subject.values, plain["subject"].to_numpy(str))


def test_combined_tables_stream_one_row_group_at_a_time(tmp_path, monkeypatch):
    # each chunk is read, then written as one row group, before the next chunk is read:
    # the writer never holds more than parallel_chunks chunks
    recordings = make_tree(
        tmp_path, models=("m",), conditions=("EO",), subjects=("01", "02", "03"), tokens=False
    )
    events: list[object] = []
    real_inflate = npz_source._inflate
    real_write = pq.ParquetWriter.write_table

    def spy_inflate(member, fh):
        events.append(member.name)
        return real_inflate(member, fh)

    def spy_write(self, table, *args, **kwargs):
        events.append(table.num_rows)
        return real_write(self, table, *args, **kwargs)

    monkeypatch.setattr(npz_source, "_inflate", spy_inflate)
    monkeypatch.setattr(pq.ParquetWriter, "write_table", spy_write)
    # chunk_bytes=1: one file per chunk
    written = write_combined_tables(
        tmp_path, "m", ["EO"], ["epoch", "recording"], chunk_bytes=1, parallel_chunks=1
    )
    ordered = sorted(recordings, key=lambda r: str(r.path))
    expected: list[object] = []
    for r in ordered:  # epoch table: window_embeddings + window_index, then one row group
        expected += [{"window_embeddings", "window_index"}, r.n_windows]
    for _ in ordered:  # recording table
        expected += [{"recording_embedding"}, 1]
    got: list[object] = []
    reads: set[str] = set()
    for event in events:
        if isinstance(event, str):
            reads.add(event)
        else:
            got += [reads, event]
            reads = set()
    assert got == expected
    for path, key in zip(written, ("window_embeddings", "recording_embedding"), strict=True):
        metadata = pq.read_metadata(path)
        assert metadata.num_row_groups == len(ordered)
        plain = pq.read_table(path).to_pandas()
        features = [c for c in plain.columns if c.startswith("embedding_")]
        oracle = [np.load(r.path)[key] for r in ordered]
        np.testing.assert_array_equal(
            plain[features].to_numpy(),
            np.concatenate(oracle) if key == "window_embeddings" else np.stack(oracle),
        )


def test_combined_table_open_is_lazy(tree, monkeypatch):
    root, _ = tree
    write_combined_tables(root, "cbramod", ["EO"], ["recording"])
    import neurocube.sources.table as table_source

    def forbidden(spec):
        raise AssertionError("feature columns were read")

    monkeypatch.setattr(table_source, "read_feature_rowgroup", forbidden)
    ds = open_combined_table(root, "cbramod", "EO", "recording")
    again = open_combined_table(root, "cbramod", "EO", "recording")
    assert ds.embedding.data.name == again.embedding.data.name
    assert ds.sizes == {"recording": 6, "feature": 6}


def test_combined_table_missing(tree):
    root, _ = tree
    write_combined_tables(root, "cbramod", ["EO"], ["recording"])
    with pytest.raises(
        DataNotFoundError,
        match=r"cbramod_EC_recording_embeddings\.parquet: combined table not found "
        r".*cbramod_EO_recording",
    ):
        open_combined_table(root, "cbramod", "EC", "recording")


# --------------------------------------------------------------------------- distributed


@pytest.fixture(scope="module")
def cluster_client():
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(
            n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


def test_local_cluster_matches_threads(tree, cluster_client):
    root, _ = tree
    ds = neurocube.open_embeddings(root, "epoch", "labram", files_per_chunk=3)
    agg = neurocube.open_embeddings(root, "epoch", "labram", "EO", aggregate_by="subject")
    with dask.config.set(scheduler="threads"):
        threaded = ds.embedding.values
        threaded_agg = agg.embedding.values
    distributed_values, distributed_agg = dask.compute(
        ds.embedding.data, agg.embedding.data, scheduler=cluster_client.get
    )
    np.testing.assert_array_equal(distributed_values, threaded)
    np.testing.assert_array_equal(distributed_agg, threaded_agg)
    write_combined_tables(root, "labram", ["EO"], ["recording"])
    table = open_combined_table(root, "labram", "EO", "recording")
    np.testing.assert_array_equal(
        cluster_client.compute(table.embedding.data).result(),
        neurocube.open_embeddings(root, "recording", "labram", "EO").embedding.values,
    )


# zarr 3 warns that fixed-width unicode (numpy "<U") has no Zarr v3 spec yet; the store still
# round-trips, which is what this test checks.
@pytest.mark.filterwarnings("ignore:.*does not have a Zarr V3 specification")
@pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part")
def test_single_file_and_zarr_roundtrip(tmp_path):
    import xarray as xr

    one = neurocube.open_embeddings(_sample_paths()[1], "epoch")
    with np.load(_sample_paths()[1]) as payload:
        np.testing.assert_array_equal(one.embedding.values, payload["window_embeddings"])
    for representation, kwargs in [
        ("epoch", {}),
        ("token", {}),
        ("epoch", {"aggregate_by": "subject"}),
    ]:
        ds = neurocube.open_embeddings(SAMPLE, representation, **kwargs)
        store = tmp_path / f"{representation}-{len(kwargs)}.zarr"
        ds.to_zarr(store)
        back = xr.open_zarr(store)
        np.testing.assert_array_equal(back.embedding.values, ds.embedding.values)
        assert list(back.subject.values) == list(ds.subject.values)


@settings(max_examples=30, deadline=None)
@given(
    groups=st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=40),
    chunk=st.integers(1, 7),
    nan_fraction=st.sampled_from([0.0, 0.3]),
)
def test_property_group_mean_matches_pandas(groups, chunk, nan_fraction):
    import dask.array as da
    import pandas as pd
    import xarray as xr

    rng = np.random.default_rng(len(groups) * 10 + chunk)
    values = rng.standard_normal((len(groups), 3)).astype(np.float32)
    values[rng.random(values.shape) < nan_fraction] = np.nan
    ds = xr.Dataset(
        {"embedding": (("epoch", "feature"), da.from_array(values, chunks=(chunk, 3)))},
        coords={"subject": ("epoch", np.asarray(groups))},
    )
    got = aggregate_mean(ds, "subject")
    # The oracle averages in float64: aggregate_mean accumulates float32 rows in float64 and
    # rounds once, while pandas sums float32 in float32, which drifts by a few ulps on means
    # near zero (seen in CI: -0.0039722822 vs -0.0039722919).
    expected = (
        pd.DataFrame(values.astype(np.float64)).groupby(np.asarray(groups), sort=False).mean()
    )
    assert list(got.subject.values) == list(expected.index)
    assert got.embedding.dtype == np.float32
    np.testing.assert_allclose(
        got.embedding.values, expected.to_numpy().astype(np.float32), rtol=1e-6, atol=1e-8
    )
    assert list(got.row_count.values) == list(pd.Series(groups).value_counts(sort=False))


def _break_sidecars(recordings):
    """Damage three sidecars three ways: gone, empty, and without model_key."""
    gone, empty, keyless = (r.path.with_suffix(".json") for r in recordings[1:4])
    gone.unlink()
    empty.write_text("")
    saved = json.loads(keyless.read_text())
    del saved["model_key"]
    keyless.write_text(json.dumps(saved))
    return gone, empty, keyless


def test_a_bad_sidecar_is_an_error_naming_it_not_a_dropped_row(tmp_path):
    recordings = make_tree(tmp_path, models=("cbramod",), conditions=("EO",), tokens=False)
    assert neurocube.open_embeddings(tmp_path, model_key="cbramod").sizes["recording"] == 6
    gone, empty, keyless = _break_sidecars(recordings)
    with pytest.raises(DataNotFoundError, match=re.escape(str(gone))):
        neurocube.open_embeddings(tmp_path, model_key="cbramod")
    gone.write_text(recordings[0].path.with_suffix(".json").read_text())
    with pytest.raises(FormatError, match=re.escape(str(empty)) + r": sidecar is not valid JSON"):
        neurocube.open_embeddings(tmp_path, model_key="cbramod")
    empty.write_text("[" * 100_000)  # deep nesting: json's recursion limit
    with pytest.raises(FormatError, match=re.escape(str(empty))):
        neurocube.open_embeddings(tmp_path, model_key="cbramod")
    empty.write_text('{"model_key": "cbramod", "sfreq": ' + "9" * 5000 + "}")
    with pytest.raises(FormatError, match=re.escape(str(empty))):
        neurocube.open_embeddings(tmp_path, model_key="cbramod")
    empty.write_text(recordings[0].path.with_suffix(".json").read_text())
    with pytest.raises(FormatError, match=re.escape(str(keyless)) + r": the sidecar has no"):
        neurocube.open_embeddings(tmp_path, model_key="cbramod")


def test_on_error_skip_warns_and_lists_what_it_skipped(tmp_path):
    recordings = make_tree(tmp_path, models=("cbramod",), conditions=("EO",), tokens=False)
    broken = _break_sidecars(recordings)
    with pytest.warns(NeurocubeWarning, match="skipped") as caught:
        ds = neurocube.open_embeddings(tmp_path, model_key="cbramod", on_error="skip")
    assert ds.sizes["recording"] == 3
    assert sorted(ds.attrs["skipped"]) == sorted(str(p.with_suffix(".npz")) for p in broken)
    assert len(ds.attrs["skipped_errors"]) == 3
    assert len([w for w in caught if "skipped" in str(w.message)]) == 3
    kept = sorted(str(r.path) for r in recordings[:1] + recordings[4:])
    assert sorted(ds.attrs["neurocube_sources"]) == kept
    with pytest.raises(SelectionError, match="on_error"):
        neurocube.open_embeddings(tmp_path, model_key="cbramod", on_error="ignore")


def test_a_record_its_writer_marked_failed_is_skipped_silently(tmp_path):
    # the fixture's manifest holds a failed record whose archive is junk and has no sidecar:
    # that is the writer's verdict, not damage, in the manifest and in a rescan alike
    make_tree(tmp_path, models=("cbramod",), conditions=("EO",), tokens=False)
    assert neurocube.open_embeddings(tmp_path, model_key="cbramod").sizes["recording"] == 6
    with pytest.raises(DataNotFoundError, match="No embedding artifacts found"):
        neurocube.open_embeddings(tmp_path, model_key="other")  # rescans the folder
