"""open_nifti against nibabel's eager get_fdata(), for every NIfTI variant a user has."""

from __future__ import annotations

import gzip
import os

import dask
import nibabel as nib
import numpy as np
import pytest
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import neurocube
from neurocube.errors import (
    DataNotFoundError,
    FormatError,
    GridMismatchError,
    NeurocubeError,
    SourceChangedError,
    TruncatedFileError,
)
from neurocube.sources import nifti_header
from neurocube.storage import IO_STATS
from tests.fixtures.nifti import AFFINE, analytic_values, stored_for, write_nifti

SHAPE = (5, 6, 7, 9)
FIXTURE_OK = [HealthCheck.function_scoped_fixture]  # the module-scoped file is read-only


def brain_mask(shape=SHAPE[:3]):
    m = np.zeros(shape, bool)
    m[1:4, 2:5, 1:6] = True
    m[0, 0, 0] = True
    m[4, 5, 6] = True
    return m


def oracle(path):
    return nib.load(str(path)).get_fdata()


VARIANTS = [
    pytest.param(version, endian, dtype, ext, id=f"nifti{version}-{endian}-{dtype}-{ext}")
    for version in (1, 2)
    for endian in ("<", ">")
    for dtype in ("float32", "float64", "int16", "uint8")
    for ext in (".nii", ".nii.gz")
]


@pytest.mark.parametrize(("version", "endian", "dtype", "ext"), VARIANTS)
def test_every_variant_matches_nibabel(nifti_factory, version, endian, dtype, ext):
    path = nifti_factory(f"v{ext}", dtype=dtype, version=version, endian=endian)
    expected = oracle(path)

    full = neurocube.open_nifti(path, chunks=2)
    assert full.data.dims == ("x", "y", "z", "trial")
    np.testing.assert_allclose(full.data.values, expected, rtol=1e-6)

    mask = brain_mask()
    masked = neurocube.open_nifti(path, mask=mask, chunks=4)
    assert masked.data.dims == ("trial", "voxel")
    np.testing.assert_allclose(masked.data.values, expected[mask].T, rtol=1e-6)


def test_scaled_int16_returns_scaled_floats(nifti_factory):
    path = nifti_factory("scaled.nii.gz", dtype="int16")
    ds = neurocube.open_nifti(path)
    assert ds.attrs["scl_slope"] == 0.5 and ds.attrs["scl_inter"] == -3.0
    assert ds.data.dtype == np.float32
    raw = np.asarray(nib.load(str(path)).dataobj.get_unscaled())
    np.testing.assert_allclose(ds.data.values, raw * 0.5 - 3.0)


def test_unscaled_integers_keep_their_type(nifti_factory):
    ds = neurocube.open_nifti(nifti_factory("u8.nii", dtype="uint8"))
    assert ds.data.dtype == np.uint8


def test_extension_before_vox_offset(nifti_factory):
    path = nifti_factory("ext.nii.gz", extension=b"a comment extension " * 10)
    assert nib.load(str(path)).header.extensions  # the file really has one
    np.testing.assert_allclose(neurocube.open_nifti(path).data.values, oracle(path))


def test_nan_stays_nan(nifti_factory):
    path = nifti_factory("nan.nii.gz", nan_voxels=[(1, 2, 3), (0, 0, 0)])
    mask = brain_mask()
    got = neurocube.open_nifti(path, mask=mask).data.values
    expected = oracle(path)[mask].T
    assert np.isnan(got).sum() == np.isnan(expected).sum() > 0
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))


def test_three_d_image(nifti_factory):
    path = nifti_factory("vol.nii", shape=(5, 6, 7))
    ds = neurocube.open_nifti(path)
    assert ds.data.dims == ("x", "y", "z")
    np.testing.assert_array_equal(ds.data.values, oracle(path))
    masked = neurocube.open_nifti(path, mask=brain_mask())
    # a map over voxels, no length-1 trial dim (issue 12, item 10)
    assert masked.data.dims == ("voxel",)
    np.testing.assert_array_equal(masked.data.values, oracle(path)[brain_mask()])


