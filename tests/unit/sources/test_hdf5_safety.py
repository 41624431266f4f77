"""Bad HDF5 input on purpose: each case is a neurocube error naming the file, never a raw one."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

import neurocube
from neurocube.errors import (
    CorruptDataError,
    FormatError,
    NeurocubeError,
    ReaderNotFoundError,
    SourceChangedError,
)


def _traces(path, n=4, length=100, **kwargs):
    with h5py.File(path, "w") as h5:
        group = h5.create_group("rec1.xdf")
        group.attrs["channel_labels"] = "['EDC_L']"
        traces = group.create_group("traces")
        for i in range(n):
            dset = traces.create_dataset(str(i), data=np.arange(length, dtype="f8") + i, **kwargs)
            dset.attrs["onset"] = str(i)


def _damage_chunk(path, dataset, index, how):
    with h5py.File(path, "r") as h5:
        info = h5[dataset].id.get_chunk_info(index)
    raw = bytearray(open(path, "rb").read())
    how(raw, info.byte_offset, info.size)
    with open(path, "wb") as fh:
        fh.write(bytes(raw))


def test_open_traces_of_none_or_a_number(tmp_path):
    for bad in (None, 123):
        with pytest.raises(ReaderNotFoundError, match=repr(bad)):
            neurocube.open_traces(bad)


def test_a_declared_shape_the_file_cannot_hold_is_refused_at_open(tmp_path):
    path = tmp_path / "bomb.hdf5"
    with h5py.File(path, "w") as h5:
        traces = h5.create_group("r").create_group("traces")
        traces.create_dataset("0", shape=(10**10,), dtype="f8", chunks=(1000,))
    assert path.stat().st_size < 16_000
    with pytest.raises(FormatError, match=r"bomb\.hdf5: dataset '/r/traces/0' declares shape"):
        neurocube.open_traces(path, use_cache=False)


def test_a_small_unwritten_dataset_still_opens_with_fill_values(tmp_path):
    path = tmp_path / "fill.hdf5"
    with h5py.File(path, "w") as h5:
        h5.create_group("r").create_group("traces").create_dataset("0", shape=(1000,), dtype="f8")
    ds = neurocube.open_traces(path, use_cache=False)
    np.testing.assert_array_equal(ds.data.values[0], np.zeros(1000))  # as h5py reads it


def test_an_attribute_of_5000_digits_stays_text(tmp_path):
    path = tmp_path / "digits.hdf5"
    _traces(path)
    with h5py.File(path, "a") as h5:
        h5["rec1.xdf/traces/0"].attrs["onset"] = "9" * 5000
    ds = neurocube.open_traces(path, use_cache=False)
    assert ds.onset.values[0] == "9" * 5000


@pytest.mark.parametrize("kind", ["dangling", "external"])
def test_links_among_traces_are_refused_and_never_followed_out(tmp_path, kind):
    other = tmp_path / "other.hdf5"
    _traces(other)
    path = tmp_path / "links.hdf5"
    _traces(path)
    with h5py.File(path, "a") as h5:
        if kind == "dangling":
            h5["rec1.xdf/traces/9"] = h5py.SoftLink("/nowhere")
        else:
            h5["rec1.xdf/traces/9"] = h5py.ExternalLink(str(other), "/rec1.xdf/traces/0")
    message = "leads nowhere" if kind == "dangling" else "external link"
    pattern = r"links\.hdf5: member '/rec1\.xdf/traces/9' .*" + message
    with pytest.raises(FormatError, match=pattern):
        neurocube.open_traces(path, use_cache=False)


def test_a_soft_link_inside_the_file_is_followed(tmp_path):
    path = tmp_path / "soft.hdf5"
    _traces(path, n=2)
    with h5py.File(path, "a") as h5:
        h5["rec1.xdf/traces/2"] = h5py.SoftLink("/rec1.xdf/traces/0")
    ds = neurocube.open_traces(path, use_cache=False)
    np.testing.assert_array_equal(ds.data.values[2], np.arange(100.0))


def test_a_fletcher32_chunk_that_fails_its_checksum_is_a_corrupt_data_error(tmp_path):
    path = tmp_path / "f32.hdf5"
    _traces(path, length=20_000, fletcher32=True, chunks=(5_000,))

    def flip(raw, at, size):
        raw[at + 100] ^= 0x01

    _damage_chunk(path, "rec1.xdf/traces/1", 1, flip)
    ds = neurocube.open_traces(path, use_cache=False)
    pattern = r"f32\.hdf5: dataset '/rec1\.xdf/traces/1'.*fletcher32"
    with pytest.raises(CorruptDataError, match=pattern):
        ds.data.values  # noqa: B018
    np.testing.assert_array_equal(ds.data[0].values, np.arange(20_000.0))  # others still read


def test_a_damaged_small_deflate_chunk_names_file_and_dataset(tmp_path):
    path = tmp_path / "gz.hdf5"
    _traces(path, length=2_000, compression="gzip", chunks=(500,))

    def zero(raw, at, size):
        raw[at + 5 : at + 30] = bytes(25)

    _damage_chunk(path, "rec1.xdf/traces/1", 1, zero)
    ds = neurocube.open_traces(path, use_cache=False)
    with pytest.raises(CorruptDataError, match=r"gz\.hdf5: dataset '/rec1\.xdf/traces/1'"):
        ds.data.values  # noqa: B018


def test_a_large_deflate_chunk_on_the_direct_path_is_checked_too(tmp_path):
    path = tmp_path / "direct.h5"
    values = np.random.default_rng(0).standard_normal((256, 512))
    with h5py.File(path, "w") as h5:
        h5.create_dataset("eigenvectors", data=values, chunks=(64, 512), compression="gzip")
        h5.create_dataset("eigenvalues", data=np.arange(512.0))
        h5.attrs["spectralbrain_version"] = "1"

    def zero(raw, at, size):
        raw[at + size // 2 : at + size // 2 + 64] = bytes(64)

    _damage_chunk(path, "eigenvectors", 2, zero)
    ds = neurocube.open_spectral(path)
    with pytest.raises(CorruptDataError, match=r"direct\.h5: chunk .* of '/eigenvectors'"):
        ds.eigenvectors.values  # noqa: B018
    np.testing.assert_array_equal(ds.eigenvectors[:64].values, values[:64])


@pytest.mark.parametrize("offset", [0, 9, 12, 30, 40])
def test_a_flipped_superblock_byte_is_a_neurocube_error(tmp_path, offset):
    path = tmp_path / "sb.hdf5"
    _traces(path)
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))
    try:
        neurocube.open_traces(path, use_cache=False).data.values  # noqa: B018
    except NeurocubeError as exc:
        assert str(path) in str(exc)


def test_a_file_replaced_after_opening_is_refused_at_read_time(tmp_path):
    path = tmp_path / "moving.hdf5"
    _traces(path)
    ds = neurocube.open_traces(path, use_cache=False)
    from neurocube.sources.hdf5_handles import release_file

    release_file(path)  # as in a fresh worker process: no handle on the old version
    _traces(tmp_path / "new.hdf5", length=100)
    os.replace(tmp_path / "new.hdf5", path)
    with pytest.raises(SourceChangedError, match=r"moving\.hdf5: changed since it was opened"):
        ds.data.values  # noqa: B018


def test_a_handle_on_the_old_version_keeps_reading_that_version(tmp_path):
    # a writer replaces by rename: the old inode is unchanged, so a pooled handle on it reads
    # exactly what was opened (never a mix); a read needing a new handle is refused
    path = tmp_path / "renamed.hdf5"
    _traces(path)
    ds = neurocube.open_traces(path, use_cache=False)
    first = ds.data.values
    with h5py.File(tmp_path / "new.hdf5", "w") as h5:
        h5["x"] = np.zeros(3)
    os.replace(tmp_path / "new.hdf5", path)
    np.testing.assert_array_equal(ds.data.values, first)


def test_swmr_reads_retry_a_bad_checksum_a_bounded_number_of_times(tmp_path):
    """HDF5's SWMR default (100 tries, sleeps doubling from 1 ns) hangs a reader of a damaged
    file for ever; neurocube's SWMR opens ask for a bounded number of tries."""
    import ctypes

    from neurocube.sources import hdf5_handles as h5handles

    path = tmp_path / "latest.h5"
    with h5py.File(path, "w", libver="latest") as h5:
        h5["a"] = np.arange(5)
    lib = h5handles._hdf5_library()
    if lib is None:
        pytest.skip("the HDF5 C library is not reachable here (not Linux)")
    with h5handles.open_hdf5(path) as h5:
        assert h5.swmr_mode
        attempts = ctypes.c_uint(0)
        fapl = h5.id.get_access_plist()
        status = lib.H5Pget_metadata_read_attempts(ctypes.c_int64(fapl.id), ctypes.byref(attempts))
        assert status >= 0
        assert attempts.value == h5handles.SWMR_METADATA_READ_ATTEMPTS
        np.testing.assert_array_equal(h5["a"][()], np.arange(5))


