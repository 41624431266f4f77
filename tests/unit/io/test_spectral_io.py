"""Spectral writers: HDF5 cache, connectome TSV, GIFTI, NPZ; atomic, checked up front."""

from __future__ import annotations

from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

import neurocube
import neurocube.io as nio
from neurocube.errors import FormatError
from neurocube.io import spectral as spectral_io

DATA = Path(__file__).parents[2] / "data" / "spectralbrain"


def load_hdf5_like_the_original(path):
    """The original ``load_hdf5`` behaviour (FORMATS.md §3): every dataset and root attribute."""
    out = {"metadata": {}}
    with h5py.File(path, "r") as h5:
        for name in ("eigenvalues", "eigenvectors", "vertices", "faces"):
            if name in h5:
                out[name] = h5[name][()]
        if "descriptors" in h5:
            out["descriptors"] = {k: v[()] for k, v in h5["descriptors"].items()}
        for key, value in h5.attrs.items():
            out["metadata"][key] = value
    return out


def assert_same_load(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if key == "metadata":
            assert a[key].keys() == b[key].keys()
            for name in a[key]:
                x, y = a[key][name], b[key][name]
                assert type(x) is type(y), name
                np.testing.assert_array_equal(x, y)
        elif key == "descriptors":
            assert a[key].keys() == b[key].keys()
            for name in a[key]:
                np.testing.assert_array_equal(a[key][name], b[key][name])
                assert a[key][name].dtype == b[key][name].dtype
        else:
            np.testing.assert_array_equal(a[key], b[key])
            assert a[key].dtype == b[key].dtype


def test_save_from_arrays_reads_back_like_the_original(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "eigenvalues": np.linspace(0, 1, 7),
        "eigenvectors": rng.normal(size=(50, 7)),
        "vertices": rng.normal(size=(50, 3)),
        "faces": rng.integers(0, 50, size=(96, 3)).astype(np.int64),
        "descriptors": {
            "hks": rng.normal(size=(50, 4)),
            "wks": rng.normal(size=(50, 2)).astype("f4"),
        },
    }
    metadata = {
        "subject": "sub-01", "hemi": "lh", "n_eigenvalues": 7, "flag": True,
        "surface_area": 12.5, "lst": [1, 2, 3], "names": ["a", "b"],
    }  # fmt: skip
    path = nio.save_spectral(tmp_path / "out.h5", arrays, metadata)
    loaded = load_hdf5_like_the_original(path)
    for name in ("eigenvalues", "eigenvectors", "vertices", "faces"):
        np.testing.assert_array_equal(loaded[name], arrays[name])
    np.testing.assert_array_equal(loaded["descriptors"]["wks"], arrays["descriptors"]["wks"])
    meta = loaded["metadata"]
    assert meta["spectralbrain_version"] == "0.1.0"
    assert meta["subject"] == "sub-01" and meta["n_eigenvalues"] == 7 and meta["flag"]
    assert list(meta["lst"]) == [1, 2, 3]
    with h5py.File(path, "r") as h5:
        assert h5["eigenvectors"].compression == "gzip"
        assert h5["eigenvectors"].compression_opts == 4
        assert h5["eigenvectors"].chunks is not None
    ds = neurocube.open_spectral(path)
    assert ds.attrs["names"] == ["a", "b"] and ds.attrs["flag"] is True


def test_sample_roundtrips_identically_through_a_dataset(tmp_path):
    source = DATA / "sub-01_lh_white_spectral.h5"
    ds = neurocube.open_spectral(source)
    out = nio.save_spectral(tmp_path / "copy.h5", ds)
    assert_same_load(load_hdf5_like_the_original(out), load_hdf5_like_the_original(source))


def test_dask_arrays_are_written_chunk_by_chunk(tmp_path, monkeypatch):
    big = tmp_path / "big.h5"
    values = np.arange(4000 * 30, dtype=np.float64).reshape(4000, 30)
    with h5py.File(big, "w") as h5:
        h5.create_dataset("eigenvectors", data=values, chunks=(500, 30))
        h5.attrs["spectralbrain_version"] = "0.1.0"
    ds = neurocube.open_spectral(big, chunks={"eigenvectors": (500, 30)})
    biggest = []
    original = spectral_io.np.asarray

    def spy(x, *args, **kwargs):
        out = original(x, *args, **kwargs)
        biggest.append(out.size)
        return out

    monkeypatch.setattr(spectral_io.np, "asarray", spy)
    out = nio.save_spectral(tmp_path / "copy.h5", ds)
    monkeypatch.undo()
    assert not biggest or max(biggest) < values.size  # never materialised whole here
    with h5py.File(out, "r") as h5:
        np.testing.assert_array_equal(h5["eigenvectors"][()], values)


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"atlas": None}, r"'atlas': None cannot be stored"),
        ({"opts": {"a": 1}}, r"'opts': nested dicts"),
        ({"ll": [[1, 2]]}, r"'ll': nested lists"),
        ({"mixed": [1, "a"]}, r"'mixed': a list mixing"),
        ({"x": object()}, r"'x': values of type object"),
        ({"hole": [1, None]}, r"'hole': a list with None"),
        ({"big": 2**70}, r"'big': 1180591620717411303424 does not fit in 64 bits"),
        ({"bigs": [1, -(2**63) - 1]}, r"'bigs': an item -9223372036854775809 does not fit"),
        ({"nul": "a\x00b"}, r"'nul': holds a NUL character"),
        ({"surrogate": "\udcff"}, r"'surrogate': is not valid Unicode"),
    ],
)
def test_bad_metadata_is_refused_before_writing(tmp_path, metadata, message):
    target = tmp_path / "never.h5"
    with pytest.raises(FormatError, match=message):
        nio.save_spectral(target, {"eigenvalues": np.ones(3)}, metadata)
    assert list(tmp_path.iterdir()) == []


