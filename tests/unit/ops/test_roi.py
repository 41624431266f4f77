"""ROI grammar and the voxel selection order of FORMATS.md §1, against hand-made volumes."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neurocube.errors import FormatError, GridMismatchError, SelectionError
from neurocube.ops.roi import (
    coerce_selection_mask,
    nc_threshold_mask,
    nonzero_mask,
    read_small_volume,
    resolve_roi_query,
    roi_union,
    select_voxels,
)

CATS = {"face": ["FFA1", "FFA2", "OFA"], "place": ["PPA", "OPA"], "dup": ["OFA"]}


def test_grammar_name_category_all_and_lists():
    assert resolve_roi_query("FFA2", CATS) == [("face", "FFA2")]
    assert resolve_roi_query("place", CATS) == [("place", "PPA"), ("place", "OPA")]
    assert len(resolve_roi_query("all", CATS)) == 6
    # a ROI name in two categories names both files; duplicates removed, order kept
    assert resolve_roi_query(["OFA", "face"], CATS) == [
        ("face", "OFA"), ("dup", "OFA"), ("face", "FFA1"), ("face", "FFA2"),
    ]


def test_grammar_name_wins_over_category():
    cats = {"V1": ["V1d", "V1v"], "early": ["V1"]}
    assert resolve_roi_query("V1", cats) == [("early", "V1")]


def test_grammar_errors():
    with pytest.raises(SelectionError, match=r"'FFA' names no ROI and no category in sub-01.*"
                                             r"Did you mean \[.*'FFA1'"):
        resolve_roi_query("FFA", CATS, where="sub-01")
    with pytest.raises(SelectionError, match="empty ROI query"):
        resolve_roi_query([], CATS)
    with pytest.raises(SelectionError, match="must be strings"):
        resolve_roi_query(["FFA1", 3], CATS)  # type: ignore[list-item]


def test_nonzero_mask_rule():
    values = np.array([np.nan, 0.0, -0.5, 2.0, np.inf])
    assert nonzero_mask(values).tolist() == [False, False, True, True, True]
    assert nonzero_mask(np.array([0, 3], dtype=np.uint8)).tolist() == [False, True]


def test_nc_threshold_nan_dropped():
    nc = np.array([np.nan, 9.99, 10.0, 80.0])
    assert nc_threshold_mask(nc, 10).tolist() == [False, False, True, True]


def test_selection_order():
    brain = np.zeros((3, 3, 2), bool)
    brain[:2] = True
    roi_a = np.zeros_like(brain)
    roi_a[0] = True
    roi_b = np.zeros((3, 3, 2))
    roi_b[2] = 1.0  # outside the brain
    roi_b[1, 0, 0] = -1.0  # negative counts as inside
    union = roi_union([roi_a, roi_b], brain)
    expected = roi_a.copy()
    expected[1, 0, 0] = True
    np.testing.assert_array_equal(union, expected)
    nc1 = np.full(brain.shape, 50.0)
    nc1[0, 0, 0] = np.nan
    nc2 = np.full(brain.shape, 50.0)
    nc2[0, 1, 1] = 5.0
    selected = select_voxels(brain, roi_mask=union, noise_ceilings=[nc1, nc2], nc_threshold=10)
    expected[0, 0, 0] = False  # NaN in session 1
    expected[0, 1, 1] = False  # below threshold in session 2 (intersection)
    np.testing.assert_array_equal(selected, expected)
    np.testing.assert_array_equal(select_voxels(brain), brain)
    custom = np.zeros_like(brain)
    custom[2, 2, 1] = custom[1, 1, 1] = True
    only = select_voxels(brain, custom_mask=custom & brain)
    assert np.argwhere(only).tolist() == [[1, 1, 1]]
    with pytest.raises(SelectionError, match="either a ROI query or a custom mask, not both"):
        select_voxels(brain, roi_mask=union, custom_mask=custom)
    with pytest.raises(SelectionError, match="no noise ceiling"):
        select_voxels(brain, nc_threshold=3)


def test_coerce_selection_mask_forms():
    rng = np.random.default_rng(1)
    brain = rng.random((4, 5, 3)) < 0.6
    want = (rng.random(brain.shape) < 0.5) & brain
    np.testing.assert_array_equal(coerce_selection_mask(want, brain), want)
    np.testing.assert_array_equal(coerce_selection_mask(want.ravel(), brain), want)  # C order
    over_brain = want[brain]  # C-order boolean indexing == brain-voxel order
    np.testing.assert_array_equal(coerce_selection_mask(over_brain, brain), want)
    floats = np.where(want, -2.0, np.nan)
    np.testing.assert_array_equal(coerce_selection_mask(floats, brain), want)
    with pytest.raises(GridMismatchError, match=r"shape \(4, 5, 2\) does not match the grid"):
        coerce_selection_mask(np.ones((4, 5, 2), bool), brain)
    with pytest.raises(GridMismatchError, match=rf"brain-mask voxels \({brain.sum()} values\)"):
        coerce_selection_mask(np.ones(7, bool), brain)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    # thresholds below 1 warn that noise ceilings are in percent (tested below)
    threshold=st.one_of(st.just(0.0), st.floats(1, 100)),
    n_sessions=st.integers(1, 3),
)
def test_select_voxels_matches_a_loop_oracle(seed, threshold, n_sessions):
    rng = np.random.default_rng(seed)
    shape = (3, 4, 2)
    brain = rng.random(shape) < 0.7
    roi = roi_union([rng.random(shape) < 0.5], brain)
    ncs = [np.where(rng.random(shape) < 0.1, np.nan, rng.uniform(0, 100, shape))
           for _ in range(n_sessions)]
    got = select_voxels(brain, roi_mask=roi, noise_ceilings=ncs, nc_threshold=threshold)
    for idx in np.ndindex(shape):
        keep = bool(brain[idx] and roi[idx])
        for nc in ncs:
            keep = keep and (not np.isnan(nc[idx])) and nc[idx] >= threshold
        assert got[idx] == keep


def test_read_small_volume(tmp_path):
    volume = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    image = nib.Nifti1Image(volume, np.diag([2.0, 2.0, 2.0, 1.0]))
    image.header.set_slope_inter(0.5, 1.0)
    path = tmp_path / "v.nii.gz"
    image.to_filename(path)
    values, affine = read_small_volume(path)
    np.testing.assert_allclose(values, volume * 0.5 + 1.0)
    assert affine[0, 0] == 2.0
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(gzip.compress(b"not a nifti at all" * 30))
    with pytest.raises(FormatError, match=r"bad\.nii\.gz: a gzip file whose content is not"):
        read_small_volume(bad)
    four_d = tmp_path / "4d.nii"
    nib.Nifti1Image(np.zeros((2, 2, 2, 3), np.float32), np.eye(4)).to_filename(four_d)
    with pytest.raises(FormatError, match=r"expected a 3-D volume.*found shape \(2, 2, 2, 3\)"):
        read_small_volume(four_d)


def test_empty_selections_and_thresholds_that_cannot_be_percent():
    from neurocube.ops.roi import NoiseCeilingUnitsWarning

    brain = np.zeros((3, 4, 2), bool)
    brain[1:, 1:, :] = True
    roi = np.zeros_like(brain)
    roi[2, 3, 1] = True
    nc = np.full(brain.shape, 12.0)
    assert not select_voxels(brain, noise_ceilings=[nc], nc_threshold=50).any()  # allowed
    with pytest.raises(SelectionError, match=r"nc_threshold=50 \(noise ceiling of session 1 "
                       r"of 1, max 12 %\) removed every voxel"):
        select_voxels(brain, noise_ceilings=[nc], nc_threshold=50, allow_empty=False)
    with pytest.raises(SelectionError, match="the ROI selection removed every voxel"):
        select_voxels(brain, roi_mask=roi & ~brain, allow_empty=False)
    for bad in (150, -1, float("nan"), "high"):
        with pytest.raises(SelectionError, match=r"nc_threshold=.*\[0, 100\]"):
            select_voxels(brain, noise_ceilings=[nc], nc_threshold=bad)
    with pytest.warns(NoiseCeilingUnitsWarning, match="in percent.*nc_threshold=15"):
        select_voxels(brain, noise_ceilings=[nc], nc_threshold=0.15)