def test_voxel_order_and_coordinates(nifti_factory):
    path = nifti_factory("coords.nii.gz")
    mask = brain_mask()
    ds = neurocube.open_nifti(path, mask=mask)
    i, j, k = np.nonzero(mask)  # C order over the grid
    np.testing.assert_array_equal(ds.i.values, i)
    np.testing.assert_array_equal(ds.j.values, j)
    np.testing.assert_array_equal(ds.k.values, k)
    xyz = nib.affines.apply_affine(AFFINE, np.c_[i, j, k])
    np.testing.assert_allclose(np.c_[ds.x.values, ds.y.values, ds.z.values], xyz)
    # analytic: value = t*1000 + C-order flat index of (i, j, k)
    flat = np.ravel_multi_index((i, j, k), SHAPE[:3])
    np.testing.assert_array_equal(ds.data.values[3], 3000 + flat)
    assert ds.attrs["grid_shape"] == [5, 6, 7]
    np.testing.assert_allclose(ds.attrs["affine"], AFFINE)
    assert ds.attrs["source"] == str(path.resolve())


@pytest.mark.parametrize("form", ["grid", "flat", "nifti_path", "float_with_nan"])
def test_mask_forms(nifti_factory, tmp_path, form):
    path = nifti_factory("m.nii.gz")
    mask = brain_mask()
    if form == "grid":
        given_mask = mask
    elif form == "flat":
        given_mask = mask.ravel(order="C")
    else:
        values = np.where(mask, -0.5, 0.0)  # negative R² counts as inside
        if form == "float_with_nan":
            values[0, 1, 1] = np.nan  # NaN counts as outside
            given_mask = values
        else:
            values[0, 1, 1] = np.nan
            given_mask = tmp_path / "mask.nii.gz"
            nib.Nifti1Image(values.astype(np.float32), AFFINE).to_filename(str(given_mask))
    ds = neurocube.open_nifti(path, mask=given_mask)
    np.testing.assert_allclose(ds.data.values, oracle(path)[mask].T)


def test_chunks_are_whole_volumes_and_known(nifti_factory):
    path = nifti_factory("c.nii.gz", shape=(5, 6, 7, 23))
    ds = neurocube.open_nifti(path, mask=brain_mask(), chunks=5)
    assert ds.data.chunks == ((5, 5, 5, 5, 3), (int(brain_mask().sum()),))
    full = neurocube.open_nifti(path, chunks={"trial": 10})
    assert full.data.chunks == ((5,), (6,), (7,), (10, 10, 3))
    assert not any(np.isnan(c) for dim in ds.data.chunks for c in dim)


def test_auto_chunks_target_tens_of_megabytes(tmp_path):
    # volumes of 1 MiB: 'auto' groups 32 of them (32 MiB)
    path = tmp_path / "big.nii"
    shape = (64, 64, 64, 40)
    stored = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype="<f4", shape=shape)
    write_nifti(path, np.asarray(stored[..., :1]).repeat(40, axis=3))
    ds = neurocube.open_nifti(path)
    assert ds.data.chunks[3] == (32, 8)
    assert neurocube.open_nifti(path, chunks="8MiB").data.chunks[3] == (8,) * 5


