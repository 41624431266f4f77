"""open_traces and neurocube.traces (get/set attrs, merge, populate) against h5py reads."""

from __future__ import annotations

import math
import multiprocessing
import os
import shutil
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import neurocube
import neurocube.traces as nct
from neurocube.datasets.traces import decode_attr, encode_attr, guess_traces
from neurocube.errors import (
    AttributeMismatchError,
    FormatError,
    SelectionError,
    SourceChangedError,
)
from neurocube.sources import hdf5 as h5src
from neurocube.sources import hdf5_handles as h5handles
from neurocube.storage import IO_STATS

DATA = Path(__file__).parents[2] / "data" / "offspect"

ORIGIN_ATTRS = {
    "channel_labels": "['EDC_L', 'APB_L']",
    "channel_of_interest": "EDC_L",
    "readin": "tms",
    "readout": "cmep",
    "samplingrate": "1000",
    "samples_pre_event": "100",
    "samples_post_event": "100",
    "subject": "S1",
    "version": "0.1.3",
    "global_comment": "",
    "filedate": "2020-01-01 10:00:00",
}


def trace_value(origin_index: int, trace_id: int, n: int, channels: int | None):
    base = origin_index * 1000 + trace_id + np.arange(n) / 1000
    if channels is None:
        return base
    return base[:, None] + np.arange(channels)[None, :] * 0.1


def write_traces(path, n_per_origin=(12, 3), *, channels=2, lengths=None, origins=None):
    """An offspect-layout cache written with plain h5py; trace values known by construction."""
    origins = origins or [f"rec{i}.xdf" for i in range(len(n_per_origin))]
    with h5py.File(path, "w") as h5:
        for o, (origin, count) in enumerate(zip(origins, n_per_origin, strict=True)):
            group = h5.create_group(origin)
            for key, value in ORIGIN_ATTRS.items():
                group.attrs[key] = value
            traces = group.create_group("traces")
            for t in range(count):
                n = lengths(o, t) if lengths else 50
                dset = traces.create_dataset(str(t), data=trace_value(o, t, n, channels))
                attrs = dict(ORIGIN_ATTRS)
                attrs.update(
                    id=str(t),
                    event_sample=str(1000 * t),
                    event_time=str(t * 1.5),
                    onset_shift="" if t % 3 == 0 else str(t),
                    reject="False" if t % 2 else "True",
                    comment="" if t % 4 else f"note {t}",
                    time_since_last_pulse_in_s=".inf" if t == 0 else "None" if t == 1 else "2.5",
                    xyz_coords=f"[{t}.0, 1.0, 2.0]",
                )
                for key, value in attrs.items():
                    dset.attrs[key] = value
    return origins


@pytest.fixture
def cache(tmp_path):
    path = tmp_path / "many.hdf5"
    write_traces(path)
    return path


# -- the samples ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cf0", "cf1", "merged", "fromfactory"])
def test_samples_match_h5py(name):
    path = DATA / f"{name}.hdf5"
    ds = neurocube.open_traces(path)
    values = ds.data.values
    with h5py.File(path, "r") as h5:
        expected = [
            (origin, key)
            for origin in h5
            for key in sorted(h5[origin]["traces"], key=int)
        ]
        assert list(zip(ds.origin.values, ds.name.values, strict=True)) == expected
        for i, (origin, key) in enumerate(expected):
            np.testing.assert_array_equal(values[i], h5[origin]["traces"][key][()])
            for attr, raw in h5[origin]["traces"][key].attrs.items():
                coord = f"attr_{attr}" if attr == "origin" else attr
                assert coord in ds.coords, attr
                if raw in ("", "None"):
                    continue
                decoded = decode_attr(raw)
                got = ds[coord].values[i]
                if isinstance(decoded, list):
                    if all(isinstance(x, float) for x in decoded):
                        np.testing.assert_array_equal(got, decoded)
                    else:
                        assert got == raw
                elif isinstance(decoded, float):
                    assert got == decoded or (math.isnan(got) and math.isnan(decoded))
                else:
                    assert got == decoded, (attr, got, decoded)


