"""NPZ member access from the ZIP directory and .npy headers, against numpy.load."""

from __future__ import annotations

import os
import pickle
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neurocube.errors import (
    CorruptDataError,
    FormatError,
    SourceChangedError,
    TruncatedFileError,
    UnsafeDataError,
)
from neurocube.sources.npz import (
    is_zip_file,
    open_member_memmap,
    read_member,
    read_members_into,
    read_npz_directory,
)
from neurocube.storage import IO_STATS

ARRAYS = {
    "f32": np.arange(24, dtype=np.float32).reshape(4, 6) / 7,
    "f16": (np.arange(60, dtype=np.float16).reshape(3, 4, 5) / 8),
    "big_endian": np.arange(10, dtype=">f8") * 1.5,
    "fortran": np.asfortranarray(np.arange(12, dtype=np.int32).reshape(3, 4)),
    "int64": np.array([-5, 0, 2**40], dtype=np.int64),
    "scalar": np.array(3.25),
    "empty": np.zeros((0, 4), dtype=np.float32),
    "text": np.array(["ab", "cde"]),
}


@pytest.fixture(params=["compressed", "stored"])
def archive(request, tmp_path):
    path = tmp_path / f"{request.param}.npz"
    (np.savez_compressed if request.param == "compressed" else np.savez)(path, **ARRAYS)
    return path


def test_every_member_matches_numpy_load(archive):
    members = read_npz_directory(archive)
    assert list(members) == list(ARRAYS)
    with np.load(archive, allow_pickle=False) as oracle:
        for name, member in members.items():
            expected = oracle[name]
            assert member.shape == expected.shape
            assert np.dtype(member.dtype) == expected.dtype
            got = read_member(member)
            assert got.dtype == expected.dtype.newbyteorder("=")
            np.testing.assert_array_equal(got, expected)


def test_compression_and_offsets_agree_with_zipfile(archive):
    members = read_npz_directory(archive)
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            member = members[info.filename[:-4]]
            assert member.compression == info.compress_type
            assert member.compressed_size == info.compress_size
            assert member.uncompressed_size == info.file_size
            assert member.crc32 == info.CRC


def test_directory_reads_headers_not_data(tmp_path):
    path = tmp_path / "big.npz"
    data = np.random.default_rng(0).standard_normal((512, 1024)).astype(np.float32)  # 2 MiB
    np.savez_compressed(path, x=data, y=np.arange(3))
    IO_STATS.reset()
    members = read_npz_directory(path)
    opens, nbytes = IO_STATS.snapshot()
    assert opens == 1
    assert nbytes < 8_192 < path.stat().st_size  # the tail + one small probe per member
    IO_STATS.reset()
    np.testing.assert_array_equal(read_member(members["x"]), data)
    assert IO_STATS.snapshot()[1] >= members["x"].compressed_size


def test_stored_member_is_memory_mapped(tmp_path):
    path = tmp_path / "stored.npz"
    data = np.arange(40, dtype=np.float64).reshape(8, 5)
    np.savez(path, x=data)
    member = read_npz_directory(path)["x"]
    mapped = open_member_memmap(member)
    assert isinstance(mapped, np.memmap)
    assert not mapped.flags.writeable
    np.testing.assert_array_equal(mapped, data)
    compressed = tmp_path / "deflated.npz"
    np.savez_compressed(compressed, x=data)
    with pytest.raises(FormatError, match=r"deflated\.npz: array 'x' is deflated .*read_member"):
        open_member_memmap(read_npz_directory(compressed)["x"])


def test_members_of_many_files_fill_one_chunk(tmp_path):
    members, expected = [], []
    for i in range(3):
        arr = np.full((i + 1, 4), i, dtype=np.float32)
        np.savez_compressed(tmp_path / f"{i}.npz", a=arr)
        members.append(read_npz_directory(tmp_path / f"{i}.npz")["a"])
        expected.append(arr)
    out = np.empty((6, 4), np.float32)
    np.testing.assert_array_equal(read_members_into(members, out), np.concatenate(expected))


def test_specs_pickle(archive):
    members = read_npz_directory(archive)
    again = pickle.loads(pickle.dumps(members))
    assert again == members
    np.testing.assert_array_equal(read_member(again["f32"]), ARRAYS["f32"])


def test_object_member_refused_without_unpickling(tmp_path, monkeypatch):
    path = tmp_path / "objects.npz"
    np.savez(path, names=np.array(["a", {"b": 1}], dtype=object), ok=np.arange(2))

    def no_unpickling(*args, **kwargs):
        raise AssertionError("pickle was called")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    with pytest.raises(UnsafeDataError, match=r"objects\.npz: array 'names' has an object dtype"):
        read_npz_directory(path)


def test_truncated_archive(tmp_path):
    path = tmp_path / "cut.npz"
    np.savez_compressed(path, x=np.arange(1000.0))
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(TruncatedFileError, match=r"cut\.npz: not a complete NPZ"):
        read_npz_directory(path)


def test_not_a_zip(tmp_path):
    path = tmp_path / "plain.npz"
    np.save(tmp_path / "plain.npy", np.arange(100))
    path.write_bytes((tmp_path / "plain.npy").read_bytes())
    assert not is_zip_file(path)
    with pytest.raises(FormatError, match=r"plain\.npz: not an NPZ file \(expected ZIP magic"):
        read_npz_directory(path)


