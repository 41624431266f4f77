"""Train/test splits of trials that do not leak a stimulus across the split.

Single-trial betas repeat images (a shared image is shown several times, in
several sessions). A model trained on one repeat and tested on another sees
the test image during training; :func:`split_trials` keeps every repeat of a
stimulus on one side. The result is two lazy selections of the same Dataset:
nothing is read until they are computed, and then only their trials are
(see :mod:`neurocube.sources.pushdown`).
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from neurocube.errors import SelectionError

__all__ = ["split_trials"]


def split_trials(
    ds: Any,
    *,
    by: str = "image_name",
    test: float | int | str = 0.2,
    seed: int | None = None,
    dim: str = "trial",
) -> tuple[Any, Any]:
    """Split a Dataset (or DataArray) along ``trial`` into ``(train, test)`` without leaks.

    Parameters
    ----------
    ds
        A lazy selection with a coordinate ``by`` along ``dim`` (e.g.
        ``Subject.betas(...)``).
    by
        The coordinate whose values must not be split: every trial of one value
        (all repeats of an image) falls on the same side.
    test
        ``"shared"``: the shared images are the test set (their trials carry
        ``unique_or_shared == "shared"``), the usual practice for this data; a
        fraction in (0, 1): that share of the distinct ``by`` values, drawn at
        random; an integer >= 1: that many distinct values.
    seed
        Seed of the random draw (the same seed and data give the same split).
    dim
        The dimension to split.

    Returns
    -------
    train, test
        Two lazy selections (``ds.isel``) in the original trial order.

    Raises
    ------
    SelectionError
        If ``by`` is not a coordinate along ``dim``, a value mixes shared and
        unique trials (``test="shared"``), or a side would be empty.

    Examples
    --------
    >>> import numpy as np, xarray as xr, neurocube
    >>> ds = xr.Dataset({"betas": (("trial", "voxel"), np.arange(12.0).reshape(6, 2))},
    ...                 coords={"image_name": ("trial", list("aabbcc"))})
    >>> train, test = neurocube.split_trials(ds, test=1, seed=0)
    >>> train.sizes["trial"], test.sizes["trial"]
    (4, 2)
    >>> set(train.image_name.values.tolist()) & set(test.image_name.values.tolist())
    set()
    """
    if by not in ds.coords or ds.coords[by].dims != (dim,):
        along = sorted(name for name, c in ds.coords.items() if c.dims == (dim,))
        raise SelectionError(
            f"split_trials(by={by!r}): expected a coordinate along {dim!r}; the coordinates "
            f"along {dim!r} are {along}."
        )
    labels = np.asarray(ds.coords[by].values)
    values, groups = np.unique(labels, return_inverse=True)
    if isinstance(test, str):
        if test != "shared":
            raise SelectionError(
                f"split_trials(test={test!r}): expected 'shared', a fraction in (0, 1) or a "
                "number of distinct values"
            )
        in_test = _shared_values(ds, labels, values, groups, by, dim)
    else:
        in_test = _drawn_values(test, values, seed, by)
    trial_in_test = in_test[groups]
    if trial_in_test.all() or not trial_in_test.any():
        side = "train" if trial_in_test.all() else "test"
        raise SelectionError(
            f"split_trials(test={test!r}): the {side} set would be empty ({values.size} distinct "
            f"{by} values, {labels.size} trials). Choose another test= or more sessions."
        )
    train = ds.isel({dim: np.flatnonzero(~trial_in_test)})
    tested = ds.isel({dim: np.flatnonzero(trial_in_test)})
    return train, tested


def _shared_values(
    ds: Any, labels: np.ndarray, values: np.ndarray, groups: np.ndarray, by: str, dim: str
) -> np.ndarray:
    """Return which distinct values are shared images (all of their trials shared)."""
    if "unique_or_shared" not in ds.coords or ds.coords["unique_or_shared"].dims != (dim,):
        raise SelectionError(
            "split_trials(test='shared') needs the trials' 'unique_or_shared' coordinate "
            "(Subject.betas gives it); pass a fraction or a number instead."
        )
    shared = np.asarray(ds.coords["unique_or_shared"].values) == "shared"
    shared_count = np.bincount(groups, weights=shared, minlength=values.size)
    total = np.bincount(groups, minlength=values.size)
    mixed = (shared_count > 0) & (shared_count < total)
    if mixed.any():
        raise SelectionError(
            f"split_trials(test='shared'): {by} {values[mixed][:3].tolist()} has both shared and "
            "unique trials; its repeats cannot all fall on one side. Check the trial tables."
        )
    result: np.ndarray = shared_count == total
    return result


def _drawn_values(test: Any, values: np.ndarray, seed: int | None, by: str) -> np.ndarray:
    """Return a random choice of distinct values: a fraction of them, or a number."""
    n = values.size
    if isinstance(test, bool) or not isinstance(test, numbers.Real):
        raise SelectionError(
            f"split_trials(test={test!r}): expected 'shared', a fraction or a count"
        )
    if isinstance(test, numbers.Integral) and int(test) >= 1:
        count = int(test)
    elif 0 < float(test) < 1:
        count = round(float(test) * n)
    else:
        raise SelectionError(
            f"split_trials(test={test!r}): expected a fraction in (0, 1) or a number of distinct "
            f"{by} values >= 1"
        )
    if not 1 <= count < n:
        raise SelectionError(
            f"split_trials(test={test!r}): that is {count} of the {n} distinct {by} values; "
            "both sides need at least one."
        )
    rng = np.random.default_rng(seed)
    chosen = np.zeros(n, dtype=bool)
    chosen[rng.choice(n, size=count, replace=False)] = True
    return chosen