def test_sample_coords_are_typed():
    ds = neurocube.open_traces(DATA / "merged.hdf5")
    assert ds.data.dims == ("trace", "sample", "channel")
    assert list(ds.channel.values) == ["EDC_L"]
    assert ds.event_sample.dtype == np.int64
    assert ds.reject.dtype == bool and not ds.reject.values.any()
    assert ds.time_since_last_pulse_in_s.dtype == np.float64
    np.testing.assert_array_equal(
        ds.time_since_last_pulse_in_s.values, [np.nan, 10.63, np.nan, 6.666]
    )
    assert ds.xyz_coords.dims == ("trace", "xyz_coords_index")
    np.testing.assert_array_equal(ds.xyz_coords.values[2], [37.0, 52.9, 21.2])
    assert list(ds.onset_shift.values) == [4, 0, 0, -2]
    assert list(ds.attr_origin.values) == ["template_R001.xdf", "", "", ""]
    assert list(ds._log.values) == ["['baseline on 2020-01-01']", "", "", ""]
    assert ds.channel_labels.values[0] == "['EDC_L']"
    ff = neurocube.open_traces(DATA / "fromfactory.hdf5")
    assert ff.data.dims == ("trace", "sample") and ff.data.dtype == np.float32
    assert ff.time_since_last_pulse_in_s.values[0] == np.inf
    assert ff.samplingrate.values[0] == 1000.0
    assert ff.reject.values[0] == ""  # every value missing: text column of ""


def test_dataset_is_zarr_serialisable(tmp_path, cache):
    import xarray as xr

    ds = neurocube.open_traces(cache)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr's notes on unstable string dtypes
        ds.to_zarr(tmp_path / "t.zarr", mode="w")
        back = xr.open_zarr(tmp_path / "t.zarr")
    np.testing.assert_array_equal(back.data.values, ds.data.values)
    np.testing.assert_array_equal(back.onset_shift.values, ds.onset_shift.values)
    assert back.attrs["origin_attrs"]["rec0.xdf"]["samplingrate"] == "1000"


# -- generated caches ----------------------------------------------------------------


def test_numeric_order_across_origins(cache):
    ds = neurocube.open_traces(cache)
    assert ds.sizes == {"trace": 15, "sample": 50, "channel": 2, "xyz_coords_index": 3}
    assert list(ds.name.values[:12]) == [str(i) for i in range(12)]  # "2" before "10"
    assert list(ds.origin.values) == ["rec0.xdf"] * 12 + ["rec1.xdf"] * 3
    np.testing.assert_array_equal(ds.trace.values, np.arange(15))
    values = ds.data.values
    for i in range(15):
        o, t = (0, i) if i < 12 else (1, i - 12)
        np.testing.assert_array_equal(values[i], trace_value(o, t, 50, 2))
    assert list(ds.channel.values) == ["EDC_L", "APB_L"]
    onset = ds.onset_shift.values
    assert onset.dtype == np.float64 and np.isnan(onset[0]) and onset[1] == 1.0
    assert list(ds.comment.values[:5]) == ["note 0", "", "", "", "note 4"]
    assert ds.time_since_last_pulse_in_s.values[0] == np.inf
    assert np.isnan(ds.time_since_last_pulse_in_s.values[1])


def test_random_traces_and_laziness(cache, monkeypatch):
    def refuse(self, key):
        raise AssertionError("trace data read while building the graph")

    IO_STATS.reset()
    monkeypatch.setattr(h5src.TraceStackProxy, "__getitem__", refuse)
    ds = neurocube.open_traces(cache, traces_per_chunk=4)
    picked = np.array([14, 3, 7, 0, 11])
    sub = ds.data.isel(trace=picked, sample=slice(5, 20))
    assert IO_STATS.snapshot()[1] == 0
    monkeypatch.undo()
    got = sub.values
    for row, i in enumerate(picked):
        o, t = (0, i) if i < 12 else (1, i - 12)
        np.testing.assert_array_equal(got[row], trace_value(o, t, 50, 2)[5:20])
    assert ds.data.data.chunks[0] == (4, 4, 4, 3)


