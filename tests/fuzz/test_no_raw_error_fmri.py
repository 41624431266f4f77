"""Issue 11's raw errors for NIfTI headers, the betas bucket and argument checks, one by one.

Each case used to leak a ``KeyError``, ``ValueError``, ``EmptyDataError``, ``RuntimeError``,
``TypeError`` or ``MemoryError`` (or read garbage); each must now be a ``neurocube.errors``
class whose message names the file (for a wrong argument: the argument and the value given).
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import neurocube
from neurocube.errors import NeurocubeError, SourceChangedError
from neurocube.synthetic.bucket import make_bucket
from tests.fixtures.nifti import analytic_values, write_nifti

SHAPE = (5, 6, 7, 4)


def _nii(tmp_path: Path, name: str, *patches: tuple[int, str, object], gz: bool = False) -> Path:
    """A plain float32 .nii (or its .nii.gz) with header fields overwritten by ``patches``."""
    path = write_nifti(tmp_path / "clean.nii", analytic_values(SHAPE).astype(np.float32))
    buf = bytearray(path.read_bytes())
    for offset, fmt, value in patches:
        values = value if isinstance(value, tuple) else (value,)
        struct.pack_into(fmt, buf, offset, *values)
    out = tmp_path / name
    out.write_bytes(gzip.compress(bytes(buf)) if gz else bytes(buf))
    return out


HEADER_CASES = {
    "datatype 9999": [(70, "<h", 9999)],
    "negative dim": [(42, "<h", -5)],
    "zero dim": [(48, "<h", 0)],
    "dim[0] out of range": [(40, "<h", 12)],
    "NaN vox_offset": [(108, "<f", float("nan"))],
    "vox_offset inside the header": [(108, "<f", 100.0)],
    "NaN scl_inter": [(112, "<ff", (2.0, float("nan")))],
    "inf scl_inter": [(112, "<ff", (2.0, float("inf")))],
    "vox_offset beyond the file": [(108, "<f", 1e9)],
    "32767^4 voxels": [(40, "<5h", (4, 32767, 32767, 32767, 32767))],
}


@pytest.mark.parametrize("gz", [False, True], ids=["nii", "nii.gz"])
@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_bad_header_is_a_neurocube_error_at_open(tmp_path, case, gz):
    name = "bad.nii.gz" if gz else "bad.nii"
    path = _nii(tmp_path, name, *HEADER_CASES[case], gz=gz)
    with pytest.raises(NeurocubeError, match=r"bad\.nii(\.gz)?: ") as info:
        ds = neurocube.open_nifti(path)
        _ = ds["data"].values  # the read, had the open passed
    assert str(path) in str(info.value)


def test_memory_bomb_gz_is_refused_before_any_allocation(tmp_path):
    import tracemalloc

    path = _nii(tmp_path, "bomb.nii.gz", (40, "<5h", (4, 32767, 32767, 32767, 32767)), gz=True)
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:800]))
    assert path.stat().st_size < 1024
    tracemalloc.start()
    try:
        with pytest.raises(neurocube.errors.FormatError, match=r"bomb\.nii\.gz: the header "
                           r"declares \d+ bytes .* inflates to at most \d+ \(deflate's maximum "
                           r"ratio is 1032:1\)"):
            neurocube.open_nifti(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20  # the header and a few buffers, nothing in proportion to the shape


@pytest.mark.parametrize("reopen", [False, True])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_file_replaced_after_open_is_source_changed(tmp_path, suffix, reopen):
    path = write_nifti(tmp_path / f"v{suffix}", analytic_values(SHAPE).astype(np.float32))
    ds = neurocube.open_nifti(path, mask=np.ones(SHAPE[:3], bool), index=False)
    # another grid and another vox_offset (an extension), written over the same name
    write_nifti(path, analytic_values((6, 5, 7, 4)).astype(np.float32), extension=b"x" * 40)
    with pytest.raises(SourceChangedError, match=rf"v{suffix.replace('.', '[.]')}: changed since"):
        _ = neurocube.load(ds) if reopen else ds["data"].values
    ds2 = neurocube.open_nifti(path, index=False)  # opened again: the new file is read
    np.testing.assert_array_equal(ds2["data"].values, analytic_values((6, 5, 7, 4)))


@pytest.mark.parametrize("arg", [123, None, 1.5, b"betas.nii", ["a.nii"]])
def test_open_nifti_of_a_non_path(arg):
    with pytest.raises(neurocube.errors.ArgumentError, match=r"expected the path or URL") as info:
        neurocube.open_nifti(arg)
    assert repr(arg) in str(info.value)
    assert isinstance(info.value, TypeError)


@pytest.mark.parametrize("arg", [123, None, 1.5])
def test_open_subject_of_a_non_path(arg):
    with pytest.raises(neurocube.errors.ArgumentError, match=repr(arg).replace(".", r"\.")):
        neurocube.open_subject(arg, "sub-01")


def test_symlink_loop_names_the_link(tmp_path):
    (tmp_path / "a.nii").symlink_to(tmp_path / "b.nii")
    (tmp_path / "b.nii").symlink_to(tmp_path / "a.nii")
    for open_ in (neurocube.open_nifti, lambda p: neurocube.open_subject(p, "sub-01")):
        with pytest.raises(neurocube.errors.DataNotFoundError, match=r"a\.nii: a symlink loop"):
            open_(tmp_path / "a.nii")


def test_nul_byte_in_a_path():
    with pytest.raises(neurocube.errors.ArgumentError, match=r"'a\\x00b\.nii': not a usable path"):
        neurocube.open_nifti("a\0b.nii")


# --- the betas bucket ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def clean_bucket(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    make_bucket(
        root, subjects=1, sessions=2, trials=6, grid=(4, 5, 3), compress=False,
        embedding_models=(), full_resolution=False, surface_rois=False, freesurfer=False,
    )
    return root


@pytest.fixture
def bucket(clean_bucket, tmp_path):
    root = tmp_path / "bucket"
    shutil.copytree(clean_bucket, root, symlinks=True)
    return root


def _tsv(root: Path) -> Path:
    return Path(neurocube.open_subject(root, "sub-01").trials_path("ses-01"))


TSV_CASES = {
    "empty": lambda text: "",
    "blank lines only": lambda text: "\n\n\n",
    "header only (fewer rows than volumes)": lambda text: text.splitlines()[0] + "\n",
    "no label column": lambda text: text.replace("label", "lbl", 1),
    "text in the run column": lambda text: text.replace("\t1\t", "\tone\t", 1),
    "another session in the session column": lambda text: text.replace("ses-01", "ses-07", 1),
    "ragged rows": lambda text: text + "x\ty\tz\tw\tv\tu\n",
    "not UTF-8": lambda text: text.replace("shared", "sh\udce9red", 1),
}


@pytest.mark.parametrize("case", sorted(TSV_CASES))
def test_damaged_trial_table_names_the_file(bucket, case):
    tsv = _tsv(bucket)
    text = tsv.read_text()
    tsv.write_bytes(TSV_CASES[case](text).encode("utf-8", errors="surrogateescape"))
    sub = neurocube.open_subject(bucket, "sub-01")
    with pytest.raises(neurocube.errors.FormatError) as info:
        sub.betas("ses-01")
    assert tsv.name in str(info.value)


def test_noise_ceiling_on_another_grid_names_the_file(bucket):
    sub = neurocube.open_subject(bucket, "sub-01")
    nc = Path(sub._nc_session_path("ses-01"))
    nib.save(nib.Nifti1Image(np.ones((3, 3, 3), np.float32), np.eye(4)), nc)
    sub = neurocube.open_subject(bucket, "sub-01")
    for read in (lambda: sub.betas("ses-01", nc_threshold=10),
                 lambda: sub.noise_ceiling("ses-01")):
        with pytest.raises(neurocube.errors.GridMismatchError) as info:
            read()
        message = str(info.value)
        assert str(nc) in message and "(3, 3, 3)" in message and "brain mask" in message


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda sub: sub.betas(123), "session=123"),
        (lambda sub: sub.betas("ses-01", roi=5), "roi=5"),
        (lambda sub: sub.noise_ceiling(desc=5), "desc=5"),
        (lambda sub: sub.noise_ceiling(desc=[5]), "desc=[5]"),
        (lambda sub: sub.roi_mask(None), "roi=None"),
        (lambda sub: sub.roi_masks(5), "queries=5"),
        (lambda sub: sub.roi_data(5), "query=5"),
        (lambda sub: sub.stimulus_embeddings(5), "model=5"),
        (lambda sub: sub.betas("ses-01", chunks=0), "chunks=0"),
        (lambda sub: neurocube.open_subjects(sub.root, 3.5), "subjects=3.5"),
        (lambda sub: neurocube.open_subject(sub.root, "sub-01", catalog=5), "catalog=int"),
        (lambda sub: neurocube.open_subject(sub.root, "sub-01", storage_options=5),
         "storage_options"),
        (lambda sub: neurocube.roi_means(5, "face"), "subjects=5"),
        (lambda sub: neurocube.roi_means([5], "face"), "found 5"),
    ],
)
def test_wrong_argument_types_are_argument_errors(clean_bucket, call, argument):
    sub = neurocube.open_subject(clean_bucket, "sub-01")
    with pytest.raises(neurocube.errors.ArgumentError) as info:
        call(sub)
    assert argument in str(info.value)


def test_trial_table_replaced_by_a_folder_or_loop_names_it(bucket):
    tsv = _tsv(bucket)
    tsv.unlink()
    os.symlink(tsv.name, tsv)  # a link to itself
    sub = neurocube.open_subject(bucket, "sub-01")
    with pytest.raises(NeurocubeError) as info:
        sub.betas("ses-01")
    assert tsv.name in str(info.value)