def test_opening_and_masking_read_no_voxel_data(nifti_factory):
    path = nifti_factory("lazy.nii.gz", shape=(5, 6, 7, 30))
    IO_STATS.reset()
    ds = neurocube.open_nifti(path, mask=brain_mask(), chunks=4)
    graph = ds.data.isel(trial=slice(3, 20)).mean("voxel")
    graph = graph.where(ds.x.max() > -1000)
    _, before = IO_STATS.snapshot()
    assert before == 0, "building the graph read voxel data"
    graph.compute()
    _, after = IO_STATS.snapshot()
    vol_bytes = 5 * 6 * 7 * 4
    # A first read inflates the file once to its end: only a full pass checks the gzip CRC32
    # (and it stores the index with each volume's checksum), so no value goes out unverified.
    assert after == 30 * vol_bytes
    ds = neurocube.open_nifti(path, mask=brain_mask(), chunks=4)  # opened with its index
    IO_STATS.reset()
    ds.data.isel(trial=slice(3, 20)).mean("voxel").compute()
    _, again = IO_STATS.snapshot()
    # through the index the selection reads its own 17 volumes (3..19) and no others
    assert again == 17 * vol_bytes


@settings(max_examples=40, deadline=None, suppress_health_check=FIXTURE_OK)
@given(
    trials=st.lists(st.integers(0, SHAPE[3] - 1), min_size=1, max_size=12),
    voxels=st.lists(st.integers(0, 30), min_size=1, max_size=20),
    chunk=st.integers(1, 9),
)
def test_arbitrary_selections_match_numpy(masked_gz_file, trials, voxels, chunk):
    path, expected = masked_gz_file
    ds = neurocube.open_nifti(path, mask=brain_mask(), chunks=chunk)
    got = ds.data.isel(trial=trials, voxel=voxels).values
    np.testing.assert_allclose(got, expected[np.ix_(trials, voxels)])


@pytest.fixture(scope="module")
def masked_gz_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("hyp") / "h.nii.gz"
    values = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    write_nifti(path, values)
    return path, oracle(path)[brain_mask()].T



_VARIANT_FILES: dict[tuple, tuple] = {}


@pytest.fixture(scope="module")
def variant_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("variants")


def variant_file(folder, version, endian, dtype, ext, scaled, extension, nan):
    """One file per variant (written on first use), with nibabel's eager values as the oracle."""
    key = (version, endian, dtype, ext, scaled, extension, nan)
    if key not in _VARIANT_FILES:
        values = analytic_values(SHAPE)
        if nan and dtype.startswith("float"):
            values[1, 2, 3] = np.nan
            values[0, 0, :4] = np.nan
        stored, slope, inter = stored_for(dtype, values)
        if scaled and slope is None:
            slope, inter = (2.0, -1.0) if dtype.startswith("float") else (0.25, 0.5)
        name = "-".join(str(part) for part in key[:3]) + f"-{len(_VARIANT_FILES)}{ext}"
        path = write_nifti(
            folder / name, stored, version=version, endian=endian, slope=slope, inter=inter,
            extension=b"an extension before vox_offset " * 3 if extension else None,
        )
        _VARIANT_FILES[key] = (path, oracle(path))
    return _VARIANT_FILES[key]


@settings(max_examples=80, deadline=None, suppress_health_check=FIXTURE_OK)
@given(
    version=st.sampled_from([1, 2]),
    endian=st.sampled_from(["<", ">"]),
    dtype=st.sampled_from(["float32", "float64", "int16", "uint8"]),
    ext=st.sampled_from([".nii", ".nii.gz"]),
    scaled=st.booleans(),  # int16 files are always scaled (see tests/fixtures/nifti.py)
    extension=st.booleans(),
    nan=st.booleans(),  # float files only
    masked=st.booleans(),
    chunk=st.integers(1, 9),
    trials=st.lists(st.integers(-SHAPE[3], SHAPE[3] - 1), min_size=1, max_size=10),
    spatial=st.lists(st.integers(0, 10_000), min_size=3, max_size=3),
    picks=st.lists(st.integers(0, 10_000), min_size=1, max_size=15),
)
def test_every_variant_and_selection_matches_nibabel(
    variant_folder, version, endian, dtype, ext, scaled, extension, nan, masked, chunk, trials,
    spatial, picks,
):
    path, expected = variant_file(variant_folder, version, endian, dtype, ext, scaled, extension,
                                  nan)
    mask = brain_mask()
    ds = neurocube.open_nifti(path, mask=mask if masked else None, chunks=chunk)
    if masked:
        n_vox = int(mask.sum())
        voxels = [p % n_vox for p in picks]
        got = ds.data.isel(trial=trials, voxel=voxels).values
        want = expected[mask].T[np.ix_(trials, voxels)]
    else:  # an orthogonal selection on every axis: a few positions along x, y and z
        xs, ys, zs = ([s0 % n for s0 in (spatial[a], *picks[:2])] for a, n in enumerate(SHAPE[:3]))
        got = ds.data.isel(x=xs, y=ys, z=zs, trial=trials).values
        want = expected[np.ix_(xs, ys, zs, [t % SHAPE[3] for t in trials])]
    np.testing.assert_allclose(got, want, rtol=1e-6, equal_nan=True)
    assert np.isnan(got).sum() == np.isnan(want).sum()

