"""Fuzz a generated betas bucket: damage a session's trial table (TSV) or its plain ``.nii`` betas.

Neither a TSV nor a plain ``.nii`` carries a checksum: a flipped letter of a label or a flipped
bit of a voxel cannot be detected, so other values are allowed. What must hold for every
example: reading the subject's betas and trial table gives values or a neurocube error naming
the damaged file — never a raw pandas/numpy/nibabel error. The oracle is the undamaged
subject, read eagerly (and checked against the generator's truth).
"""

from __future__ import annotations

import itertools
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import neurocube
from neurocube.errors import NeurocubeError
from neurocube.synthetic.bucket import make_bucket
from tests.fuzz.damage import Damage, damages, fuzz_settings

_versions = itertools.count(1)


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """``(root, {target: path}, oracle)`` of a one-subject, one-session bucket."""
    root = tmp_path_factory.mktemp("bucket")
    make_bucket(
        root, subjects=1, sessions=1, trials=8, grid=(4, 5, 3), compress=False,
        stimuli=False, embedding_models=(), full_resolution=False, surface_rois=False,
        freesurfer=False,
    )
    sub = neurocube.open_subject(root, "sub-01")
    targets = {"trials": Path(sub.trials_path("ses-01")), "betas": Path(sub.betas_path("ses-01"))}
    oracle = _read(root)
    assert oracle["values"].shape[0] == 8
    return root, targets, oracle


def _read(root) -> dict[str, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sub = neurocube.open_subject(root, "sub-01")
        ds = sub.betas("ses-01")
        meta = sub.metadata
        return {
            "values": ds["betas"].values,
            "columns": np.asarray([str(c) for c in meta.columns]),
            "table": meta.astype(str).to_numpy(dtype=str),
        }


def _same(got: dict[str, np.ndarray], oracle: dict[str, np.ndarray]) -> bool:
    return all(
        got[k].shape == oracle[k].shape
        and np.array_equal(got[k], oracle[k], equal_nan=got[k].dtype.kind == "f")
        for k in oracle
    )


def _damaged_read(bucket, target: str, damage: Damage, lo: int = 0, hi: int | None = None) -> str:
    """Damage ``target``'s bytes ``[lo, hi)``, read the subject, restore the file."""
    root, targets, oracle = bucket
    path = targets[target]
    original = path.read_bytes()
    hi = len(original) if hi is None else hi
    data = original[:lo] + damage.apply(original[lo:hi]) + original[hi:]
    path.write_bytes(data)
    try:
        got = _read(root)
    except NeurocubeError as exc:
        assert path.name in str(exc) or path.parent.name in str(exc), (
            f"the error does not name the damaged file {path.name}: {exc}"
        )
        return "error"
    finally:
        path.write_bytes(original)
        now = next(_versions) * 10**9 + os.stat(path).st_mtime_ns
        os.utime(path, ns=(now, now))  # a new version: nothing cached from the damaged one
    return "same" if _same(got, oracle) else "different"


def test_oracle_is_the_generated_truth(bucket):
    _, targets, oracle = bucket
    import nibabel as nib

    betas = np.asarray(nib.load(str(targets["betas"])).get_fdata())
    assert oracle["values"].shape == (8, oracle["values"].shape[1])
    assert np.isfinite(oracle["values"]).any()
    # every selected voxel of every trial is one of the file's values, trial by trial
    for t in range(8):
        finite = oracle["values"][t][np.isfinite(oracle["values"][t])]
        assert np.isin(finite, betas[..., t]).all()


@fuzz_settings()
@given(damage=damages(max_size=64))
def test_trial_table_damage_gives_values_or_neurocube_error(bucket, damage):
    _damaged_read(bucket, "trials", damage)


@fuzz_settings()
@given(damage=damages(max_size=512))
def test_betas_data_damage_gives_values_or_neurocube_error(bucket, damage):
    outcome = _damaged_read(bucket, "betas", damage, lo=352)
    if damage.kind == "truncate":
        assert outcome == "error"


@pytest.mark.slow
@fuzz_settings(slow=True)
@given(damage=damages(max_size=512), target=st.sampled_from(["trials", "betas", "betas-header"]))
def test_many_bucket_damages_slow(bucket, damage, target):
    if target == "betas-header":  # header damage: test_nifti_header_fuzz checks its values
        _damaged_read(bucket, "betas", damage, hi=352)
    else:
        _damaged_read(bucket, target, damage, lo=352 if target == "betas" else 0)