# -- damaged global heap collections (variable-length string attributes) ----------------------


def _string_attr_traces(path, n=3):
    """A trace cache whose attributes are variable-length strings (as offspect writes them)."""
    with h5py.File(path, "w") as h5:
        group = h5.create_group("rec1.xdf")
        group.attrs["channel_labels"] = "['EDC_L']"
        traces = group.create_group("traces")
        for i in range(n):
            dset = traces.create_dataset(str(i), data=np.arange(50, dtype="f8") + i)
            dset.attrs["onset"] = f"{i}.5"
            dset.attrs["comment"] = "fine"


def _first_collection(raw):
    at = raw.index(b"GCOL")
    return at, int.from_bytes(raw[at + 8 : at + 16], "little")


def _free_space_object(raw):
    """Offset of the free-space object (index 0) of the first global heap collection."""
    at, size = _first_collection(raw)
    pos = at + 16
    while True:
        index = int.from_bytes(raw[pos : pos + 2], "little")
        length = int.from_bytes(raw[pos + 8 : pos + 16], "little")
        if index == 0:
            return pos
        pos += 16 + (length + 7) // 8 * 8
        assert pos < at + size


def _zero_free_space(path):
    """The damage the slow fuzz run found (a block swap in merged.hdf5 left it so): the free-space
    object of a global heap collection declares 0 bytes, and HDF5 walks it forever."""
    raw = bytearray(path.read_bytes())
    pos = _free_space_object(raw)
    raw[pos + 8 : pos + 16] = bytes(8)
    path.write_bytes(bytes(raw))