def test_failure_part_way_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "keep.h5"
    nio.save_spectral(target, {"eigenvalues": np.ones(3)}, {"v": 1})
    before = target.read_bytes()
    calls = []

    def fail_second(parent, name, *args):
        calls.append(name)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return original(parent, name, *args)

    original = spectral_io._write_array
    monkeypatch.setattr(spectral_io, "_write_array", fail_second)
    with pytest.raises(OSError, match="disk full"):
        nio.save_spectral(target, {"eigenvalues": np.ones(4), "eigenvectors": np.ones((2, 4))})
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.h5"]


def test_failure_while_computing_leaves_no_file(tmp_path):
    import dask.array as da

    def block(x, block_info=None):
        if block_info[0]["chunk-location"][0] == 3:
            raise RuntimeError("source unreadable (block 3)")
        return x

    vectors = da.ones((800, 6), chunks=(100, 6)).map_blocks(block, dtype=float)
    with pytest.raises(RuntimeError, match="block 3"):
        nio.save_spectral(
            tmp_path / "never.h5", {"eigenvalues": np.ones(6), "eigenvectors": vectors}
        )
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary sibling


_DISK_FULL = """
import json, resource, signal, sys
from pathlib import Path
import numpy as np
import neurocube.io as nio

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of a kill
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
big = np.random.default_rng(0).normal(size=(300, 300))  # > 64 KiB in every format
writers = {
    "s.h5": lambda p: nio.save_spectral(p, {"eigenvalues": np.ones(3), "eigenvectors": big}),
    "c.tsv": lambda p: nio.save_connectome(p, big),
    "g.func.gii": lambda p: nio.save_gifti_func(p, big),
    "a.npz": lambda p: nio.save_npz(p, a=big),
}
errors = {}
for folder in sys.argv[1:]:
    for name, write in writers.items():
        try:
            write(Path(folder) / name)
            errors[f"{folder}/{name}"] = None
        except OSError as exc:
            errors[f"{folder}/{name}"] = exc.errno
print(json.dumps(errors), flush=True)
# HDF5 cannot close a file whose writes failed; its atexit clean-up of that id can crash
# the interpreter, so leave without it (the writers' own clean-up has run by now)
import os
os._exit(0)
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="POSIX file-size limits")
def test_disk_full_part_way_leaves_no_file_or_the_old_one(tmp_path):
    """A real write failure (the file-size limit hit part way), in a child process."""
    import errno
    import json
    import subprocess
    import sys

    fresh, kept = tmp_path / "fresh", tmp_path / "kept"
    fresh.mkdir()
    kept.mkdir()
    names = ["s.h5", "c.tsv", "g.func.gii", "a.npz"]
    for name in names:
        (kept / name).write_bytes(b"the previous version")
    result = subprocess.run(
        [sys.executable, "-c", _DISK_FULL, str(fresh), str(kept)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    assert errors == {f"{d}/{n}": errno.EFBIG for d in (fresh, kept) for n in names}
    assert list(fresh.iterdir()) == []
    assert sorted(p.name for p in kept.iterdir()) == sorted(names)
    assert all((kept / n).read_bytes() == b"the previous version" for n in names)


def test_unknown_inputs_are_refused(tmp_path):
    with pytest.raises(FormatError, match=r"unknown arrays \['eigvals'\]"):
        nio.save_spectral(tmp_path / "x.h5", {"eigvals": np.ones(3)})
    with pytest.raises(FormatError, match=r"expected an xarray\.Dataset"):
        nio.save_spectral(tmp_path / "x.h5", np.ones(3))


# -- connectome ----------------------------------------------------------------------


def test_read_both_sample_header_variants():
    labelled = nio.read_connectome(DATA / "sub-01_conn.tsv")
    assert labelled.dims == ("source", "target")
    assert list(labelled.source.values) == ["A", "B", "C"]
    assert labelled.values[0, 1] == 0.8259572222
    numbered = nio.read_connectome(DATA / "sub-01_conn_nolabels.tsv")
    assert list(numbered.source.values) == [0, 1, 2]
    assert numbered.values[2, 2] == 4.844989423e-09


def test_read_headerless_older_variant(tmp_path):
    path = tmp_path / "old.tsv"
    path.write_text("1.5\t2\n3\t4e-3\n")
    matrix = nio.read_connectome(path)
    np.testing.assert_array_equal(matrix.values, [[1.5, 2], [3, 0.004]])
    assert list(matrix.target.values) == [0, 1]


@pytest.mark.parametrize("labels", [None, ["V1", "V2", "MT", "FFA"]])
def test_connectome_roundtrip(tmp_path, labels):
    values = np.random.default_rng(2).random((4, 4)) * 1e-7
    path = nio.save_connectome(tmp_path / "c.tsv", values, labels=labels)
    back = nio.read_connectome(path)
    np.testing.assert_array_equal(back.values, values)  # full precision
    expected = labels if labels is not None else [0, 1, 2, 3]
    assert list(back.source.values) == expected == list(back.target.values)
    assert path.read_text().splitlines()[0].startswith("\t")


def test_connectome_errors(tmp_path):
    with pytest.raises(FormatError, match=r"square 2-D matrix, got \(2, 3\)"):
        nio.save_connectome(tmp_path / "c.tsv", np.ones((2, 3)))
    with pytest.raises(FormatError, match="2 labels for a 3 x 3"):
        nio.save_connectome(tmp_path / "c.tsv", np.ones((3, 3)), labels=["a", "b"])
    with pytest.raises(FormatError, match="labels repeat"):
        nio.save_connectome(tmp_path / "c.tsv", np.ones((2, 2)), labels=["a", "a"])
    ragged = tmp_path / "r.tsv"
    ragged.write_text("\ta\tb\na\t1\nb\t1\t2\n")
    with pytest.raises(FormatError, match=r"r\.tsv: line 2: 1 values, expected 2"):
        nio.read_connectome(ragged)
    words = tmp_path / "w.tsv"
    words.write_text("\ta\na\tlots\n")
    with pytest.raises(FormatError, match="expected a number, found 'lots'"):
        nio.read_connectome(words)
    assert not (tmp_path / "c.tsv").exists()


# -- GIFTI / NPZ ---------------------------------------------------------------------


def test_gifti_matches_the_sample_layout(tmp_path):
    sample = nib.load(DATA / "sub-01_hks.func.gii")
    values = np.column_stack([d.data for d in sample.darrays])
    path = nio.save_gifti_func(tmp_path / "sub-01_hks.func.gii", values)
    ours = nib.load(path)
    assert len(ours.darrays) == len(sample.darrays) == 3
    for mine, theirs in zip(ours.darrays, sample.darrays, strict=True):
        assert mine.intent == theirs.intent == nib.nifti1.intent_codes["NIFTI_INTENT_SHAPE"]
        assert mine.data.dtype == theirs.data.dtype == np.float32
        np.testing.assert_array_equal(mine.data, theirs.data)
    one = nib.load(nio.save_gifti_func(tmp_path / "map.func.gii", np.arange(5)))
    assert len(one.darrays) == 1 and one.darrays[0].data.dtype == np.float32
    with pytest.raises(FormatError, match="numeric"):
        nio.save_gifti_func(tmp_path / "bad.func.gii", np.ones((2, 2, 2)))


def test_npz_roundtrip_and_refusals(tmp_path):
    sample = np.load(DATA / "sub-01_arrays.npz", allow_pickle=False)
    path = nio.save_npz(tmp_path / "arrays.dat", vertices=sample["vertices"], faces=sample["faces"])
    assert path.name == "arrays.dat"  # exactly the path asked for, no ".npz" appended
    with np.load(path, allow_pickle=False) as back:
        np.testing.assert_array_equal(back["faces"], sample["faces"])
        assert back["vertices"].dtype == sample["vertices"].dtype
    with pytest.raises(FormatError, match="object dtype, which needs pickle"):
        nio.save_npz(tmp_path / "o.npz", bad=np.array([{"a": 1}], dtype=object))
    with pytest.raises(FormatError, match="at least one"):
        nio.save_npz(tmp_path / "e.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arrays.dat"]