def test_many_traces_default_chunks(tmp_path):
    path = tmp_path / "big.hdf5"
    write_traces(path, n_per_origin=(200, 150, 151), channels=None, lengths=lambda o, t: 1200)
    ds = neurocube.open_traces(path)
    assert ds.sizes["trace"] == 501 and ds.data.dims == ("trace", "sample")
    assert sum(ds.data.data.chunks[0]) == 501 and len(ds.data.data.chunks[0]) > 1
    values = ds.data.values
    np.testing.assert_array_equal(values[350], trace_value(2, 0, 1200, None))
    np.testing.assert_array_equal(values[199], trace_value(0, 199, 1200, None))
    assert neurocube.open_traces(path).data.data.name == ds.data.data.name


def test_ragged_traces_pad_or_refuse(tmp_path):
    path = tmp_path / "ragged.hdf5"
    write_traces(path, n_per_origin=(5,), channels=None, lengths=lambda o, t: 10 + t)
    with h5py.File(path, "a") as h5:  # integer data: padding turns it into float
        data = h5["rec0.xdf/traces/2"][()]
        del h5["rec0.xdf/traces/2"]
        h5["rec0.xdf/traces/2"] = data.astype(np.float32)
    ds = neurocube.open_traces(path)
    assert ds.sizes["sample"] == 14
    assert list(ds.n_samples.values) == [10, 11, 12, 13, 14]
    assert ds.attrs["ragged"] is True
    values = ds.data.values
    np.testing.assert_array_equal(values[1, :11], trace_value(0, 1, 11, None))
    assert np.isnan(values[1, 11:]).all()
    with pytest.raises(FormatError, match=r"differ in length \(10 to 14 samples\).*ragged='pad'"):
        neurocube.open_traces(path, ragged="error")


def test_inconsistent_traces_are_refused(tmp_path):
    mixed = tmp_path / "mixed.hdf5"
    write_traces(mixed, n_per_origin=(3,), channels=2)
    with h5py.File(mixed, "a") as h5:
        del h5["rec0.xdf/traces/1"]
        h5["rec0.xdf/traces/1"] = np.zeros(50)
    with pytest.raises(FormatError, match=r"all be 1-D.*or all 2-D.*found \[1, 2\]-D"):
        neurocube.open_traces(mixed)
    chans = tmp_path / "chans.hdf5"
    write_traces(chans, n_per_origin=(3,), channels=2)
    with h5py.File(chans, "a") as h5:
        del h5["rec0.xdf/traces/1"]
        h5["rec0.xdf/traces/1"] = np.zeros((50, 3))
    with pytest.raises(FormatError, match=r"different channel counts \[2, 3\]"):
        neurocube.open_traces(chans)
    spectral = Path(__file__).parents[2] / "data" / "spectralbrain" / "decomp.h5"
    with pytest.raises(FormatError, match=r"offspect layout.*open_spectral"):
        neurocube.open_traces(spectral)


def test_guess_traces(cache):
    assert guess_traces(cache)
    assert guess_traces(DATA / "merged.hdf5")
    assert not guess_traces(Path(__file__).parents[2] / "data" / "spectralbrain" / "decomp.h5")
    assert not guess_traces(DATA / "README.md")


# -- the attribute codec -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", None),
        ("None", None),
        ("null", None),
        ("54", 54),
        ("-1", -1),
        ("007", "007"),
        ("1000.0", 1000.0),
        ("1.0e-05", 1e-05),
        (".inf", math.inf),
        ("-.inf", -math.inf),
        ("inf", math.inf),
        ("False", False),
        ("true", True),
        ("['EDC_L']", ["EDC_L"]),
        ("[37.0, 22.8, 54.2]", [37.0, 22.8, 54.2]),
        ("[1, .inf]", [1, math.inf]),
        ('["a", null]', ["a", None]),
        ("[S  1]", "[S  1]"),
        ("1970-01-01 00:01:01", "1970-01-01 00:01:01"),
        ("'54'", "54"),
        ("yes", "yes"),
        ("__import__('os').system('echo hacked')", "__import__('os').system('echo hacked')"),
        ("[__import__('os')]", "[__import__('os')]"),
        ("!!python/object/apply:os.system ['ls']", "!!python/object/apply:os.system ['ls']"),
        ("[2020-02-30]", "[2020-02-30]"),  # YAML builds a date and fails: stays text
        ("{a: 2020-02-30}", "{a: 2020-02-30}"),
        ("[1, !!float x]", "[1, !!float x]"),
    ],
)
def test_decode_attr(text, expected):
    assert decode_attr(text) == expected
    assert decode_attr(text.encode()) == expected


