"""open_spectral / open_spectral_many against h5py reads of real and generated caches."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

import neurocube
from neurocube.datasets.spectral import guess_spectral, spectral_entities
from neurocube.errors import DataNotFoundError, FormatError, IncompleteFileError, NeurocubeWarning
from neurocube.sources import hdf5 as h5src
from neurocube.sources import hdf5_handles as h5handles
from neurocube.storage import IO_STATS

DATA = Path(__file__).parents[2] / "data" / "spectralbrain"
FULL = DATA / "sub-01_lh_white_spectral.h5"


def write_cache(path, n_vertices=12, n_modes=5, *, seed=0, chunks=True, version=True, **extra):
    """A spectralbrain-layout file written with plain h5py; values known by construction."""
    rng = np.random.default_rng(seed)
    arrays = {
        "eigenvalues": np.arange(n_modes, dtype=np.float64) * 0.5,
        "eigenvectors": np.arange(n_vertices * n_modes, dtype=np.float64).reshape(
            n_vertices, n_modes
        )
        + seed,
        "vertices": rng.normal(size=(n_vertices, 3)),
        "faces": rng.integers(0, n_vertices, size=(2 * n_vertices, 3)).astype(np.int64),
    }
    with h5py.File(path, "w") as h5:
        for name, value in arrays.items():
            h5.create_dataset(
                name, data=value, chunks=chunks, compression="gzip", compression_opts=4
            )
        group = h5.create_group("descriptors")
        group.create_dataset("hks", data=np.full((n_vertices, 4), float(seed)), chunks=True)
        for key, value in extra.items():
            h5.attrs[key] = value
        if version:
            h5.attrs["spectralbrain_version"] = "0.1.0"
    return arrays


def test_real_sample_matches_h5py():
    ds = neurocube.open_spectral(FULL)
    with h5py.File(FULL, "r") as h5:
        for name in ("eigenvalues", "eigenvectors", "vertices", "faces"):
            np.testing.assert_array_equal(ds[name].values, h5[name][()])
            assert ds[name].dtype == h5[name].dtype
        np.testing.assert_array_equal(ds["hks"].values, h5["descriptors/hks"][()])
        np.testing.assert_array_equal(ds["wks"].values, h5["descriptors/wks"][()])
    assert ds.eigenvectors.dims == ("vertex", "mode")
    assert ds.vertices.dims == ("vertex", "xyz")
    assert list(ds.xyz.values) == ["x", "y", "z"]
    assert ds.faces.dims == ("face", "corner")
    assert ds.hks.dims == ("vertex", "hks_scale")
    assert ds.wks.dims == ("vertex", "wks_scale") and ds.wks.dtype == np.float32
    assert ds.attrs["neurocube_descriptors"] == ["hks", "wks"]
    assert ds.attrs["neurocube_sources"] == [str(FULL.absolute())]


def test_metadata_is_plain_python():
    attrs = neurocube.open_spectral(FULL).attrs
    assert attrs["flag"] is True
    assert type(attrs["n_eigenvalues"]) is int and attrs["n_eigenvalues"] == 5
    assert type(attrs["surface_area"]) is float and attrs["surface_area"] == 123.4
    assert attrs["lst"] == [1, 2, 3] and all(type(v) is int for v in attrs["lst"])
    assert attrs["hemi"] == "lh" and attrs["subject"] == "sub-01"
    assert attrs["spectralbrain_version"] == "0.1.0"


def test_odd_metadata(tmp_path):
    path = tmp_path / "odd.h5"
    write_cache(path)
    with h5py.File(path, "a") as h5:
        h5.attrs["names"] = np.array(["a", "bé"], dtype=h5py.string_dtype())
        h5.attrs["fixed"] = np.bytes_(b"abc")
        h5.attrs["floats"] = np.array([1.5, np.inf])
        h5.attrs["flags"] = np.array([True, False])
        h5.attrs["unicode"] = "Ωmega"
        h5.attrs["empty"] = h5py.Empty("f8")
    attrs = neurocube.open_spectral(path).attrs
    assert attrs["names"] == ["a", "bé"]
    assert attrs["fixed"] == "abc"
    assert attrs["floats"] == [1.5, float("inf")]
    assert attrs["flags"] == [True, False] and type(attrs["flags"][0]) is bool
    assert attrs["unicode"] == "Ωmega"
    assert "empty" not in attrs  # no None in attrs


def test_chunks_follow_hdf5_chunks_and_values_match(tmp_path):
    path = tmp_path / "big.h5"
    with h5py.File(path, "w") as h5:
        values = np.random.default_rng(1).normal(size=(6000, 40))
        h5.create_dataset(
            "eigenvectors", data=values, chunks=(500, 8), compression="gzip", compression_opts=4
        )
        h5.create_dataset("eigenvalues", data=np.arange(40.0), chunks=(8,))
        h5.attrs["spectralbrain_version"] = "0.1.0"
    ds = neurocube.open_spectral(path)
    vecs = ds.eigenvectors.data
    for axis, hchunk in enumerate((500, 8)):
        edges = np.cumsum(vecs.chunks[axis])[:-1]
        assert all(edge % hchunk == 0 for edge in edges), vecs.chunks
    small = neurocube.open_spectral(path, chunks={"eigenvectors": (1000, 16)})
    assert small.eigenvectors.data.chunksize == (1000, 16)
    np.testing.assert_array_equal(ds.eigenvectors.values, values)
    picked = np.array([5, 4999, 5000, 5999, 17])
    np.testing.assert_array_equal(
        ds.eigenvectors.isel(vertex=picked, mode=slice(3, 30, 4)).values,
        values[picked][:, 3:30:4],
    )


def test_tiny_target_gives_hdf5_chunks(tmp_path):
    path = tmp_path / "c.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("eigenvectors", data=np.zeros((100, 10)), chunks=(10, 5))
    key = h5handles.stat_key(path)
    with h5py.File(path, "r") as h5:
        spec = h5src.HDF5DatasetSpec.from_dataset(h5["eigenvectors"], key)
    arr = h5src.hdf5_dask_array(spec, target_bytes=1)
    assert arr.chunks == ((10,) * 10, (5, 5))


def test_opening_and_selecting_reads_no_array(tmp_path, monkeypatch):
    path = tmp_path / "lazy.h5"
    write_cache(path, n_vertices=300)

    def refuse(*args, **kwargs):
        raise AssertionError("array data read while building the graph")

    IO_STATS.reset()
    monkeypatch.setattr(h5src, "read_selection", refuse)
    ds = neurocube.open_spectral(path)
    sub = ds.eigenvectors.isel(vertex=slice(10, 200), mode=[0, 2]) * 2
    assert IO_STATS.snapshot()[1] == 0
    monkeypatch.undo()
    np.testing.assert_array_equal(
        sub.values, (np.arange(300 * 5.0).reshape(300, 5)[10:200][:, [0, 2]]) * 2
    )
    assert IO_STATS.snapshot()[1] > 0


def test_graph_names_are_deterministic(tmp_path):
    path = tmp_path / "det.h5"
    write_cache(path)
    a = neurocube.open_spectral(path)
    b = neurocube.open_spectral(path)
    assert a.eigenvectors.data.name == b.eigenvectors.data.name
    assert a.eigenvectors.data.name != a.vertices.data.name


def test_half_written_file_warns_or_fails():
    bad = DATA / "bad.h5"
    with pytest.warns(NeurocubeWarning, match=r"bad\.h5: incomplete spectral cache"):
        ds = neurocube.open_spectral(bad)
    assert list(ds.data_vars) == ["eigenvalues"]
    with pytest.raises(IncompleteFileError, match=r"bad\.h5.*no 'spectralbrain_version'"):
        neurocube.open_spectral(bad, strict=True)


def test_wrong_files_are_refused(tmp_path):
    with pytest.raises(DataNotFoundError, match="no such file"):
        neurocube.open_spectral(tmp_path / "missing.h5")
    text = tmp_path / "x.h5"
    text.write_text("not hdf5")
    with pytest.raises(FormatError, match="expected an HDF5 file"):
        neurocube.open_spectral(text)
    offspect = Path(__file__).parents[2] / "data" / "offspect" / "cf0.hdf5"
    with pytest.raises(FormatError, match=r"expected a spectral cache.*open_traces"):
        neurocube.open_spectral(offspect)


def test_disagreeing_sizes_are_refused(tmp_path):
    path = tmp_path / "mismatch.h5"
    with h5py.File(path, "w") as h5:
        h5["eigenvalues"] = np.zeros(5)
        h5["eigenvectors"] = np.zeros((12, 4))
        h5.attrs["spectralbrain_version"] = "0.1.0"
    with pytest.raises(FormatError, match="has 4 along 'mode' but '/eigenvalues' has 5"):
        neurocube.open_spectral(path)


def test_dataset_is_zarr_serialisable(tmp_path):
    pytest.importorskip("zarr")
    import warnings

    import xarray as xr

    ds = neurocube.open_spectral(FULL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr's notes on unstable string dtypes
        ds.to_zarr(tmp_path / "s.zarr", mode="w")
        back = xr.open_zarr(tmp_path / "s.zarr")
    np.testing.assert_array_equal(back.eigenvectors.values, ds.eigenvectors.values)
    assert back.attrs["lst"] == [1, 2, 3]


def test_guess_spectral(tmp_path):
    assert guess_spectral(FULL)
    assert guess_spectral(DATA / "decomp.h5")
    assert not guess_spectral(Path(__file__).parents[2] / "data" / "offspect" / "cf0.hdf5")
    assert not guess_spectral(DATA / "sub-01_conn.tsv")
    assert not guess_spectral(tmp_path / "missing.h5")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("sub-01_hemi-L_spectral.h5", {"subject": "01", "hemi": "L"}),
        ("sub-01_lh_white_spectral.h5", {"subject": "01", "hemi": "L"}),
        ("sub-A2_hemi-rh_desc-x.hdf5", {"subject": "A2", "hemi": "R"}),
        ("decomp.h5", {}),
    ],
)
def test_entities_from_names(name, expected):
    assert spectral_entities(name) == expected


def test_many_subjects_stack(tmp_path):
    paths = []
    for i, sub in enumerate(["01", "02", "03"]):
        path = tmp_path / f"sub-{sub}_hemi-L_spectral.h5"
        write_cache(path, seed=i, subject=f"sub-{sub}", n_eigenvalues=5)
        paths.append(path)
    ds = neurocube.open_spectral_many(paths)
    assert ds.eigenvectors.dims == ("subject", "vertex", "mode")
    assert list(ds.subject.values) == ["01", "02", "03"]
    for i, path in enumerate(paths):
        with h5py.File(path, "r") as h5:
            np.testing.assert_array_equal(ds.eigenvectors.values[i], h5["eigenvectors"][()])
            np.testing.assert_array_equal(ds.hks.values[i], h5["descriptors/hks"][()])
    assert ds.attrs["n_eigenvalues"] == 5  # agrees everywhere: kept
    assert "subject" not in ds.attrs  # differs: dropped (the coord has it)
    assert ds.attrs["neurocube_sources"] == [str(p) for p in paths]


def test_many_subject_hemi_grid(tmp_path):
    paths = []
    for sub in ("01", "02"):
        for hemi in ("lh", "rh"):
            path = tmp_path / f"sub-{sub}_{hemi}_white_spectral.h5"
            write_cache(path, seed=int(sub) * 10 + (hemi == "rh"))
            paths.append(path)
    ds = neurocube.open_spectral_many(paths)
    assert ds.eigenvalues.dims == ("subject", "hemi", "mode")
    assert list(ds.hemi.values) == ["L", "R"]
    np.testing.assert_array_equal(
        ds.eigenvectors.sel(subject="02", hemi="R").values,
        np.arange(60.0).reshape(12, 5) + 21,
    )
    with pytest.raises(FormatError, match=r"full grid.*missing.*'02', 'R'"):
        neurocube.open_spectral_many(paths[:3])


def test_many_refuses_disagreeing_shapes(tmp_path):
    left, right = tmp_path / "sub-01_hemi-L.h5", tmp_path / "sub-01_hemi-R.h5"
    write_cache(left, n_vertices=12)
    write_cache(right, n_vertices=14)
    with pytest.raises(FormatError, match=r"has 14 along 'vertex'.*has 12.*shapes must agree"):
        neurocube.open_spectral_many([left, right])
    other = tmp_path / "sub-02_hemi-L.h5"
    with h5py.File(other, "w") as h5:
        h5["eigenvalues"] = np.zeros(5)
        h5.attrs["spectralbrain_version"] = "0.1.0"
    with pytest.raises(FormatError, match=r"holds.*same arrays"):
        neurocube.open_spectral_many([left, other])
    with pytest.raises(FormatError, match=r"differ by subject but these name none.*copy"):
        shutil.copy(left, tmp_path / "copy.h5")
        neurocube.open_spectral_many([left, other, tmp_path / "copy.h5"])
    twins = [tmp_path / "a.h5", tmp_path / "b.h5"]
    for twin in twins:
        shutil.copy(left, twin)
    with pytest.raises(FormatError, match="cannot tell the files apart"):
        neurocube.open_spectral_many(twins)
    with pytest.raises(FormatError, match="no paths"):
        neurocube.open_spectral_many([])


@pytest.mark.slow
def test_large_chunked_eigenvectors_match_h5py(tmp_path):
    """A 100k x 120 float64 matrix (96 MB) with h5py's automatic chunks, gzip 4, as written
    by the original: more than one Dask chunk, each a block of whole HDF5 chunks."""
    path = tmp_path / "sub-01_hemi-L_spectral.h5"
    n_vertices, n_modes = 100_000, 120
    with h5py.File(path, "w") as h5:
        dset = h5.create_dataset(
            "eigenvectors", shape=(n_vertices, n_modes), dtype="f8", chunks=True,
            compression="gzip", compression_opts=4,
        )  # fmt: skip
        for start in range(0, n_vertices, 25_000):
            rows = np.arange(start, start + 25_000)[:, None]
            dset[start : start + 25_000] = np.sin(rows * (np.arange(n_modes) + 1) * 1e-4)
        hchunks = dset.chunks
        h5.attrs["spectralbrain_version"] = "0.1.0"
    ds = neurocube.open_spectral(path)
    vecs = ds.eigenvectors.data
    assert vecs.npartitions > 1
    assert np.prod([max(c) for c in vecs.chunks]) * 8 <= 64 * 2**20  # about 64 MiB at most
    for axis, hchunk in enumerate(hchunks):
        edges = np.cumsum(vecs.chunks[axis])[:-1]
        assert all(edge % hchunk == 0 for edge in edges), (vecs.chunks, hchunks)
    with h5py.File(path, "r") as h5:
        expected = h5["eigenvectors"][()]
    np.testing.assert_array_equal(ds.eigenvectors.values, expected)
    block = slice(40_000, 60_000)
    np.testing.assert_array_equal(
        ds.eigenvectors.isel(vertex=block).values, expected[block]
    )
    np.testing.assert_array_equal(
        ds.eigenvectors.isel(mode=slice(0, 20)).values, expected[:, :20]
    )
