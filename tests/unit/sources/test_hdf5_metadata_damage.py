"""Damaged HDF5 metadata that h5py reads as other values, or crashes on, is a FormatError.

Each case is one class of damage an exhaustive byte scan of the fuzz samples found (every byte
zeroed, one bit flipped per byte): the file opens, HDF5 reports nothing, and the values differ
from the undamaged file's. The files here are written by h5py with the default (unchecksummed)
object headers, and one message byte is changed where the scan found it.
"""

from __future__ import annotations

import re
import struct
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

import neurocube
from neurocube.errors import FormatError

#: The body of a little-endian IEEE float64 datatype message as HDF5 writes it (class 1,
#: version 1, bit fields, size 8, then offset, precision, exponent/mantissa, bias 1023).
F64_TYPE = bytes.fromhex("11203f00 08000000 00004000 340b0034 ff030000")


def _traces(path, n=2, length=200):
    with h5py.File(path, "w") as h5:
        group = h5.create_group("rec1.xdf")
        group.attrs["channel_labels"] = "['EDC_L']"
        traces = group.create_group("traces")
        for i in range(n):
            dset = traces.create_dataset(str(i), data=np.arange(length, dtype="f8") + i)
            dset.attrs["onset"] = str(i)


def _spectral(path, n_vertices=12, n_modes=5):
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as h5:
        h5.create_dataset("eigenvalues", data=np.sort(rng.random(n_modes)), compression="gzip")
        h5.create_dataset("eigenvectors", data=rng.random((n_vertices, n_modes)),
                          compression="gzip")  # fmt: skip
        h5.attrs["surface_area"] = 12.5
        h5.attrs["spectralbrain_version"] = "0.1.0"


def _edit(path, edit):
    raw = bytearray(path.read_bytes())
    edit(raw)
    path.write_bytes(bytes(raw))


def _only(raw, pattern):
    at = raw.find(pattern)
    assert at >= 0 and raw.find(pattern, at + 1) < 0, "the pattern must occur exactly once"
    return at


@pytest.mark.parametrize(
    ("byte", "value", "found"),
    [
        (16, 0xFE, r"bias 1022"),  # exponent bias 1023 -> 1022: every value doubles
        (1, 0x00, r"not IEEE 754"),  # mantissa normalisation "implied" -> "none"
    ],
)
def test_a_float_datatype_that_is_not_ieee_is_refused(tmp_path, byte, value, found):
    path = tmp_path / "bias.hdf5"
    _traces(path, n=1)

    def edit(raw):
        raw[_only(raw, F64_TYPE) + byte] = value

    _edit(path, edit)
    with pytest.raises(FormatError, match=rf"bias\.hdf5: dataset '/rec1.xdf/traces/0' .*{found}"):
        neurocube.open_traces(path, use_cache=False)


def test_a_spectral_float_dataset_read_as_integers_is_refused(tmp_path):
    path = tmp_path / "kind.h5"
    _spectral(path)

    def edit(raw):
        raw[raw.find(F64_TYPE)] = 0x10  # class 1 (float) -> 0 (integer): h5py reads uint64

    _edit(path, edit)
    with pytest.raises(FormatError, match=r"kind\.h5: expected 'eigenvalues' to hold floats, "
                                          r"found uint64"):  # fmt: skip
        neurocube.open_spectral(path)


def test_a_float_attribute_that_is_not_ieee_is_refused_not_a_raw_value_error(tmp_path):
    path = tmp_path / "attr.h5"
    _spectral(path)

    def edit(raw):
        at = raw.index(F64_TYPE, raw.index(b"surface_area"))  # the attribute's datatype
        raw[at + 18] = 0x04  # bias 1023 -> 263167: h5py raised "Insufficient precision"

    _edit(path, edit)
    with pytest.raises(FormatError, match=r"attr\.h5: expected readable attributes on '/'; "
                                          r"attribute 'surface_area' is stored as a 8-byte "
                                          r"float that is not IEEE 754"):  # fmt: skip
        neurocube.open_spectral(path)