DEEP = "[" * 100_000 + "]" * 100_000  # every parser recurses on it


def test_hostile_annotations_open_as_their_text(tmp_path):
    path = tmp_path / "hostile.hdf5"
    write_traces(path, n_per_origin=(3,), channels=None)
    hostile = {0: DEEP, 1: "[2020-02-30]", 2: "[!!int x]"}
    with h5py.File(path, "a") as h5:
        for t, text in hostile.items():
            h5[f"rec0.xdf/traces/{t}"].attrs["comment"] = text
    ds = neurocube.open_traces(path, use_cache=False)
    assert list(ds.comment.values) == list(hostile.values())
    for t, text in hostile.items():
        assert nct.get_attrs(path, t)["comment"] == text


def test_repeated_annotations_decode_like_each_alone(tmp_path):
    # open_traces decodes each distinct string once per open; every trace must still get
    # the value of its own text, whichever trace first decoded the same string.
    path = tmp_path / "repeats.hdf5"
    write_traces(path, n_per_origin=(4, 3), channels=None)
    order = [(o, t) for o, n in enumerate((4, 3)) for t in range(n)]
    with h5py.File(path, "a") as h5:
        for g, (o, t) in enumerate(order):
            attrs = h5[f"rec{o}.xdf/traces/{t}"].attrs
            attrs["pair"] = f"[{g % 2}.5, {g % 3}.0]"
            attrs["event_name"] = f"[S  {g % 2}]"
            attrs["flag"] = "None" if g % 3 == 0 else str(g % 2)
    ds = neurocube.open_traces(path, use_cache=False)
    n = len(order)
    np.testing.assert_array_equal(ds.pair.values, [[g % 2 + 0.5, g % 3] for g in range(n)])
    assert list(ds.event_name.values) == [f"[S  {g % 2}]" for g in range(n)]
    np.testing.assert_array_equal(
        ds.flag.values, [np.nan if g % 3 == 0 else g % 2 for g in range(n)]
    )


def test_encode_quotes_what_yaml_cannot_load():
    # plain, YAML would read a date and fail on the 30th of February: the
    # original library's decoder could not read the value back
    text = encode_attr("2020-02-30")
    assert text == '"2020-02-30"'
    assert yaml.safe_load(text) == "2020-02-30" == decode_attr(text)
    assert encode_attr("2020-01-01") == "2020-01-01"  # a real date stays plain, as offspect writes


def test_decode_nan():
    assert math.isnan(decode_attr(".nan")) and math.isnan(decode_attr("nan"))


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
values = st.one_of(
    scalars,
    st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=4),
    st.lists(st.text(alphabet="abcXYZ_ 1", max_size=6), max_size=3),
)


def _same(a, b):
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return type(a) is type(b) and a == b


@settings(max_examples=300, deadline=None)
@given(values)
def test_encode_then_decode_roundtrips(value):
    text = encode_attr(value)
    assert isinstance(text, str)
    assert _same(decode_attr(text), value), (value, text)
    # The original library decodes with a YAML loader: it must read the same value
    # (None is YAML's empty scalar).
    if value is not None and not (isinstance(value, str) and value.strip() != value):
        loaded = yaml.safe_load(text)
        if isinstance(value, list):
            assert loaded == value or all(_same(a, b) for a, b in zip(loaded, value, strict=True))
        else:
            assert _same(loaded, value), (value, text, loaded)