_OPEN_ONE = """
import sys
import neurocube
from neurocube.errors import FormatError
try:
    neurocube.open_traces(sys.argv[1], use_cache=False)
except FormatError as exc:
    print("FormatError:", exc)
"""


def test_a_global_heap_free_space_of_size_0_is_refused_not_looped_on(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "heap.hdf5"
    _string_attr_traces(path)
    _zero_free_space(path)
    # in a child process: before the fix HDF5 loops forever inside attr.read, uninterruptibly
    done = subprocess.run(
        [sys.executable, "-c", _OPEN_ONE, str(path)], capture_output=True, text=True,
        timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "FormatError:" in done.stdout
    assert str(path) in done.stdout
    assert "global heap collection" in done.stdout and "declares 0 bytes" in done.stdout


def test_get_attrs_refuses_a_damaged_global_heap_too(tmp_path):
    from neurocube import traces

    path = tmp_path / "heap.hdf5"
    _string_attr_traces(path)
    _zero_free_space(path)
    with pytest.raises(FormatError, match=r"heap\.hdf5: expected global heap collections"):
        traces.get_attrs(path, 0)


def test_a_global_heap_collection_larger_than_the_file_is_refused(tmp_path):
    path = tmp_path / "heap.hdf5"
    _string_attr_traces(path)
    raw = bytearray(path.read_bytes())
    at, _ = _first_collection(raw)
    raw[at + 8 : at + 16] = (1 << 40).to_bytes(8, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match=r"heap\.hdf5: .*declaring 1099511627776 bytes"):
        neurocube.open_traces(path, use_cache=False)


def test_undamaged_string_attributes_read_through_the_heap_check(tmp_path):
    from neurocube import traces

    path = tmp_path / "fine.hdf5"
    _string_attr_traces(path)
    ds = neurocube.open_traces(path, use_cache=False)
    with h5py.File(path, "r") as h5:
        np.testing.assert_array_equal(ds.data.values[1], h5["rec1.xdf/traces/1"][()])
    assert traces.get_attrs(path, 2)["comment"] == "fine"
    assert traces.get_attrs(path, 2)["onset"] == 2.5


def test_a_string_attribute_of_unknown_encoding_is_a_format_error(tmp_path):
    """Found by the slow fuzz run (a bit flip in cf0.hdf5): h5py raises TypeError for the type."""
    from neurocube import traces

    path = tmp_path / "charset.hdf5"
    _string_attr_traces(path)
    raw = bytearray(path.read_bytes())
    # a variable-length UTF-8 string type: class 9 (version 1), string, charset 1, 16 bytes
    utf8_vlen = b"\x19\x01\x01\x00\x10\x00\x00\x00"
    at = raw.index(utf8_vlen, raw.index(b"onset"))
    raw[at + 2] = 0x03  # charset 3: not one HDF5 defines
    path.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match=r"charset\.hdf5: expected readable attributes on "):
        neurocube.open_traces(path, use_cache=False)
    with pytest.raises(FormatError, match=r"charset\.hdf5: expected readable attributes on "):
        traces.get_attrs(path, 0)


def test_open_spectral_refuses_a_damaged_global_heap_too(tmp_path):
    """The slow fuzz run found the same endless loop in open_spectral's root attributes."""
    from tests.unit.datasets.test_spectral import write_cache

    path = tmp_path / "spectral.h5"
    write_cache(path, subject="sub-01", hemi="lh")
    _zero_free_space(path)
    with pytest.raises(FormatError, match=r"spectral\.h5: expected global heap collections"):
        neurocube.open_spectral(path)


def test_gc_pauses_are_counted_and_restore_the_collector():
    """Remote h5py reads keep the collector off (hdf5_handles.gc_paused); it comes back after."""
    import gc
    import threading

    from neurocube.sources.hdf5_handles import gc_paused

    assert gc.isenabled()
    inside = threading.Event()
    leave = threading.Event()

    def other():
        with gc_paused():
            inside.set()
            leave.wait(10)

    worker = threading.Thread(target=other)
    with gc_paused():
        worker.start()
        inside.wait(10)
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert not gc.isenabled()  # the other thread still reads
    leave.set()
    worker.join(10)
    assert gc.isenabled()
    gc.disable()  # a user who keeps it off keeps it off
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
