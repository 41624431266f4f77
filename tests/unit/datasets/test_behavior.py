from __future__ import annotations

import json
import os
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import neurocube
from neurocube.errors import (
    DataNotFoundError,
    FormatError,
    NeurocubeWarning,
    SelectionError,
)
from neurocube.sources import parquet as parquet_source
from neurocube.storage import IO_STATS
from tests.unit.datasets._behavior_data import (
    SAMPLE_GROUP,
    SAMPLE_SEQUENCE,
    SeqSpec,
    copy_sample,
    hierarchical,
    make_dataset,
    value,
)


@pytest.fixture
def sample(tmp_path):
    return copy_sample(tmp_path / "sample")


@pytest.fixture
def gen(tmp_path):
    seqs = hierarchical()
    seqs[1].missing_frames = (3, 4, 5)
    seqs[1].nan_frames = (10,)
    seqs[2].n_frames = 25
    seqs[3].first_frame = 5
    return make_dataset(tmp_path / "gen", seqs)


def _refuse_reads(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("data read while building the graph")

    monkeypatch.setattr(parquet_source, "read_table", boom)
    monkeypatch.setattr("neurocube.datasets.behavior.dense.read_table", boom)


# ----------------------------------------------------------------------------- real sample


def test_sample_long_form_matches_pandas(sample):
    ds = neurocube.open_behavior(sample)
    tracks = ds.tracks()
    path = tracks.attrs["neurocube_sources"][0]
    ref = pd.read_parquet(path)
    out = tracks.compute()
    assert out.sizes["row"] == len(ref) == 40
    for col in ("frame", "time", "id"):
        np.testing.assert_array_equal(out[col].values, ref[col].to_numpy())
    for col in ("X", "Y", "poseX3", "poseY6", "poseP0", "label"):
        np.testing.assert_array_equal(out[col].values, ref[col].to_numpy())
    assert set(out["group"].values) == {SAMPLE_GROUP}
    assert set(out["sequence"].values) == {SAMPLE_SEQUENCE}
    assert tracks.attrs["std_formats"] == ["mosaic_v1"]
    assert tracks.attrs["units"] == "pixels"
    assert tracks["X"].attrs["units"] == "pixels"
    json.dumps(tracks.attrs)  # serialisable


def test_sample_dense_matches_pandas(sample):
    ds = neurocube.open_behavior(sample)
    dense = ds.to_dense()
    assert dict(dense.sizes) == {"frame": 20, "space": 2, "keypoint": 7, "individual": 2}
    assert list(dense["keypoint"].values) == [str(k) for k in range(7)]
    ref = pd.read_parquet(dense.attrs["neurocube_sources"][0])
    out = dense.compute()
    for _, row in ref.iterrows():
        f, i = int(row["frame"]), int(row["id"])
        for k in range(7):
            got = out["position"].sel(frame=f, individual=i, keypoint=str(k)).values
            np.testing.assert_array_equal(got, [row[f"poseX{k}"], row[f"poseY{k}"]])
            assert out["confidence"].sel(frame=f, individual=i, keypoint=str(k)) == row[f"poseP{k}"]
        np.testing.assert_array_equal(
            out["centroid"].sel(frame=f, individual=i).values, [row["X"], row["Y"]]
        )


def test_sample_labels_event_table_and_names(sample):
    ds = neurocube.open_behavior(sample)
    with pytest.warns(NeurocubeWarning, match=r"label_names.*trusted=True"):
        events = ds.labels("behavior")
    path = events.attrs["neurocube_sources"][0]
    with np.load(path, allow_pickle=False) as npz:
        frames, labels, pairs = npz["frames"], npz["labels"], npz["individual_ids"]
    out = events.compute()
    np.testing.assert_array_equal(out["frames"].values, frames)
    np.testing.assert_array_equal(out["labels"].values, labels)
    np.testing.assert_array_equal(out["individual_ids"].values, pairs)
    assert list(out["label_name"].values) == [
        "attack", "investigation", "mount", "other_interaction"
    ]  # fmt: skip
    assert ds.label_map("behavior") == {
        0: "attack", 1: "investigation", 2: "mount", 3: "other_interaction"
    }  # fmt: skip


def test_sample_trusted_labels_read_names_from_npz(sample, monkeypatch):
    ds = neurocube.open_behavior(sample)
    # break the index names: trusted=True must take them from the NPZ object array
    index = sample / "labels" / "behavior" / "index.csv"
    index.write_text(index.read_text().replace("attack,investigation", "AAA,BBB"))
    ds = neurocube.open_behavior(sample)
    events = ds.labels("behavior", trusted=True)
    assert list(events["label_name"].values)[:2] == ["attack", "investigation"]


def test_sample_id_tags_untrusted_warns_and_trusted_loads(sample):
    ds = neurocube.open_behavior(sample)
    with pytest.warns(NeurocubeWarning, match=r"skipped NPZ object member.*trusted=True"):
        tags = ds.id_tags()
    entry = tags[(SAMPLE_GROUP, SAMPLE_SEQUENCE)]
    assert entry["fields"] == ["focal", "strain"]
    assert entry["labels"] == {}
    trusted = ds.id_tags(trusted=True)[(SAMPLE_GROUP, SAMPLE_SEQUENCE)]
    assert trusted["labels"] == {
        0: {"focal": True, "strain": "BL6"},
        1: {"focal": False, "strain": "CD1"},
    }
    assert trusted["metadata"] == {"source": ["demo"]}


def test_sample_label_queries(sample):
    ds = neurocube.open_behavior(sample)
    at = ds.labels_at_frame(SAMPLE_GROUP, SAMPLE_SEQUENCE, 3)
    np.testing.assert_array_equal(at["labels"], [2])
    one = ds.labels_for_individual(SAMPLE_GROUP, SAMPLE_SEQUENCE, 1, frame_range=(0, 5))
    np.testing.assert_array_equal(one["frames"], [0, 1, 2, 3, 4])
    assert ds.labels_for_individual(SAMPLE_GROUP, SAMPLE_SEQUENCE, 7)["frames"].size == 0
    path = sample / "labels" / "behavior" / "convert-labels-calms21_npy.0.2-66b4fd96be"
    with np.load(next(path.glob("*.npz")), allow_pickle=False) as npz:
        frames, labels, pairs = npz["frames"], npz["labels"], npz["individual_ids"]
    for frame in (0, 11, 19):
        for ident in (0, 1, 5):
            got = ds.labels_at_frame(SAMPLE_GROUP, SAMPLE_SEQUENCE, frame, individual_id=ident)
            keep = (frames == frame) & (pairs == ident).any(axis=1)
            np.testing.assert_array_equal(got["labels"], labels[keep])
            np.testing.assert_array_equal(got["individual_ids"], pairs[keep])


def test_open_and_build_read_no_data(sample, monkeypatch):
    IO_STATS.reset()
    ds = neurocube.open_behavior(sample)
    _refuse_reads(monkeypatch)
    tracks = ds.tracks(columns=["X"])
    dense = ds.to_dense()
    _, nbytes = IO_STATS.snapshot()
    assert nbytes == 0
    for arr in (tracks["X"].data, dense["position"].data):
        assert not any(np.isnan(c) for dim in arr.chunks for c in dim)
    with pytest.raises(AssertionError, match="data read while building"):
        tracks["X"].compute()


# ----------------------------------------------------------------------------- generated


def _reference(gen, pairs=None):
    frames = []
    for (g, s), path in gen.files.items():
        if pairs is None or (g, s) in pairs:
            frames.append(pd.read_parquet(path))
    return pd.concat(frames, ignore_index=True)


def test_multi_sequence_long_form_values(gen):
    ds = neurocube.open_behavior(gen.root)
    tracks = ds.tracks(groups="fish01")
    ref = _reference(gen, {("fish01", "speed1__loop1"), ("fish01", "speed2__loop1")})
    out = tracks.compute()
    np.testing.assert_array_equal(out["poseX2"].values, ref["poseX2"].to_numpy())
    np.testing.assert_array_equal(out["frame"].values, ref["frame"].to_numpy())
    np.testing.assert_array_equal(out["sequence"].values, ref["sequence"].to_numpy())
    # one chunk per row group with min_chunk_rows=1; merged up to >= 65536 rows by default
    small = ds.tracks(groups="fish01", min_chunk_rows=1)
    expected = []
    for seq in ("speed1__loop1", "speed2__loop1"):
        meta = pq.read_metadata(gen.files[("fish01", seq)])
        expected += [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert small["X"].chunks[0] == tuple(expected)
    assert tracks["X"].chunks[0] == (154,)  # small files merge into one chunk
    # row groups merge up to >= 50 rows inside a file, then small tails merge across files
    mid = ds.tracks(groups="fish01", min_chunk_rows=50)
    assert mid["X"].chunks[0] == (60, 20 + 60, 14)
    out_mid = mid.compute()
    np.testing.assert_array_equal(out_mid["sequence"].values, ref["sequence"].to_numpy())
    np.testing.assert_array_equal(out_mid["poseY1"].values, ref["poseY1"].to_numpy())
    assert len(tracks.attrs["neurocube_sources"]) == 2


def test_nan_positions_stay_nan_and_missing_frames_are_absent(gen):
    ds = neurocube.open_behavior(gen.root)
    out = ds.tracks(sequences="speed2__loop1", groups="fish01").compute()
    assert not np.isin(out["frame"].values, [3, 4, 5]).any()
    bad = (out["frame"].values == 10) & (out["id"].values == 0)
    assert np.isnan(out["poseX0"].values[bad]).all()
    assert not np.isnan(out["poseX0"].values[~bad]).any()


def test_column_projection_reads_only_asked_columns(gen, monkeypatch):
    ds = neurocube.open_behavior(gen.root)
    seen = []
    original = pq.ParquetFile.read_row_groups

    def spy(self, row_groups, columns=None, **kw):
        seen.append(tuple(columns))
        return original(self, row_groups, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", spy)
    ds.tracks(columns=["poseX1"], with_keys=False).compute()
    assert seen and set(seen) == {("poseX1",)}
    seen.clear()
    t = ds.tracks(columns=["poseX1", "poseY1"])
    assert set(t.data_vars) == {"poseX1", "poseY1"}
    t.compute()
    assert set(seen) == {("frame", "time", "id", "poseX1", "poseY1")}


def test_unknown_column_and_selection_errors(gen):
    ds = neurocube.open_behavior(gen.root)
    with pytest.raises(SelectionError, match=r"column 'nope' is in none"):
        ds.tracks(columns=["nope"])
    with pytest.raises(SelectionError, match=r"no group\(s\) \['fish99'\]"):
        ds.tracks(groups="fish99")
    with pytest.raises(SelectionError, match=r"no sequence\(s\) \['x'\]"):
        ds.tracks(sequences="x")
    with pytest.raises(SelectionError, match="not numeric"):
        ds.tracks(columns=["group"])


@pytest.mark.parametrize("exact", [True, False])
def test_frame_filter_pushdown(gen, monkeypatch, exact):
    ds = neurocube.open_behavior(gen.root)
    calls = []
    original = parquet_source.read_table

    def spy(spec, columns):
        calls.append(spec.row_groups)
        return original(spec, columns)

    monkeypatch.setattr(parquet_source, "read_table", spy)
    tracks = ds.tracks(
        groups="fish01",
        sequences="speed1__loop1",
        start_frame=15,
        end_frame=25,
        exact=exact,
        min_chunk_rows=1,
        lazy=True,
    )
    built_calls = len(calls)
    out = tracks.compute()
    # 40 frames x 2 ids, row groups of 20 rows = 10 frames: groups 1 and 2 hold frames 10-29
    read_groups = {g for rgs in calls for g in rgs}
    assert read_groups == {1, 2}
    if exact:
        assert built_calls == 2  # the frame column of the two boundary row groups
        np.testing.assert_array_equal(np.unique(out["frame"].values), np.arange(15, 25))
        assert tracks.attrs["frame_filter"] == "exact"
    else:
        assert built_calls == 0
        np.testing.assert_array_equal(np.unique(out["frame"].values), np.arange(10, 30))
        assert tracks.attrs["frame_filter"] == "row_groups"
    assert out.sizes["row"] == tracks.sizes["row"]


def test_time_filter_uses_fps(gen):
    ds = neurocube.open_behavior(gen.root)
    out = ds.tracks(
        groups="fish01", sequences="speed1__loop1", start_time=0.5, end_time=1.0
    ).compute()
    np.testing.assert_array_equal(np.unique(out["frame"].values), np.arange(15, 30))


def test_time_filter_without_fps_is_refused(tmp_path):
    gen = make_dataset(tmp_path / "nofps", hierarchical(1, 1), fps=None)
    ds = neurocube.open_behavior(gen.root)
    with pytest.raises(FormatError, match="fps_default"):
        ds.tracks(start_time=1.0)


def test_dense_stacks_and_pads(gen):
    ds = neurocube.open_behavior(gen.root)
    dense = ds.to_dense(frame_chunk=16)
    assert dense["position"].dims == ("sequence", "frame", "space", "keypoint", "individual")
    assert dense.sizes["frame"] == 40
    np.testing.assert_array_equal(dense["n_frames"].values, [40, 40, 25, 40])
    np.testing.assert_array_equal(dense["frame_start"].values, [0, 0, 0, 5])
    assert dense["position"].chunks[1] == (16, 16, 8)
    out = dense.compute()
    pos = out["position"].values
    for s, spec in enumerate(gen.seqs):
        for off in range(40):
            f = spec.first_frame + off
            for i in spec.ids:
                got = pos[s, off, :, 1, i]
                if (
                    off >= spec.n_frames
                    or f in spec.missing_frames
                    or (i == 0 and f in spec.nan_frames)
                ):
                    assert np.isnan(got).all(), (s, off, i)
                else:
                    np.testing.assert_array_equal(got, [value(s, f, i, 1, 0), value(s, f, i, 1, 1)])


def test_dense_single_sequence_with_filter_and_time(gen):
    ds = neurocube.open_behavior(gen.root)
    dense = ds.tracks(
        groups="fish02", sequences="speed2__loop1", dense=True, start_frame=10, end_frame=20
    )
    assert "sequence" not in dense.dims
    np.testing.assert_array_equal(dense["frame"].values, np.arange(10, 20))
    np.testing.assert_allclose(dense["time"].values, np.arange(10, 20) / 30.0)
    got = dense["centroid"].sel(individual=1).compute().values
    np.testing.assert_array_equal(got[:, 0], value(3, np.arange(10, 20), 1, -1, 0))


def test_dense_individuals_given_drop_others(gen):
    ds = neurocube.open_behavior(gen.root)
    dense = ds.to_dense(groups="fish01", sequences="speed1__loop1", individuals=[1])
    assert list(dense["individual"].values) == [1]
    assert not np.isnan(dense["position"].values).any()


def test_mixed_units_refused_unless_converted(tmp_path):
    seqs = [SeqSpec("a", "px"), SeqSpec("b", "cm", std_format="trex_v1")]
    gen = make_dataset(tmp_path / "mixed", seqs)
    ds = neurocube.open_behavior(gen.root)
    with pytest.raises(FormatError, match=r"mixes unit families.*cm_per_pixel"):
        ds.tracks()
    assert ds.tracks(groups="b").attrs["units"] == "cm"
    assert ds.tracks(groups="b").attrs["std_formats"] == ["trex_v1"]
    with pytest.raises(FormatError, match="needs cm_per_pixel"):
        ds.tracks(units="cm")
    out = ds.tracks(units="cm", cm_per_pixel={("a", "px"): 0.25}).compute()
    a = out["group"].values == "a"
    np.testing.assert_allclose(
        out["X"].values[a], value(0, out["frame"].values[a], out["id"].values[a], -1, 0) * 0.25
    )
    np.testing.assert_array_equal(
        out["X"].values[~a], value(1, out["frame"].values[~a], out["id"].values[~a], -1, 0)
    )
    np.testing.assert_array_equal(out["poseP0"].values[a], 0.5)  # confidences are not scaled
    dense = ds.to_dense(units="pixels", cm_per_pixel=0.5)
    assert dense.attrs["units"] == "pixels"
    got = dense["centroid"].sel(sequence="cm", individual=0).compute().values[3]
    np.testing.assert_allclose(got, [value(1, 3, 0, -1, 0) / 0.5, value(1, 3, 0, -1, 1) / 0.5])


def test_legacy_flat_layout(tmp_path):
    gen = make_dataset(tmp_path / "flat", hierarchical(1, 2), layout="flat")
    assert (gen.root / "tracks" / "fish01__speed1__loop1.parquet").is_file()
    ds = neurocube.open_behavior(gen.root)
    assert ds.list_sequences("fish01") == ["speed1__loop1", "speed2__loop1"]
    out = ds.tracks().compute()
    assert out.sizes["row"] == 160


def test_deterministic_names_and_known_chunks(gen):
    a = neurocube.open_behavior(gen.root).tracks(start_frame=3, end_frame=33, lazy=True)
    b = neurocube.open_behavior(gen.root).tracks(start_frame=3, end_frame=33, lazy=True)
    assert a["X"].data.name == b["X"].data.name
    assert a["sequence"].data.name == b["sequence"].data.name
    da_, db = (
        neurocube.open_behavior(gen.root).to_dense(),
        neurocube.open_behavior(gen.root).to_dense(),
    )
    assert da_["position"].data.name == db["position"].data.name
    c = neurocube.open_behavior(gen.root).tracks(start_frame=4, end_frame=33, lazy=True)
    assert c["X"].data.name != a["X"].data.name
    os.utime(gen.files[("fish01", "speed1__loop1")], ns=(1, 1))
    d = neurocube.open_behavior(gen.root).tracks(start_frame=3, end_frame=33, lazy=True)
    assert d["X"].data.name != a["X"].data.name


def test_file_rewritten_after_open_is_refused(gen):
    ds = neurocube.open_behavior(gen.root)
    tracks = ds.tracks(groups="fish01", sequences="speed1__loop1")
    path = gen.files[("fish01", "speed1__loop1")]
    pq.write_table(pq.read_table(path).slice(0, 10), path)
    with pytest.raises(FormatError, match="changed since it was opened"):
        tracks.compute()


def test_missing_track_file_names_it(gen):
    gen.files[("fish01", "speed1__loop1")].unlink()
    ds = neurocube.open_behavior(gen.root)
    with pytest.raises(DataNotFoundError, match=r"speed1__loop1.*path_map"):
        ds.tracks()


def test_labels_generated_and_dense_alignment(gen):
    ds = neurocube.open_behavior(gen.root)
    with pytest.warns(NeurocubeWarning):
        events = ds.labels(groups="fish01")
    assert events.sizes["event"] == 14 + 14
    assert events["frames"].chunks == ((14, 14),)
    dense_labels = ds.labels_dense(groups="fish01", sequences="speed1__loop1")
    dense_tracks = ds.to_dense(groups="fish01", sequences="speed1__loop1")
    np.testing.assert_array_equal(dense_labels["frame"].values, dense_tracks["frame"].values)
    np.testing.assert_array_equal(
        dense_labels["individual"].values, dense_tracks["individual"].values
    )
    lab = dense_labels["labels"].compute().values
    # frame 0: scene event (every individual) with label 0; frame 3: individual 1, label 1
    assert lab[0, :, 0].all() and lab[0].sum() == 2
    assert lab[3, 1, 1] and lab[3].sum() == 1
    assert lab[1].sum() == 0
    assert list(dense_labels["label_name"].values) == ["rest", "swim", "turn"]


def test_catalog_queries_through_dataset(gen):
    ds = neurocube.open_behavior(gen.root)
    assert ds.query_sequences(group_startswith="fish0", sequence_startswith="speed2") == [
        ("fish01", "speed2__loop1"), ("fish02", "speed2__loop1")
    ]  # fmt: skip
    meta = ds.sequence_metadata(level_names=["fish", "speed", "loop"])
    assert list(meta["speed"]) == ["speed1", "speed2", "speed1", "speed2"]
    pairs = ds.query_sequences(sequence_contains="speed2")
    tracks = ds.tracks(pairs=pairs)
    assert set(np.unique(tracks["sequence"].values)) == {"speed2__loop1"}


def test_to_zarr_roundtrip(gen, tmp_path):
    ds = neurocube.open_behavior(gen.root)
    tracks = ds.tracks(groups="fish01")
    tracks.to_zarr(tmp_path / "t.zarr", zarr_format=2, consolidated=False)
    import xarray as xr

    back = xr.open_zarr(tmp_path / "t.zarr", consolidated=False).compute()
    np.testing.assert_array_equal(back["poseX0"].values, tracks["poseX0"].values)


# ----------------------------------------------------------------------------- distributed


@pytest.fixture(scope="module")
def cluster_client():
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(
        n_workers=2, processes=True, threads_per_worker=1, dashboard_address=":0"
    )
    client = distributed.Client(cluster, set_as_default=False)  # other tests stay local
    yield client
    client.close()
    cluster.close()


def test_local_cluster_multi_sequence(gen, cluster_client):
    ds = neurocube.open_behavior(gen.root)
    tracks = ds.tracks(start_frame=2, end_frame=37, min_chunk_rows=1, lazy=True)
    dense = ds.to_dense(frame_chunk=8)
    with dask.config.set(scheduler="threads"):
        local_t, local_d = dask.compute(tracks, dense)
    remote_t, remote_d = cluster_client.compute([tracks, dense], sync=True)
    np.testing.assert_array_equal(remote_t["poseY2"].values, local_t["poseY2"].values)
    np.testing.assert_array_equal(remote_t["sequence"].values, local_t["sequence"].values)
    np.testing.assert_array_equal(remote_d["position"].values, local_d["position"].values)
    ref = _reference(gen)
    ref = ref[(ref["frame"] >= 2) & (ref["frame"] < 37)]
    for col in ("frame", "id", "poseY2"):
        np.testing.assert_array_equal(remote_t[col].values, ref[col].to_numpy())


# ----------------------------------------------------------------------------- audit additions


def test_labels_dense_stacked_matches_npz(gen):
    """Several sequences: labels(sequence, frame, individual, label), aligned with to_dense."""
    ds = neurocube.open_behavior(gen.root)
    tracks = ds.to_dense(groups="fish02", frame_chunk=16)
    dense = ds.labels_dense(groups="fish02", frame_chunk=16)
    assert dense["labels"].dims == ("sequence", "frame", "individual", "label")
    assert dense["labels"].chunks[:2] == tracks["position"].chunks[:2]
    for name in ("frame", "individual", "frame_start", "n_frames", "sequence"):
        np.testing.assert_array_equal(dense[name].values, tracks[name].values)
    got = dense["labels"].compute().values
    expected = np.zeros(got.shape, dtype=bool)
    for s, seq in enumerate(tracks["sequence"].values):
        path = gen.root / "labels" / "behavior" / "lab-run" / f"fish02__{seq}.npz"
        with np.load(path, allow_pickle=False) as npz:
            frames, labels, pairs = npz["frames"], npz["labels"], npz["individual_ids"]
        start = int(tracks["frame_start"].values[s])
        for f, lab, (a, _) in zip(frames, labels, pairs, strict=True):
            slots = slice(None) if a == -1 else [list(tracks["individual"].values).index(a)]
            expected[s, f - start, slots, lab] = True
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(tracks["n_frames"].values, [25, 40])
    assert got[0, :25].any() and not got[0, 25:].any()  # padding past 25 frames holds nothing
    assert got[1, 0, :, 1].all()  # fish02/speed2 starts at frame 5: scene event, label 5 // 3 % 3


def test_labels_build_reads_headers_only(gen, monkeypatch):
    ds = neurocube.open_behavior(gen.root)

    def boom(*args, **kwargs):
        raise AssertionError("label events read while building")

    monkeypatch.setattr("neurocube.datasets.behavior.labels._read_label_events", boom)
    with pytest.warns(NeurocubeWarning):
        events = ds.labels()
    dense = ds.labels_dense(groups="fish01")
    assert events.sizes["event"] == 14 + 14 + 9 + 14  # every 3rd frame of 40, 40, 25, 40 frames
    assert not any(np.isnan(c) for dim in events["frames"].chunks for c in dim)
    with pytest.raises(AssertionError, match="read while building"):
        events["frames"].compute()
    with pytest.raises(AssertionError, match="read while building"):
        dense["labels"].compute()


class _Canary:
    """Pickles as a call to ``Path.touch(path)``: unpickling it creates the file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):

        return (Path.touch, (Path(self.path),))


def test_untrusted_npz_is_never_unpickled(gen, tmp_path):
    canary = tmp_path / "unpickled"
    bomb = np.array([_Canary(canary)] * 3, dtype=object)
    path = gen.root / "labels" / "behavior" / "lab-run" / "fish01__speed1__loop1.npz"
    with np.load(path, allow_pickle=False) as npz:
        members = {n: npz[n] for n in npz.files if n != "label_names"}
    np.savez(path, **members, label_names=bomb)
    tags_dir = gen.root / "labels" / "id_tags"
    tags_dir.mkdir(parents=True)
    np.savez(tags_dir / "fish01__speed1__loop1.npz", ids=bomb, focal=bomb)
    (tags_dir / "index.csv").write_text(
        "abs_path,group,sequence,label_kind,label_names\n"
        "labels/id_tags/fish01__speed1__loop1.npz,fish01,speed1__loop1,id_tags,focal\n"
    )
    ds = neurocube.open_behavior(gen.root)
    with pytest.warns(NeurocubeWarning, match=r"\['label_names'\].*Pass trusted=True"):
        events = ds.labels(groups="fish01", sequences="speed1__loop1")
    events.compute()
    ds.labels_dense(groups="fish01", sequences="speed1__loop1").compute()
    ds.labels_at_frame("fish01", "speed1__loop1", 3)
    ds.labels_for_individual("fish01", "speed1__loop1", 1)
    with pytest.warns(NeurocubeWarning, match=r"\['focal', 'ids'\].*Pass trusted=True"):
        tags = ds.id_tags(groups="fish01")
    assert tags[("fish01", "speed1__loop1")]["fields"] == ["focal"]
    assert tags[("fish01", "speed1__loop1")]["labels"] == {}
    assert not canary.exists()
    ds.id_tags(groups="fish01", trusted=True)  # the caller's explicit trust: now it unpickles
    assert canary.exists()


def test_run_id_picks_an_older_run(gen):
    """A second, newer run of one sequence wins by default; run_id= reads the older one."""
    old = gen.files[("fish01", "speed1__loop1")]
    newer = gen.root / "tracks" / "run-b" / old.name
    newer.parent.mkdir()
    table = pq.read_table(old)
    doubled = table.set_column(
        table.schema.get_field_index("X"), "X", pa_compute_multiply(table.column("X"), 2.0)
    )
    pq.write_table(doubled, newer, row_group_size=20)
    index = gen.root / "tracks" / "index.csv"
    lines = index.read_text().splitlines()
    row = next(line for line in lines if line.startswith(f"tracks/convert-x.1-abc/{old.name}"))
    newer_row = row.replace("tracks/convert-x.1-abc/", "tracks/run-b/", 1)
    newer_row = newer_row.replace("convert-x.1-abc", "run-b").replace("2026-01-01", "2026-03-01")
    index.write_text("\n".join([*lines, newer_row]) + "\n")
    ds = neurocube.open_behavior(gen.root)
    latest = ds.tracks(groups="fish01", sequences="speed1__loop1").compute()
    assert latest.attrs["neurocube_sources"] == [str(newer.resolve())]
    np.testing.assert_array_equal(latest["X"].values, pd.read_parquet(newer)["X"].to_numpy())
    older = ds.tracks(groups="fish01", sequences="speed1__loop1", run_id="convert-x.1-abc")
    np.testing.assert_array_equal(older["X"].values, pd.read_parquet(old)["X"].to_numpy())
    pinned = neurocube.open_behavior(gen.root, run_id="convert-x.1-abc")
    pinned_tracks = pinned.tracks(groups="fish01", sequences="speed1__loop1")
    assert pinned_tracks.attrs["neurocube_sources"] == [str(old.resolve())]
    with pytest.raises(SelectionError, match=r"no rows with run_id 'nope'.*run-b"):
        ds.tracks(run_id="nope")


def pa_compute_multiply(column, factor):
    import pyarrow.compute as pc

    return pc.multiply(column, factor)


def test_legacy_flat_layout_values_match_pandas(tmp_path):
    seqs = hierarchical(1, 2)
    seqs[0].missing_frames = (0, 7)
    seqs[1].nan_frames = (2,)
    gen = make_dataset(tmp_path / "flat", seqs, layout="flat")
    ds = neurocube.open_behavior(gen.root)
    assert set(ds.catalog.tracks_table()["run_id"]) == {""}
    out = ds.tracks().compute()
    ref = _reference(gen)
    for col in ("frame", "id", "X", "poseY2", "poseP1"):
        np.testing.assert_array_equal(out[col].values, ref[col].to_numpy())
    np.testing.assert_array_equal(out["sequence"].values, ref["sequence"].to_numpy())
    dense = ds.to_dense().compute()
    np.testing.assert_array_equal(dense["frame_start"].values, [1, 0])
    assert np.isnan(dense["position"].values[0, 6]).all()  # frame 7 of seq 0 is missing
    assert np.isnan(dense["position"].values[1, 2, :, :, 0]).all()  # NaN rows of id 0


@pytest.mark.parametrize(
    "bounds",
    [{"start_frame": float("nan")}, {"end_frame": float("inf")}, {"start_frame": 2.5},
     {"start_frame": "3"}, {"start_time": float("nan")}],
)
def test_non_finite_or_fractional_frame_bounds_are_selection_errors(sample, bounds):
    ds = neurocube.open_behavior(sample)
    with pytest.raises(SelectionError, match=next(iter(bounds))):
        ds.tracks(**bounds)

