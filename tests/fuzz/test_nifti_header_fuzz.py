"""Fuzz a plain ``.nii``: damage its header and its voxel data at hypothesis-chosen places.

A plain ``.nii`` carries no checksum, so the property depends on where the damage fell:

- **voxel data**: the values may differ from the oracle (nothing can verify them), but reading
  never raises anything other than a neurocube error (a truncation is a ``TruncatedFileError``);
- **header**: the read gives the oracle's values, or a neurocube error naming the file, or —
  when the damaged header is still a valid NIfTI header that means something else (a
  ``scl_slope`` bit flipped into a finite number, a smaller last dimension) — exactly the values
  nibabel reads eagerly from the same damaged file. Never values of a header nibabel refuses,
  never values that disagree with nibabel's, never a raw error.

The oracle is known by construction (:func:`tests.fixtures.nifti.analytic_values`) and checked
against nibabel on the undamaged file.
"""

from __future__ import annotations

import itertools
import struct
import warnings

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import neurocube
from neurocube.errors import FormatError, NeurocubeError
from tests.fixtures.nifti import analytic_values, stored_for, write_nifti
from tests.fuzz.damage import Damage, assert_oracle_or_neurocube_error, damages, fuzz_settings

SHAPE = (5, 6, 7, 4)
HEADER_END = 352  # NIfTI-1 header (348 bytes) + extension flag; voxel data starts here
_names = itertools.count()


@pytest.fixture(scope="module", params=["float32", "int16"])
def original(request, tmp_path_factory):
    """``(bytes, oracle values)`` of a plain .nii: float32, or int16 with scl_slope/scl_inter."""
    values = analytic_values(SHAPE)
    stored, slope, inter = stored_for(request.param, values)
    path = write_nifti(
        tmp_path_factory.mktemp("orig") / "orig.nii", stored, slope=slope, inter=inter
    )
    oracle = np.asarray(nib.load(str(path)).get_fdata())
    if request.param == "float32":
        np.testing.assert_array_equal(oracle, values)
    return path.read_bytes(), oracle


def _damage_region(data: bytes, damage: Damage, lo: int, hi: int) -> bytes:
    """Apply ``damage`` inside ``data[lo:hi]`` (a truncation cuts the file there)."""
    if damage.kind == "truncate":
        at = lo + min(int(damage.where * (hi - lo)), hi - lo - 1)
        return data[:at]
    return data[:lo] + damage.apply(data[lo:hi]) + data[hi:]


