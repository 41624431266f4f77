"""Fuzz: damaged NPZ embedding artifacts (the coco-pipe samples and generated archives).

Each example damages a copy of one archive (its JSON sidecar beside it) and reads every array
through neurocube's NPZ layer and through ``open_embeddings``. Every member read is checked
against the ZIP CRC-32, stored or deflated, so the values are numpy's oracle or a neurocube
error, never other values.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import neurocube
from neurocube.errors import FormatError
from neurocube.sources.npz import read_member, read_members_into, read_npz_directory
from tests.fuzz.damage import assert_oracle_or_neurocube_error, damages, fuzz_settings

DATA = Path(__file__).parents[1] / "data"
SAMPLES = sorted(DATA.rglob("*.npz"))
_COUNTER = itertools.count()


def _oracle(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def _read(path: Path) -> dict[str, np.ndarray]:
    members = read_npz_directory(path)
    out = {}
    for name, member in members.items():
        if member.shape and member.numpy_dtype.kind in "fiu":  # both read paths
            target = np.empty(member.shape, member.numpy_dtype.newbyteorder("="))
            out[name] = read_members_into([member], target)
        else:
            out[name] = read_member(member)
    return out


def _generated(folder: Path) -> list[Path]:
    rng = np.random.default_rng(5)
    arrays = {
        "window_embeddings": rng.standard_normal((6, 32)).astype("float32"),
        "recording_embedding": rng.standard_normal(32).astype("float32"),
        "window_index": np.arange(6),
        "fortran": np.asfortranarray(rng.standard_normal((5, 7))),
        "big_endian": np.arange(50, dtype=">i4"),
        "labels": np.array(["a", "bb", "ccc"]),
    }
    stored, deflated = folder / "stored.npz", folder / "deflated.npz"
    np.savez(stored, **arrays)
    np.savez_compressed(deflated, **arrays)
    return [stored, deflated]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("npz-fuzz")
    entries = []
    for path in [*SAMPLES, *_generated(folder)]:
        try:
            entries.append((path, _oracle(path)))
        except ValueError:  # object arrays (mosaic labels): refused, tested below
            continue
    return folder, entries


@pytest.mark.parametrize("path", [p for p in SAMPLES if "labels" in p.parts])
def test_object_array_label_npz_is_refused_naming_it(path):
    from neurocube.errors import UnsafeDataError

    with pytest.raises(UnsafeDataError, match=path.name):
        read_npz_directory(path)


def _run(files, damage, which):
    folder, entries = files
    source, oracle = entries[which % len(entries)]
    target = folder / f"damaged_{next(_COUNTER)}.npz"
    shutil.copyfile(source, target)
    damage.apply_to(target)
    try:
        assert_oracle_or_neurocube_error(
            lambda: _read(target), oracle, checksummed=True, what=f"{source.name} with {damage}"
        )
    finally:
        target.unlink()


@fuzz_settings()
@given(damage=damages(), which=st.integers(0, 20))
def test_damaged_npz_gives_numpy_values_or_a_neurocube_error(files, damage, which):
    _run(files, damage, which)


@pytest.mark.slow
@fuzz_settings(slow=True)
@given(damage=damages(), which=st.integers(0, 20))
def test_damaged_npz_many(files, damage, which):
    _run(files, damage, which)


@fuzz_settings()
@given(damage=damages(), artifact=st.integers(0, 3))
def test_damaged_artifact_or_sidecar_in_open_embeddings(tmp_path_factory, damage, artifact):
    # a whole derivative: one NPZ or its sidecar damaged; the rows are numpy's or an error
    root = tmp_path_factory.mktemp("tree")
    sample = DATA / "coco_pipe" / "eeg_foundation_embeddings"
    shutil.copytree(sample, root, dirs_exist_ok=True)
    npzs = sorted(root.rglob("*_embedding.npz"))
    expected = neurocube.open_embeddings(sorted(sample.rglob("*_embedding.npz"))).embedding.values
    oracle = np.stack([np.load(p)["recording_embedding"] for p in sorted(
        sample.rglob("*_embedding.npz"))]).astype(expected.dtype)
    np.testing.assert_array_equal(expected, oracle)
    victim = npzs[artifact % len(npzs)]
    if artifact >= len(npzs) // 2:
        victim = victim.with_suffix(".json")
    damage.apply_to(victim)
    # a damaged sidecar may still parse with other metadata (it has no checksum): compare rows
    assert_oracle_or_neurocube_error(
        lambda: neurocube.open_embeddings(npzs).embedding.values, oracle,
        checksummed=victim.suffix == ".npz", what=f"{victim.name} with {damage}",
    )


def test_a_member_renamed_in_the_central_directory_is_refused(tmp_path):
    """Found by the slow fuzz run: one flipped bit in a central-directory file name (no CRC
    covers names) renamed a member, and the array came back under another name."""
    source = next(p for p in SAMPLES if p.name.endswith("Mean_embedding.npz"))
    data = bytearray(source.read_bytes())
    central = data.find(b"PK\x01\x02")
    name_at = data.find(b"window_embeddings.npy", central)
    assert central > 0 and name_at > central
    data[name_at + 16] ^= 1  # 's' -> 'r'
    damaged = tmp_path / source.name
    damaged.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="local header"):
        read_npz_directory(damaged)


@pytest.mark.parametrize(("find", "replace"), [(b"(3, 19", b"(3, \x90\x90"), (b"}", b"(")])
def test_a_damaged_npy_header_is_a_format_error(find, replace):
    """Found by the slow fuzz run: numpy's header parser tokenizes the header, and damaged bytes
    raised the tokenizer's SyntaxError / TokenError instead of a neurocube error."""
    import io

    from neurocube.sources.npz import _parse_npy_header

    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.zeros((3, 19, 5, 4), "<f4"))
    header = buffer.getvalue()[:128].replace(find, replace, 1)
    with pytest.raises(FormatError, match=r"malformed \.npy header"):
        _parse_npy_header(header, "x.npz", "a")


@pytest.mark.parametrize("field_at", [10, 8], ids=["total-count", "count-on-disk"])
def test_a_zeroed_member_count_in_the_end_record_is_refused(tmp_path, field_at):
    """Found by the slow fuzz run: zeroing the end record's member count (and the low byte of
    the directory size) gave an archive with no arrays instead of an error."""
    source = next(p for p in SAMPLES if p.name == "sub-01_arrays.npz")
    data = bytearray(source.read_bytes())
    end = data.rfind(b"PK\x05\x06")
    data[end + field_at : end + field_at + 2] = b"\0\0"
    if field_at == 10:
        data[end + 12] = 0  # the directory size's low byte: count and size both 0 for tiny archives
    damaged = tmp_path / source.name
    damaged.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="end record is inconsistent"):
        read_npz_directory(damaged)


def test_an_archive_with_a_zip64_end_record_reads_as_numpy_reads_it(tmp_path, monkeypatch):
    """Python's zipfile adds a ZIP64 end record (before the classic one, whose values still
    fit) past 65535 members or 4 GiB; the end-record check must look for it first. A member
    limit of 1 makes zipfile write one for a two-array archive."""
    import zipfile

    arrays = {"a": np.arange(5.0), "b": np.arange(3)}
    path = tmp_path / "zip64.npz"
    monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 1)
    np.savez(path, **arrays)
    monkeypatch.undo()
    assert b"PK\x06\x06" in path.read_bytes()  # the ZIP64 end record is there
    members = read_npz_directory(path)
    for name, values in arrays.items():
        np.testing.assert_array_equal(read_member(members[name]), values)