def test_a_string_attribute_whose_type_says_sequence_is_refused_without_crashing(tmp_path):
    """h5py reading it as a variable-length sequence crashed the process (segfault)."""
    path = tmp_path / "vlen.hdf5"
    _traces(path, n=1)
    utf8_vlen = b"\x19\x01\x01\x00\x10\x00\x00\x00"  # class 9 version 1, string, UTF-8, 16 B

    def edit(raw):
        raw[raw.index(utf8_vlen, raw.index(b"onset")) + 1] = 0x03  # type 3: not a string

    _edit(path, edit)
    script = textwrap.dedent(f"""
        import neurocube
        from neurocube.errors import FormatError
        try:
            neurocube.open_traces({str(path)!r}, use_cache=False)
        except FormatError as exc:
            print("FormatError:", exc)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "vlen.hdf5: expected readable attributes on '/rec1.xdf/traces/0'" in done.stdout
    assert "variable-length sequence" in done.stdout


def test_a_lost_filter_message_is_refused_not_read_as_raw_floats(tmp_path):
    path = tmp_path / "nofilter.h5"
    _spectral(path)

    def edit(raw):
        deflate = raw.index(b"deflate\x00")
        header = raw.rindex(b"\x0b\x00", 0, deflate)  # the filter pipeline message's type
        raw[header] = 0x0A  # type 11 -> 10: HDF5 skips it and reads the deflated bytes raw

    _edit(path, edit)
    with pytest.raises(FormatError, match=r"nofilter\.h5: the chunk index of dataset "
                                          r"'/eigenvalues' lists an unfiltered chunk at \(0,\) "
                                          r"of \d+ bytes, expected 40"):  # fmt: skip
        neurocube.open_spectral(path)


def test_a_shrunk_chunk_shape_is_refused_not_filled_with_zeros(tmp_path):
    path = tmp_path / "chunks.hdf5"
    with h5py.File(path, "w") as h5:
        traces = h5.create_group("rec1.xdf").create_group("traces")
        traces.create_dataset("0", data=np.arange(400.0), chunks=(200,), compression="gzip")

    def edit(raw):
        # layout message v3, chunked, rank 1 + 1, the index address, then chunk dims 200, 8 B
        found = list(re.finditer(rb"\x03\x02\x02.{8}\xc8\x00\x00\x00\x08\x00\x00\x00",
                                 bytes(raw), re.DOTALL))  # fmt: skip
        assert len(found) == 1
        raw[found[0].start() + 11] = 100  # (200,) -> (100,): HDF5 would fill half with zeros

    _edit(path, edit)
    with pytest.raises(FormatError, match=r"chunks\.hdf5: a chunk of dataset "
                                          r"'/rec1.xdf/traces/0' inflates to 1600 bytes, "
                                          r"expected 800"):  # fmt: skip
        neurocube.open_traces(path, use_cache=False)


def _move_data(path, dataset, to):
    with h5py.File(path, "r") as h5:
        offset = h5[dataset].id.get_offset()

    def edit(raw):
        at = _only(raw, b"\x03\x01" + struct.pack("<Q", offset))  # layout v3, contiguous
        raw[at + 2 : at + 10] = struct.pack("<Q", to)

    _edit(path, edit)


def test_a_data_address_moved_onto_metadata_is_refused(tmp_path):
    path = tmp_path / "moved.hdf5"
    _traces(path)
    with h5py.File(path, "r") as h5:
        root = h5py.h5o.get_info(h5.id).addr
    _move_data(path, "rec1.xdf/traces/1", root)  # e.g. a zeroed address byte
    with pytest.raises(FormatError, match=r"moved\.hdf5: the data of dataset "
                                          r"'/rec1.xdf/traces/1' .* holds the object header "
                                          r"of '/'"):  # fmt: skip
        neurocube.open_traces(path, use_cache=False)


def test_a_data_address_moved_onto_another_dataset_is_refused(tmp_path):
    path = tmp_path / "twice.hdf5"
    _traces(path)
    with h5py.File(path, "r") as h5:
        first = h5["rec1.xdf/traces/0"].id.get_offset()
    _move_data(path, "rec1.xdf/traces/1", first + 8)
    with pytest.raises(FormatError, match=r"twice\.hdf5: the data of dataset "
                                          r"'/rec1.xdf/traces/1' .* overlaps the data of "
                                          r"'/rec1.xdf/traces/0'"):  # fmt: skip
        neurocube.open_traces(path, use_cache=False)


def test_undamaged_files_pass_the_checks(tmp_path):
    traces, spectral = tmp_path / "ok.hdf5", tmp_path / "ok.h5"
    _traces(traces)
    _spectral(spectral)
    np.testing.assert_array_equal(
        neurocube.open_traces(traces, use_cache=False).data.values,
        np.arange(200.0)[None, :] + np.arange(2.0)[:, None],
    )
    ds = neurocube.open_spectral(spectral)
    with h5py.File(spectral, "r") as h5:
        np.testing.assert_array_equal(ds.eigenvectors.values, h5["eigenvectors"][()])


def _tree_entries(raw, after):
    """Offset of the 'entries used' field of the first v1 B-tree node at or after ``after``."""
    return raw.index(b"TREE", after) + 6  # signature, node type, level, then entries used


def test_an_emptied_chunk_index_in_a_spectral_cache_is_refused_not_read_as_zeros(tmp_path):
    path = tmp_path / "nochunks.h5"
    _spectral(path)
    with h5py.File(path, "r") as h5:
        first_chunk = h5["eigenvalues"].id.get_chunk_info(0).byte_offset

    def edit(raw):
        at = _tree_entries(raw, raw.rindex(b"TREE", 0, first_chunk))  # eigenvalues' index
        assert raw[at : at + 2] == b"\x01\x00"
        raw[at] = 0  # one chunk -> none: HDF5 reads the fill value (zeros)

    _edit(path, edit)
    expected = r"nochunks\.h5: dataset '/eigenvalues' of shape \(5,\) has 0 stored chunks"
    with pytest.raises(FormatError, match=expected):
        neurocube.open_spectral(path)


def test_a_shape_zeroed_under_stored_chunks_is_refused(tmp_path):
    path = tmp_path / "shape.h5"
    _spectral(path)

    def edit(raw):
        # eigenvectors' dataspace (version 1, rank 2, max dims): sizes 12 and 5 follow
        at = _only(raw, struct.pack("<QQQQ", 12, 5, 12, 5))
        raw[at] = 0  # 12 vertices -> 0: h5py reads an empty array

    _edit(path, edit)
    with pytest.raises(FormatError, match=r"shape\.h5: the chunk index of dataset "
                                          r"'/eigenvectors' lists a chunk at \(0, 0\), outside "
                                          r"shape \(0, 5\)"):  # fmt: skip
        neurocube.open_spectral(path)


def test_a_spectral_cache_whose_group_index_lost_its_entries_is_refused(tmp_path):
    path = tmp_path / "emptied.h5"
    _spectral(path)

    def edit(raw):
        at = _tree_entries(raw, 0)  # the root group's B-tree comes first
        assert raw[at : at + 2] == b"\x01\x00"
        raw[at] = 0  # the root group now lists no members (its version stamp is an attribute)

    _edit(path, edit)
    with pytest.raises(FormatError, match=r"emptied\.h5: expected a spectral cache with at "
                                          r"least one array; found no members"):  # fmt: skip
        neurocube.open_spectral(path)


def test_a_trace_name_repeated_by_a_damaged_name_heap_is_refused(tmp_path):
    """Name "0" read as "1": HDF5 returned trace 1's values for both."""
    path = tmp_path / "names.hdf5"
    _traces(path)

    def edit(raw):
        heap = raw.index(b"HEAP", raw.index(b"traces"))  # the traces group's name heap
        at = raw.index(b"0\x00", heap + 32)  # its first name after the heap header
        raw[at] = ord("1")

    _edit(path, edit)
    with pytest.raises(FormatError, match=r"names\.hdf5: group '/rec1.xdf/traces' lists the "
                                          r"member name\(s\) \['1'\] more than once"):  # fmt: skip
        neurocube.open_traces(path, use_cache=False)


def test_a_trace_whose_float_type_reads_as_integers_is_refused(tmp_path):
    path = tmp_path / "kinds.hdf5"
    _traces(path)

    def edit(raw):
        raw[raw.index(F64_TYPE)] = 0x10  # trace 0: class float -> integer (uint64)

    _edit(path, edit)
    expected = r"kinds\.hdf5: expected the traces of one cache to share a kind of number; found "
    with pytest.raises(FormatError, match=expected + r"float64, uint64"):
        neurocube.open_traces(path, use_cache=False)
