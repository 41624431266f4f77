"""split_trials: every repeat of a stimulus on one side, lazily, reproducibly."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

import neurocube
from neurocube.errors import SelectionError
from neurocube.storage import IO_STATS
from neurocube.synthetic.bucket import make_bucket


def toy(labels, shared=None):
    n = len(labels)
    coords = {"image_name": ("trial", list(labels)), "trial": np.arange(n) * 10}
    if shared is not None:
        coords["unique_or_shared"] = ("trial", ["shared" if s else "unique" for s in shared])
    return xr.Dataset({"betas": (("trial", "voxel"), np.arange(n * 3.0).reshape(n, 3))},
                      coords=coords)


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.sampled_from("abcdefgh"), min_size=2, max_size=40),
    test=st.one_of(st.floats(0.05, 0.95), st.integers(1, 7)),
    seed=st.integers(0, 2**31),
)
def test_no_value_on_both_sides_and_every_trial_once(labels, test, seed):
    ds = toy(labels)
    try:
        train, tested = neurocube.split_trials(ds, test=test, seed=seed)
    except SelectionError as exc:  # a side would be empty: only when the numbers say so
        n = len(set(labels))
        count = test if isinstance(test, int) else round(test * n)
        assert not 1 <= count < n, exc
        return
    assert not set(train.image_name.values.tolist()) & set(tested.image_name.values.tolist())
    together = np.sort(np.concatenate([train.trial.values, tested.trial.values]))
    np.testing.assert_array_equal(together, ds.trial.values)  # each trial exactly once
    np.testing.assert_array_equal(tested.betas.values, ds.betas.sel(trial=tested.trial).values)
    again = neurocube.split_trials(ds, test=test, seed=seed)[1]
    np.testing.assert_array_equal(again.trial.values, tested.trial.values)  # same seed, same split


def test_shared_images_are_the_test_set():
    ds = toy(list("aabbccd"), shared=[1, 1, 0, 0, 1, 1, 0])
    train, tested = neurocube.split_trials(ds, test="shared")
    assert tested.image_name.values.tolist() == ["a", "a", "c", "c"]
    assert train.image_name.values.tolist() == ["b", "b", "d"]
    mixed = toy(list("aab"), shared=[1, 0, 0])
    with pytest.raises(SelectionError, match=r"\['a'\] has both shared and unique trials"):
        neurocube.split_trials(mixed, test="shared")
    with pytest.raises(SelectionError, match="needs the trials' 'unique_or_shared'"):
        neurocube.split_trials(toy("ab"), test="shared")


def test_bad_arguments_are_selection_errors():
    ds = toy(list("aabbcc"))
    with pytest.raises(SelectionError, match=r"coordinates along 'trial' are \['image_name'"):
        neurocube.split_trials(ds, by="image")
    for bad in (0, 1.5, -0.2, "half", True, 3):
        with pytest.raises(SelectionError, match="split_trials"):
            neurocube.split_trials(ds, test=bad)


def test_a_subject_split_is_lazy_and_reads_only_its_trials(tmp_path):
    make_bucket(tmp_path, subjects=1, sessions=2, trials=16, grid=(6, 7, 5), n_shared=3,
                shared_repeats=2, seed=1)
    sub = neurocube.open_subject(tmp_path, "sub-01")
    ds = sub.betas(sub.sessions)
    IO_STATS.reset()
    train, tested = neurocube.split_trials(ds, test="shared")
    assert IO_STATS.snapshot()[1] == 0  # nothing read to make the split
    assert set(tested.unique_or_shared.values.tolist()) == {"shared"}
    assert set(train.unique_or_shared.values.tolist()) == {"unique"}
    full = ds.betas.values
    where = np.flatnonzero(np.isin(ds.trial.values, tested.trial.values))
    np.testing.assert_array_equal(tested.betas.values, full[where])