def _read(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = neurocube.open_nifti(path, index=False)
        return ds["data"].values


def _nibabel_reads(path) -> np.ndarray | None:
    """What nibabel reads eagerly from ``path`` (None if it refuses the file)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asarray(nib.load(str(path)).get_fdata())
    except Exception:
        return None


def _assert_nibabel_values(got: np.ndarray, reference: np.ndarray) -> None:
    """``got`` equals nibabel's ``reference`` up to the rounding of neurocube's output dtype.

    neurocube scales int16 voxels in float32, nibabel in float64: each value may be a few ulp
    of the *largest* scaled value apart (``stored * slope + inter`` near zero cancels).
    """
    finite = np.abs(reference[np.isfinite(reference)])
    scale = float(finite.max()) if finite.size else 0.0
    atol = 4 * float(np.finfo(got.dtype).eps) * scale if got.dtype.kind == "f" else 0.0
    np.testing.assert_allclose(
        got, reference, rtol=1e-6, atol=atol, err_msg="header damage: values differ from nibabel's"
    )


def _check(tmp_path, data: bytes, oracle: np.ndarray, *, header: bool) -> str:
    path = tmp_path / f"damaged{next(_names)}.nii"
    path.write_bytes(data)
    try:
        got = _read(path)
    except NeurocubeError as exc:
        assert path.name in str(exc), f"the error does not name the file: {exc}"
        return "error"
    if got.shape == oracle.shape and np.array_equal(got, oracle, equal_nan=True):
        return "same"
    if header:
        reference = _nibabel_reads(path)
        assert reference is not None, (
            f"header damage returned values from a file nibabel refuses ({data[:HEADER_END]!r})"
        )
        if reference.ndim < 3:  # neurocube gives every image a 3-D grid: (n,) is (n, 1, 1)
            reference = reference.reshape(reference.shape + (1,) * (3 - reference.ndim))
        _assert_nibabel_values(got, reference)
    return "different"


@fuzz_settings()
@given(damage=damages(max_size=64))
def test_header_damage_gives_oracle_or_neurocube_error(original, tmp_path, damage):
    data, oracle = original
    _check(tmp_path, _damage_region(data, damage, 0, HEADER_END), oracle, header=True)


@fuzz_settings()
@given(damage=damages())
def test_data_damage_gives_values_or_neurocube_error(original, tmp_path, damage):
    data, oracle = original
    damaged = _damage_region(data, damage, HEADER_END, len(data))
    path = tmp_path / f"damaged{next(_names)}.nii"
    path.write_bytes(damaged)
    # no checksum in a plain .nii: other values are allowed, a raw error is not
    outcome = assert_oracle_or_neurocube_error(
        lambda: _read(path), oracle, checksummed=False, what=str(damage)
    )
    if damage.kind == "truncate":
        assert outcome == "error"


@pytest.mark.slow
@fuzz_settings(slow=True)
@given(damage=damages(max_size=64), header=st.booleans())
def test_many_damages_slow(original, tmp_path, damage, header):
    data, oracle = original
    if header:
        _check(tmp_path, _damage_region(data, damage, 0, HEADER_END), oracle, header=True)
    else:
        _check(tmp_path, _damage_region(data, damage, HEADER_END, len(data)), oracle,
               header=False)


@pytest.mark.parametrize(
    "field, offset, fmt, value",
    [
        ("datatype", 70, "<h", 9999),
        ("dim[0]", 40, "<h", 9),
        ("dim[0]", 40, "<h", -1),
        ("dim[0]", 40, "<h", 0),
        ("dim[1]", 42, "<h", -5),
        ("dim[2]", 44, "<h", 0),
        ("vox_offset", 108, "<f", float("nan")),
        ("vox_offset", 108, "<f", float("inf")),
        ("vox_offset", 108, "<f", -352.0),
        ("vox_offset", 108, "<f", 0.0),
        ("scl_inter", 116, "<f", float("nan")),
        ("scl_inter", 116, "<f", float("inf")),
    ],
)
def test_each_bad_header_field_is_a_format_error_naming_the_file(
    original, tmp_path, field, offset, fmt, value
):
    data, _ = original
    buf = bytearray(data)
    if field == "scl_inter":
        struct.pack_into("<f", buf, 112, 1.0)  # a valid scl_slope: scl_inter then applies
    struct.pack_into(fmt, buf, offset, value)
    path = tmp_path / "bad.nii"
    path.write_bytes(bytes(buf))
    with pytest.raises(FormatError, match=rf"bad\.nii: .*{field.split('[')[0]}"):
        neurocube.open_nifti(path)


def test_a_qform_quaternion_beyond_unit_length_is_a_format_error(original, tmp_path):
    """Found by the slow bucket fuzz: two swapped header blocks left quatern_b/c/d with
    b^2 + c^2 + d^2 > 1, and nibabel's affine raised a raw ValueError ("w2 should be
    positive") from open_nifti."""
    data, _ = original
    buf = bytearray(data)
    struct.pack_into("<hh", buf, 252, 1, 0)  # qform_code 1, sform_code 0: the qform is used
    struct.pack_into("<fff", buf, 256, 0.9, 0.9, 0.9)  # quatern_b, c, d
    path = tmp_path / "quaternion.nii"
    path.write_bytes(bytes(buf))
    with pytest.raises(ValueError):
        nib.load(str(path)).header.get_best_affine()  # nibabel refuses it too
    with pytest.raises(FormatError, match=r"quaternion\.nii: the header's orientation cannot"):
        neurocube.open_nifti(path)


def test_nan_scl_slope_means_no_scaling_as_in_nibabel(tmp_path):
    values = analytic_values(SHAPE).astype(np.float32)
    path = write_nifti(tmp_path / "s.nii", values)
    buf = bytearray(path.read_bytes())
    struct.pack_into("<ff", buf, 112, float("nan"), 7.0)  # slope NaN: scl_inter is ignored
    path.write_bytes(bytes(buf))
    got = neurocube.open_nifti(path)["data"].values
    np.testing.assert_array_equal(got, np.asarray(nib.load(str(path)).get_fdata()))
    np.testing.assert_array_equal(got, values)


@pytest.mark.parametrize("dtype", ["int16", "uint8", "int32"])
def test_scaling_beyond_the_output_dtype_is_a_format_error(tmp_path, dtype):
    """Found by a byte-by-byte header scan: one flipped exponent bit turned an int16 file's
    scl_slope 0.5 into 1.7e38; scaled in float32 the voxels became inf (nibabel: finite)."""
    stored = (np.arange(np.prod(SHAPE)) % 200).reshape(SHAPE).astype(dtype)
    path = write_nifti(tmp_path / "scaled.nii", stored, slope=0.5, inter=-3.0)
    buf = bytearray(path.read_bytes())
    struct.pack_into("<f", buf, 112, 1.7e38)
    path.write_bytes(bytes(buf))
    if dtype == "int32":  # scaled into float64, which holds 1.7e38 * 2**31: nibabel's values
        got = neurocube.open_nifti(path)["data"].values
        np.testing.assert_allclose(got, np.asarray(nib.load(str(path)).get_fdata()), rtol=1e-12)
        assert np.isfinite(got).all()
        return
    with pytest.raises(FormatError, match=r"scaled\.nii: scl_slope .* expected values that fit"):
        neurocube.open_nifti(path)


def test_a_slope_one_ulp_off_gives_nibabels_values_up_to_float32_rounding(original, tmp_path):
    """Found by a byte-by-byte header scan: flipping scl_slope's lowest bit (0.5 -> 0.50000006)
    is a valid header meaning other values; near zero, float32 scaling is 1e-7 from nibabel's
    float64 (relative error 30 %), which the comparison must allow, and nothing more."""
    data, oracle = original
    buf = bytearray(data)
    buf[112] ^= 1
    assert _check(tmp_path, bytes(buf), oracle, header=True) in ("different", "same")