def test_encode_keeps_stored_spelling():
    assert encode_attr(None, "None") == "None"
    assert encode_attr(None, "") == ""
    assert encode_attr(54, "54") == "54"
    assert encode_attr(1000.0, "1000.0") == "1000.0"
    assert encode_attr(False, "False") == "False"
    assert encode_attr(["EDC_L"], "['EDC_L']") == "['EDC_L']"
    assert encode_attr(5, "4") == "5"
    assert encode_attr(math.inf) == ".inf"


# -- get / set attributes ------------------------------------------------------------


@pytest.fixture
def editable(tmp_path):
    path = tmp_path / "cf0.hdf5"
    shutil.copy(DATA / "cf0.hdf5", path)
    path.chmod(0o644)
    return path


def raw_attrs(path, origin, name):
    with h5py.File(path, "r") as h5:
        attrs = h5[origin]["traces"][name].attrs
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}


def test_get_attrs_decodes_and_tags(editable):
    attrs = nct.get_attrs(editable, 1)
    assert attrs["cache_file"] == str(editable.absolute())
    assert attrs["cache_file_index"] == 1
    assert attrs["origin"] == "template_R001.xdf"
    assert attrs["onset_shift"] == 0 and attrs["reject"] is False
    assert attrs["xyz_coords"] == [37.1, 22.1, 54.4]
    assert attrs["samplingrate"] == 1000
    assert nct.get_attrs(editable, 0)["time_since_last_pulse_in_s"] is None
    with pytest.raises(SelectionError, match="no trace 2; the file holds 2 traces"):
        nct.get_attrs(editable, 2)
    with pytest.raises(SelectionError, match="must be an int"):
        nct.get_attrs(editable, "1")


def test_set_attrs_writes_only_changes_in_the_stored_encoding(editable):
    before = raw_attrs(editable, "template_R001.xdf", "0")
    attrs = nct.get_attrs(editable, 0)
    attrs["onset_shift"] += 5
    attrs["comment"] = "54"  # a str that looks like a number must stay a str
    attrs["reject"] = True
    nct.set_attrs(editable, 0, attrs)
    after = raw_attrs(editable, "template_R001.xdf", "0")
    changed = {k for k in after if after[k] != before.get(k)}
    assert changed == {"onset_shift", "comment", "reject"}
    assert after["onset_shift"] == "4" and after["reject"] == "True"
    assert after["time_since_last_pulse_in_s"] == "None"  # untouched spelling kept
    assert yaml.safe_load(after["comment"]) == "54"  # what the original library's decoder reads
    again = nct.get_attrs(editable, 0)
    assert again["onset_shift"] == 4 and again["comment"] == "54" and again["reject"] is True
    assert "origin" not in after and "cache_file" not in after  # not trace-level keys
    np.testing.assert_array_equal(  # data untouched
        neurocube.open_traces(editable).data.values,
        neurocube.open_traces(DATA / "cf0.hdf5").data.values,
    )


def test_set_attrs_safety_checks(editable, tmp_path):
    attrs = nct.get_attrs(editable, 1)
    with pytest.raises(AttributeMismatchError, match="came from trace 1, not trace 0"):
        nct.set_attrs(editable, 0, attrs)
    other = tmp_path / "other.hdf5"
    shutil.copy(editable, other)
    with pytest.raises(AttributeMismatchError, match=r"came from another file \(.*cf0\.hdf5\)"):
        nct.set_attrs(other, 1, attrs)
    with pytest.raises(AttributeMismatchError, match="do not say where they came from"):
        nct.set_attrs(editable, 1, {"comment": "x"})
    with pytest.raises(AttributeMismatchError, match="'samplingrate' is an origin-level"):
        nct.set_attrs(editable, 1, {**attrs, "samplingrate": 500})
    with pytest.raises(AttributeMismatchError, match="has no annotation 'comentt'"):
        nct.set_attrs(editable, 1, {**attrs, "comentt": "typo"})
    nct.set_attrs(editable, 1, {**attrs, "rater": "AB"}, allow_new_keys=True)
    assert raw_attrs(editable, "template_R001.xdf", "1")["rater"] == "AB"
    with pytest.raises(AttributeMismatchError, match="changed since its attributes were read"):
        nct.set_attrs(editable, 1, {**attrs, "comment": "stale"})  # token of the old version