def nonempty_slices(n):
    # xarray's own indexer decomposition fails on empty reversed slices (e.g. 0:0:-1) before
    # a backend is asked anything, so those are left out here.
    return st.slices(n).filter(lambda s: len(range(*s.indices(n))) > 0)


@settings(max_examples=25, deadline=None, suppress_health_check=FIXTURE_OK)
@given(
    x=nonempty_slices(5), y=nonempty_slices(6), z=nonempty_slices(7),
    t=st.lists(st.integers(-9, 8), min_size=1, max_size=6),
)
def test_backend_lazy_indexing_matches_numpy(masked_gz_file, x, y, z, t):
    path, _ = masked_gz_file
    expected = oracle(path)
    ds = xr.open_dataset(path, engine="neurocube")
    got = ds.data.isel(x=x, y=y, z=z, trial=t).values
    np.testing.assert_allclose(got, expected[x, y, z][..., t])


def test_xarray_engine(nifti_factory):
    path = nifti_factory("engine.nii.gz")
    ds = xr.open_dataset(path, engine="neurocube", chunks={})
    assert ds.data.chunks is not None
    np.testing.assert_allclose(ds.data.values, oracle(path))
    masked = xr.open_dataset(path, engine="neurocube", mask=brain_mask())
    np.testing.assert_allclose(masked.data.values, oracle(path)[brain_mask()].T)


def test_engine_sniffs_magic_not_suffix(nifti_factory, tmp_path):
    path = nifti_factory("odd.nii.gz")
    expected = oracle(path)
    renamed = tmp_path / "betas.dat"
    os.rename(path, renamed)
    from neurocube.backend import NeurocubeBackendEntrypoint

    assert NeurocubeBackendEntrypoint().guess_can_open(str(renamed))
    np.testing.assert_allclose(
        xr.open_dataset(renamed, engine="neurocube").data.values, expected
    )


def test_dask_names_are_deterministic(nifti_factory):
    path = nifti_factory("det.nii.gz")
    a = neurocube.open_nifti(path, mask=brain_mask())
    b = neurocube.open_nifti(path, mask=brain_mask())
    c = neurocube.open_nifti(path, mask=~brain_mask())
    assert a.data.data.name == b.data.data.name != c.data.data.name
    assert dask.base.tokenize(a) == dask.base.tokenize(b)


def test_specs_pickle_without_handles(nifti_factory):
    import pickle

    path = nifti_factory("p.nii.gz")
    ds = neurocube.open_nifti(path, mask=brain_mask())
    ds.compute()  # handles are open in this process now
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_allclose(clone.data.values, ds.data.values)


# --- bad input ---------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"nope\.nii\.gz: no such file"):
        neurocube.open_nifti(tmp_path / "nope.nii.gz")
    with pytest.raises(FileNotFoundError):  # the builtin still catches it
        neurocube.open_nifti(tmp_path / "nope.nii.gz")