def test_corrupt_deflate_stream_detected_on_read(tmp_path):
    path = tmp_path / "flipped.npz"
    np.savez_compressed(path, x=np.random.default_rng(1).standard_normal(20_000))
    member = read_npz_directory(path)["x"]
    raw = bytearray(path.read_bytes())
    middle = member.data_offset + member.compressed_size // 2
    raw[middle : middle + 64] = bytes(64)
    path.write_bytes(bytes(raw))
    member = read_npz_directory(path)["x"]  # the damaged file, opened after the damage
    with pytest.raises(
        CorruptDataError, match=r"flipped\.npz: array 'x' (does not inflate|fails its ZIP CRC)"
    ):
        read_member(member)


def test_member_not_npy(tmp_path):
    path = tmp_path / "foreign.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("notes.txt", "hello world, this is not an array")
    with pytest.raises(
        FormatError, match=r"foreign\.npz: member 'notes\.txt' is not a \.npy array"
    ):
        read_npz_directory(path)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=4),
    dtype=st.sampled_from(["<f4", ">f4", "<f2", "<i8", ">i2", "|u1", "<c8", "?"]),
    compressed=st.booleans(),
    fortran=st.booleans(),
)
def test_property_matches_numpy(tmp_path_factory, shape, dtype, compressed, fortran):
    rng = np.random.default_rng(len(shape))
    data = (rng.standard_normal(shape) * 50).astype(dtype)
    if fortran:
        data = np.asfortranarray(data)
    path = tmp_path_factory.mktemp("prop") / "a.npz"
    (np.savez_compressed if compressed else np.savez)(path, a=data)
    got = read_member(read_npz_directory(path)["a"])
    with np.load(path) as oracle:
        np.testing.assert_array_equal(got, oracle["a"])


@pytest.mark.parametrize("compressed", [True, False])
def test_long_npy_header_and_archive_comment(tmp_path, compressed):
    # a structured dtype with many fields has a .npy header longer than one probe,
    # and a long archive comment pushes the end record beyond the first tail guess
    dtype = np.dtype([(f"field_with_a_long_name_{i:03d}", "<f4") for i in range(80)])
    data = np.zeros(3, dtype=dtype)
    data["field_with_a_long_name_042"] = [1.0, 2.0, 3.0]
    path = tmp_path / "long.npz"
    (np.savez_compressed if compressed else np.savez)(path, s=data, x=np.arange(4))
    with zipfile.ZipFile(path, "a") as zf:
        zf.comment = b"c" * 5000
    members = read_npz_directory(path)
    assert members["s"].npy_header_size > 1024
    got = read_member(members["s"])
    np.testing.assert_array_equal(got["field_with_a_long_name_042"], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(read_member(members["x"]), np.arange(4))


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("fortran", [False, True])
def test_a_flipped_byte_in_any_member_is_a_crc_error(tmp_path, compressed, fortran):
    values = np.arange(2_000, dtype="<f8").reshape(40, 50)
    values = np.asfortranarray(values) if fortran else values
    path = tmp_path / "one.npz"
    (np.savez_compressed if compressed else np.savez)(path, x=values)
    member = read_npz_directory(path)["x"]
    raw = bytearray(path.read_bytes())
    spot = member.data_offset + member.compressed_size // 2
    if not compressed:
        spot = member.data_offset + member.npy_header_size + 777
    raw[spot] ^= 0x10
    path.write_bytes(bytes(raw))
    member = read_npz_directory(path)["x"]
    with pytest.raises(CorruptDataError, match=r"one\.npz: array 'x'"):
        read_member(member)
    out = np.empty(member.shape)
    with pytest.raises(CorruptDataError, match=r"one\.npz"):
        read_members_into([member], out)
    with pytest.raises(Exception) as numpy_error:  # the oracle refuses it too
        np.load(path)["x"]
    assert not isinstance(numpy_error.value, AssertionError)


def test_stored_member_read_straight_into_the_output_equals_numpy(tmp_path):
    rng = np.random.default_rng(3)
    rows = [rng.standard_normal((3, 7)).astype("<f4") for _ in range(4)]
    paths = []
    for i, row in enumerate(rows):
        paths.append(tmp_path / f"r{i}.npz")
        np.savez(paths[-1], x=row)
    members = [read_npz_directory(p)["x"] for p in paths]
    out = np.empty((12, 7), "<f4")
    read_members_into(members, out)
    np.testing.assert_array_equal(out, np.concatenate([np.load(p)["x"] for p in paths]))
    stacked = np.empty((4, 3, 7), "<f4")
    read_members_into(members, stacked, stack=True)
    np.testing.assert_array_equal(stacked, np.stack([np.load(p)["x"] for p in paths]))


def test_an_archive_rewritten_after_opening_is_refused(tmp_path):
    path = tmp_path / "moving.npz"
    np.savez(path, x=np.zeros(10))
    member = read_npz_directory(path)["x"]
    np.savez(path, x=np.ones(12))
    os.utime(path, ns=(member.mtime_ns + 10**9, member.mtime_ns + 10**9))
    with pytest.raises(SourceChangedError, match=r"moving\.npz: changed since it was opened"):
        read_member(member)