def test_set_attrs_many_is_all_or_nothing(editable):
    before = editable.read_bytes()
    good = nct.get_attrs(editable, 0)
    bad = nct.get_attrs(editable, 1)
    good["comment"] = "ok"
    bad["samplingrate"] = 1
    with pytest.raises(AttributeMismatchError):
        nct.set_attrs_many(editable, {0: good, 1: bad})
    assert editable.read_bytes() == before
    assert not [p for p in editable.parent.iterdir() if p.name.endswith(".tmp.hdf5")]


def test_set_attrs_many_across_origins_hits_the_right_datasets(cache):
    updates = {}
    for index in (13, 2, 10, 12):  # rec1.xdf/1, rec0.xdf/2, rec0.xdf/10, rec1.xdf/0
        attrs = nct.get_attrs(cache, index)
        attrs["comment"] = f"edited {index}"
        updates[index] = attrs
    nct.set_attrs_many(cache, updates)
    expected = {("rec1.xdf", "1"): 13, ("rec0.xdf", "2"): 2, ("rec0.xdf", "10"): 10,
                ("rec1.xdf", "0"): 12}  # fmt: skip
    with h5py.File(cache, "r") as h5:
        for origin in h5:
            for name, dset in h5[origin]["traces"].items():
                comment = dset.attrs["comment"]
                if (origin, name) in expected:
                    assert comment == f"edited {expected[origin, name]}"
                else:
                    assert not comment.startswith("edited"), (origin, name)
    before = cache.read_bytes()
    stray = {**nct.get_attrs(cache, 0), "cache_file_index": 15}
    with pytest.raises(SelectionError, match="no trace 15; the file holds 15 traces"):
        nct.set_attrs_many(cache, {0: nct.get_attrs(cache, 0), 15: stray})
    assert cache.read_bytes() == before


# -- merge / populate ----------------------------------------------------------------


def test_merge_copies_origins_and_checks_consistency(tmp_path):
    target = nct.merge(tmp_path / "m.hdf5", [DATA / "cf0.hdf5", DATA / "cf1.hdf5"])
    merged = neurocube.open_traces(target)
    parts = [neurocube.open_traces(DATA / f"cf{i}.hdf5") for i in (0, 1)]
    np.testing.assert_array_equal(
        merged.data.values, np.concatenate([p.data.values for p in parts])
    )
    with h5py.File(target, "r") as out, h5py.File(DATA / "cf1.hdf5", "r") as src:
        assert dict(out["template_R002.xdf/traces/1"].attrs) == dict(
            src["template_R002.xdf/traces/1"].attrs
        )
    with pytest.raises(FormatError, match=r"origin 'template_R001\.xdf' is in both"):
        nct.merge(tmp_path / "d.hdf5", [DATA / "cf0.hdf5", DATA / "merged.hdf5"])
    with pytest.raises(FormatError, match=r"'subject' differs: 'VnNn' in .*cf0.* but None in"):
        nct.merge(tmp_path / "x.hdf5", [DATA / "cf0.hdf5", DATA / "fromfactory.hdf5"])
    assert not (tmp_path / "x.hdf5").exists() and not (tmp_path / "d.hdf5").exists()
    with pytest.raises(FormatError, match=r"end in '\.hdf5'"):
        nct.merge(tmp_path / "m.h5", [DATA / "cf0.hdf5"])