def test_not_nifti_by_magic_bytes(tmp_path):
    text = tmp_path / "notes.nii"
    text.write_text("x" * 400)
    with pytest.raises(FormatError, match=r"notes\.nii: a file that is not NIfTI.*sizeof_hdr 348"):
        neurocube.open_nifti(text)
    gz = tmp_path / "table.nii.gz"
    with gzip.open(gz, "wb") as fh:
        fh.write(b"a,b,c\n" * 200)
    with pytest.raises(FormatError, match=r"table\.nii\.gz: a gzip file whose content is not"):
        neurocube.open_nifti(gz)
    with pytest.raises(ValueError):
        neurocube.open_nifti(gz)


def test_corrupt_gzip(tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00" + b"\xff" * 600)
    with pytest.raises(FormatError, match=r"bad\.nii\.gz: starts like a gzip file but cannot"):
        neurocube.open_nifti(bad)


def test_truncated_nii_names_the_missing_volume(nifti_factory):
    path = nifti_factory("trunc.nii", shape=(5, 6, 7, 9))
    info = nifti_header.read_header(path)
    with open(path, "r+b") as fh:
        fh.truncate(info.vox_offset + 4 * info.volume_bytes + 10)
    with pytest.raises(TruncatedFileError, match=r"trunc\.nii.*volume 4 onwards cannot be read"):
        neurocube.open_nifti(path)


def test_truncated_gz_names_the_volumes_on_read(nifti_factory, tmp_path):
    path = nifti_factory("trunc.nii.gz", shape=(5, 6, 7, 40), compresslevel=0)
    data = path.read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(data[: len(data) // 2])
    ds = neurocube.open_nifti(cut, chunks=10)  # the header is intact: opening works
    info = nifti_header.read_header(path)
    first_bad = (  # the uncompressed bytes that survive the cut end inside this volume
        _intact_bytes(cut) - info.vox_offset
    ) // info.volume_bytes
    assert 10 <= first_bad < 30
    # Even the volumes before the cut are refused: the CRC32 that would vouch for them is gone.
    for trials in (slice(0, 10), slice(20, 30)):
        with pytest.raises(TruncatedFileError,
                           match=rf"cut\.nii\.gz.*truncated.*Volume {first_bad} "):
            ds.data.isel(trial=trials).compute()



def test_nii_truncated_after_opening_names_the_first_missing_volume(nifti_factory):
    path = nifti_factory("late.nii", shape=(5, 6, 7, 20))
    ds = neurocube.open_nifti(path, chunks=5)  # intact when opened
    info = nifti_header.read_header(path)
    with open(path, "r+b") as fh:
        fh.truncate(info.vox_offset + 7 * info.volume_bytes + 3)
    # the file changed after it was opened (issue 11, item 2): no values, even from the intact part
    for trials in (slice(0, 5), slice(5, 10)):
        with pytest.raises(SourceChangedError, match=r"late\.nii: changed since it was opened "
                           r"\(then 17152 bytes.*now 6235 bytes"):
            ds.data.isel(trial=trials).compute()
    # opening it again fails at once, naming the same volume
    with pytest.raises(TruncatedFileError, match=r"late\.nii.*volume 7 onwards cannot be read"):
        neurocube.open_nifti(path, mask=brain_mask())

def test_nii_rewritten_with_size_and_mtime_restored_is_refused(nifti_factory):
    path = nifti_factory("same.nii", shape=(5, 6, 7, 20))
    ds = neurocube.open_nifti(path, chunks=5)
    before = os.stat(path)
    data = bytearray(open(path, "rb").read())
    info = nifti_header.read_header(path)
    data[info.vox_offset : info.vox_offset + 8] = b"\x7f" * 8  # other values, same size
    with open(path, "r+b") as fh:
        fh.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # mtime set back
    assert os.stat(path).st_size == before.st_size
    # only the status-change time tells: no values of the new content under the old opening
    with pytest.raises(SourceChangedError, match=r"same\.nii: changed since it was opened "
                       r"\(then ctime"):
        ds.data.isel(trial=slice(0, 5)).compute()
    with pytest.raises(SourceChangedError, match="ctime"):
        neurocube.load(ds.data, progress=False)
    reopened = neurocube.open_nifti(path, chunks=5)  # opened again: the new content, as it is
    assert np.isfinite(reopened.data.isel(trial=slice(5, 10)).values).all()


def _intact_bytes(gz_path):
    import zlib

    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    return len(inflater.decompress(gz_path.read_bytes()))


def test_mask_of_another_shape(nifti_factory):
    path = nifti_factory("g.nii.gz")
    with pytest.raises(GridMismatchError, match=r"shape \(4, 6, 7\) fits neither the data grid"):
        neurocube.open_nifti(path, mask=np.ones((4, 6, 7), bool))
    with pytest.raises(GridMismatchError, match=r"flat form \(210,\)"):
        neurocube.open_nifti(path, mask=np.ones(209, bool))


def test_mask_file_on_another_grid(nifti_factory, tmp_path):
    path = nifti_factory("g.nii.gz")
    small = tmp_path / "small_mask.nii.gz"
    nib.Nifti1Image(np.ones((4, 6, 7), np.uint8), AFFINE).to_filename(str(small))
    with pytest.raises(GridMismatchError, match=r"small_mask\.nii\.gz: grid \(4, 6, 7\) does not"):
        neurocube.open_nifti(path, mask=small)
    shifted = tmp_path / "shifted_mask.nii.gz"
    moved = AFFINE.copy()
    moved[0, 3] += 2.0
    nib.Nifti1Image(np.ones((5, 6, 7), np.uint8), moved).to_filename(str(shifted))
    with pytest.raises(GridMismatchError, match=r"shifted_mask\.nii\.gz: its affine differs"):
        neurocube.open_nifti(path, mask=shifted)


def test_bad_chunks_argument(nifti_factory):
    path = nifti_factory("ch.nii.gz")
    with pytest.raises(ValueError, match="along 'trial' only"):
        neurocube.open_nifti(path, chunks={"x": 2})
    with pytest.raises(ValueError, match="expected 'auto', a number of volumes"):
        neurocube.open_nifti(path, chunks="lots")


def test_errors_share_one_base():
    for cls in (DataNotFoundError, FormatError, GridMismatchError, TruncatedFileError):
        assert issubclass(cls, NeurocubeError)


def test_import_is_light():
    import subprocess
    import sys

    code = (
        "import sys, neurocube; "
        "heavy = [m for m in ('dask.distributed', 'distributed', 'zarr', 'h5py', 'pyarrow', "
        "'nibabel', 'xarray', 'dask') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _tiny(path):
    import nibabel as nib

    data = np.arange(4 * 5 * 6 * 3, dtype=np.float32).reshape(4, 5, 6, 3)
    nib.Nifti1Image(data, np.eye(4)).to_filename(path)
    return data


@pytest.mark.parametrize("bad", [5, 1.5, [1], b"x", object()])
def test_an_index_of_the_wrong_type_is_an_argument_error(tmp_path, bad):
    from neurocube.errors import ArgumentError

    for name in ("a.nii", "a.nii.gz"):
        path = tmp_path / name
        _tiny(path)
        with pytest.raises(ArgumentError, match=rf"{name}: index=.* index accepts 'auto'"):
            neurocube.open_nifti(path, index=bad)


def test_an_index_file_for_a_plain_nii_is_an_argument_error(tmp_path):
    from neurocube.errors import ArgumentError

    path = tmp_path / "a.nii"
    data = _tiny(path)
    with pytest.raises(ArgumentError, match=r"a\.nii: index='.*idx' names a gzip index, but "
                       r"this is an uncompressed \.nii.*index accepts"):
        neurocube.open_nifti(path, index=str(tmp_path / "a.idx"))
    for fine in ("auto", True, False, None, "never"):  # name no index: nothing to refuse
        ds = neurocube.open_nifti(path, index=fine)
        np.testing.assert_array_equal(ds.data.values, data)