def test_populate_roundtrip(tmp_path):
    annotations = [
        {
            "origin": f"rec{o}.xdf",
            "attrs": {"readout": "cmep", "readin": "tms", "samplingrate": 1000.0,
                      "channel_labels": ["C3", "C4"]},
            "traces": [
                {"id": t, "reject": False, "onset_shift": None, "comment": "",
                 "xyz_coords": [1.0, 2.0, float(t)]}
                for t in range(11)
            ],
        }
        for o in range(2)
    ]
    arrays = [[np.full((40, 2), o * 100 + t, dtype=np.int16) for t in range(11)] for o in range(2)]
    path = nct.populate(tmp_path / "p.hdf5", annotations, arrays)
    ds = neurocube.open_traces(path)
    assert ds.sizes["trace"] == 22 and ds.data.dtype == np.int16
    assert list(ds.name.values[:11]) == [str(t) for t in range(11)]
    np.testing.assert_array_equal(ds.data.values[12], np.full((40, 2), 101))
    assert list(ds.channel.values) == ["C3", "C4"]
    assert ds.samplingrate.values[0] == 1000.0 and ds.xyz_coords.values[3, 2] == 3.0
    assert nct.get_attrs(path, 3)["onset_shift"] is None
    with h5py.File(path, "r") as h5:
        # origin keys are copied onto every trace
        assert h5["rec0.xdf/traces/10"].attrs["samplingrate"] == "1000.0"
    with pytest.raises(FormatError, match="2 annotations but 1 trace lists"):
        nct.populate(tmp_path / "q.hdf5", annotations, arrays[:1])
    with pytest.raises(FormatError, match="origins repeat"):
        nct.populate(tmp_path / "q.hdf5", [annotations[0]] * 2, [arrays[0]] * 2)
    assert not (tmp_path / "q.hdf5").exists()


def test_populate_failing_part_way_leaves_no_file_or_the_old_one(tmp_path):
    annotations = [
        {"origin": f"rec{o}.xdf", "attrs": {"readout": "cmep"}, "traces": [{"id": 0}, {"id": 1}]}
        for o in range(2)
    ]
    good = [[np.zeros(10), np.ones(10)], [np.zeros(10), np.ones(10)]]
    bad = [good[0], [np.zeros(10), np.ones((2, 5, 2))]]  # found while writing origin 2
    target = tmp_path / "p.hdf5"
    with pytest.raises(FormatError, match=r"trace 1 of 'rec1\.xdf' is 3-D"):
        nct.populate(target, annotations, bad)
    assert list(tmp_path.iterdir()) == []
    nct.populate(target, annotations, good)
    before = target.read_bytes()
    with pytest.raises(FormatError, match="is 3-D"):
        nct.populate(target, annotations, bad)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p.hdf5"]


# -- two processes -------------------------------------------------------------------


def _reader(path: str, rounds: int, queue) -> None:
    try:
        expected = None
        done = 0
        while done < rounds:
            try:
                ds = neurocube.open_traces(path)
                values = ds.data.values
            except SourceChangedError:
                continue  # a writer replaced the file between opening and computing: open again
            attrs = nct.get_attrs(path, 0)  # retries a rename between its stat and open itself
            done += 1
            if expected is None:
                expected = values
            assert np.array_equal(values, expected)
            assert isinstance(attrs["onset_shift"], int)
        queue.put("ok")
    except BaseException as exc:  # report anything to the parent
        queue.put(f"{type(exc).__name__}: {exc}")


def _incrementer(path: str, rounds: int, queue) -> None:
    try:
        done = 0
        while done < rounds:
            try:
                attrs = nct.get_attrs(path, 0)
                attrs["onset_shift"] += 1
                nct.set_attrs(path, 0, attrs)
            except AttributeMismatchError:
                continue  # the other writer came first: read again (a rename landing in
                # get_attrs between its stat and open is retried by get_attrs itself)
            done += 1
        queue.put("ok")
    except BaseException as exc:
        queue.put(f"{type(exc).__name__}: {exc}")


def test_writers_never_disturb_a_reader_nor_each_other(editable):
    nct.set_attrs(editable, 0, {**nct.get_attrs(editable, 0), "onset_shift": 0})
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_reader, args=(str(editable), 40, queue)),
        ctx.Process(target=_incrementer, args=(str(editable), 15, queue)),
        ctx.Process(target=_incrementer, args=(str(editable), 15, queue)),
    ]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    assert results == ["ok"] * 3
    assert nct.get_attrs(editable, 0)["onset_shift"] == 30  # no lost update
    with h5py.File(editable, "r", libver="latest", swmr=True) as h5:  # as offspect opens it
        assert h5["template_R001.xdf/traces/0"].attrs["onset_shift"] == "30"


_IN_PLACE_EDIT = """
import sys, h5py
try:
    with h5py.File(sys.argv[1], "r+", libver="latest", swmr=True) as h5:  # offspect's write_file
        h5["template_R001.xdf/traces/0"].attrs["comment"] = "edited in place"
    print("written")
except OSError as exc:
    print(f"refused: {exc}")
"""


def test_release_file_lets_an_in_place_writer_in(editable):
    import os
    import subprocess
    import sys

    if os.environ.get("HDF5_USE_FILE_LOCKING", "").upper() == "FALSE":
        pytest.skip("HDF5 file locking is switched off here")
    ds = neurocube.open_traces(editable, use_cache=False)
    first = ds.data.values  # the pool now holds a read handle, and with it HDF5's lock

    def edit_elsewhere() -> str:
        cmd = [sys.executable, "-c", _IN_PLACE_EDIT, str(editable)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()

    assert edit_elsewhere().startswith("refused: ")
    assert "unable to lock file" in edit_elsewhere()
    assert h5handles.release_file(editable) is True
    assert edit_elsewhere() == "written"
    assert h5handles.release_file(editable) is False  # nothing pooled any more
    with pytest.raises(SourceChangedError, match="changed since it was opened"):
        ds.data.values  # noqa: B018  (the old Dataset names a version that is gone)
    again = neurocube.open_traces(editable)
    assert again.comment.values[0] == "edited in place"
    np.testing.assert_array_equal(again.data.values, first)  # the values were not edited


def test_catalog_cache_skips_attribute_reads_and_follows_edits(editable, monkeypatch):
    import neurocube.datasets.traces as traces_module

    first = neurocube.open_traces(editable)  # scans the file and stores the catalog

    def refuse(key):
        raise AssertionError("the HDF5 attributes were read again")

    with monkeypatch.context() as patch:
        patch.setattr(traces_module, "_scan_file", refuse)
        again = neurocube.open_traces(editable)
    assert again.identical(first)
    attrs = nct.get_attrs(editable, 1)
    attrs["onset_shift"] = 7
    nct.set_attrs(editable, 1, attrs)  # new identity: the cached catalog no longer applies
    assert list(neurocube.open_traces(editable).onset_shift.values) == [-1, 7]
    assert list(neurocube.open_traces(editable, use_cache=False).onset_shift.values) == [-1, 7]


def _rename_after_stat(monkeypatch, path, times):
    """Make the next ``times`` stats of get_attrs be followed by a writer's atomic rename.

    The race of two processes, made deterministic: the stat sees one version, the open the
    next (``set_attrs`` replaces the file by rename). Each rename writes a new onset_shift.
    """
    real = nct.stat_key
    calls = {"n": 0}

    def stat_then_rename(p, *args, **kwargs):
        key = real(p, *args, **kwargs)
        if calls["n"] < times:
            calls["n"] += 1
            tmp = path.with_name(f".{path.name}.new")
            shutil.copyfile(path, tmp)
            with h5py.File(tmp, "r+") as h5:
                h5["template_R001.xdf/traces/0"].attrs["onset_shift"] = str(100 + calls["n"])
            os.utime(tmp, ns=(key[2] + 10**9 * calls["n"], key[2] + 10**9 * calls["n"]))
            os.replace(tmp, path)
        return key

    monkeypatch.setattr(nct, "stat_key", stat_then_rename)
    return calls


def test_get_attrs_reads_again_once_when_a_rename_lands_between_stat_and_open(
    editable, monkeypatch
):
    h5handles.release_file(editable)
    calls = _rename_after_stat(monkeypatch, editable, times=1)
    attrs = nct.get_attrs(editable, 0)
    assert calls["n"] == 1
    assert attrs["onset_shift"] == 101  # the version the second, consistent read saw
    assert attrs["cache_file_token"] == nct.get_attrs(editable, 0)["cache_file_token"]


def test_get_attrs_raises_when_the_file_is_replaced_at_every_attempt(editable, monkeypatch):
    h5handles.release_file(editable)
    calls = _rename_after_stat(monkeypatch, editable, times=5)
    with pytest.raises(SourceChangedError, match=r"cf0\.hdf5: changed since it was opened"):
        nct.get_attrs(editable, 0)
    assert calls["n"] == 2  # one retry, no more
