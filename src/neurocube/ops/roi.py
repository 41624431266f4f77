"""ROI query grammar and voxel selection rules of the betas bucket (FORMATS.md §1).

Everything here is eager NumPy on 3-D boolean volumes of one functional grid,
known when a graph is built; nothing here touches betas.

Selection order (the same as the existing loader):

1. the ROI query resolves to ROI files; their volumes are unioned voxel-wise
   and intersected with the brain mask (no ROI: the whole brain mask);
2. a custom mask *replaces* the ROI selection (also within the brain mask);
   giving both is an error;
3. the result is AND-ed with ``noise ceiling >= threshold`` (NaN compares
   false); with several sessions, a voxel must pass in every session (the
   intersection), so all sessions share one voxel axis;
4. (trials are then filtered by shared / unique elsewhere).

Masks follow one rule: NaN is outside, any non-zero value (negative included)
is inside. Flat masks are in C order of the (X, Y, Z) grid.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from neurocube.errors import GridMismatchError, SelectionError

__all__ = [
    "coerce_selection_mask",
    "nc_threshold_mask",
    "nonzero_mask",
    "read_small_volume",
    "resolve_roi_query",
    "roi_union",
    "select_voxels",
]

RoiQuery = str | Sequence[str]


def resolve_roi_query(
    query: RoiQuery, categories: Mapping[str, Sequence[str]], *, where: str = ""
) -> list[tuple[str, str]]:
    """Resolve a ROI query into the ``(category, roi)`` pairs it names.

    Grammar: a ROI name (``"FFA1"``), a category folder name (``"face"``: every
    ROI in it), ``"all"`` (every ROI), or a list mixing them. A token that is
    both a ROI name and a category name means the ROI name. A ROI name present
    in several categories names all of them (their union).

    Parameters
    ----------
    query
        The user's query.
    categories
        ``{category: [roi names]}`` of what exists.
    where
        Where the ROIs come from (named in error messages).

    Returns
    -------
    list of (category, roi)
        In the order the query names them, without duplicates.

    Raises
    ------
    SelectionError
        If a token names no ROI or category (the message lists what exists and
        the closest names), or the query is empty.

    Examples
    --------
    >>> cats = {"face": ["FFA1", "OFA"], "place": ["PPA"]}
    >>> resolve_roi_query(["face", "PPA", "FFA1"], cats)
    [('face', 'FFA1'), ('face', 'OFA'), ('place', 'PPA')]
    """
    tokens = [query] if isinstance(query, str) else list(query)
    if not tokens:
        raise SelectionError(f"empty ROI query{_where(where)}: name a ROI, a category or 'all'")
    by_name: dict[str, list[tuple[str, str]]] = {}
    for category, names in categories.items():
        for name in names:
            by_name.setdefault(name, []).append((category, name))
    resolved: list[tuple[str, str]] = []
    for token in tokens:
        if not isinstance(token, str):
            raise SelectionError(
                f"ROI query items must be strings, got {token!r} ({type(token).__name__})"
            )
        if token == "all":
            pairs = [(c, n) for c, names in categories.items() for n in names]
        elif token in by_name:
            pairs = by_name[token]
        elif token in categories:
            pairs = [(token, n) for n in categories[token]]
        else:
            known = sorted(by_name) + sorted(categories)
            close = difflib.get_close_matches(token, known, n=3)
            hint = f" Did you mean {close}?" if close else ""
            raise SelectionError(
                f"ROI query {token!r} names no ROI and no category{_where(where)}. "
                f"ROIs: {sorted(by_name)}; categories: {sorted(categories)}; or 'all'.{hint}"
            )
        for pair in pairs:
            if pair not in resolved:
                resolved.append(pair)
    if not resolved:
        raise SelectionError(f"ROI query {query!r} resolved to no ROI{_where(where)}")
    return resolved


def _where(where: str) -> str:
    return f" in {where}" if where else ""


def nonzero_mask(volume: np.ndarray) -> np.ndarray:
    """Return ``volume`` as a boolean mask: NaN is outside, any non-zero is inside."""
    values = np.asarray(volume)
    if values.dtype == bool:
        return values.copy()
    if values.dtype.kind == "f":
        return (values != 0) & ~np.isnan(values)
    return values != 0


def roi_union(volumes: Sequence[np.ndarray], brain_mask: np.ndarray) -> np.ndarray:
    """Union ROI volumes voxel-wise, within the brain mask (3-D bool)."""
    union = np.zeros(brain_mask.shape, dtype=bool)
    for volume in volumes:
        union |= nonzero_mask(volume)
    return union & brain_mask


def nc_threshold_mask(noise_ceiling: np.ndarray, threshold: float) -> np.ndarray:
    """Return ``noise_ceiling >= threshold``, NaN counting as False."""
    values = np.asarray(noise_ceiling, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.greater_equal(values, float(threshold)) & ~np.isnan(values)


def coerce_selection_mask(
    mask: Any, brain_mask: np.ndarray, *, name: str = "mask", source: str = ""
) -> np.ndarray:
    """Turn a user's custom mask into a 3-D boolean volume on the brain mask's grid.

    Accepted forms: a 3-D array on the grid (bool, or numbers with the
    NaN-outside / non-zero-inside rule), a flat array over the whole grid (C
    order), or a flat boolean array over the brain-mask voxels (the reference
    library's form). The result is restricted to the brain mask.

    Raises
    ------
    GridMismatchError
        If the shape or length fits none of the forms; the message gives the
        grid, the number of brain voxels and what was passed.
    """
    values = np.asarray(mask)
    grid = brain_mask.shape
    n_grid = int(np.prod(grid))
    n_brain = int(brain_mask.sum())
    if values.ndim == 3:
        if values.shape != grid:
            raise GridMismatchError(
                f"{name}: a 3-D mask of shape {values.shape} does not match the grid {grid}"
                f"{_where(source)}. Pass a mask on the functional grid {grid}."
            )
        volume = nonzero_mask(values)
    elif values.ndim == 1 and values.size == n_grid:
        volume = nonzero_mask(values).reshape(grid)
    elif values.ndim == 1 and values.size == n_brain:
        volume = np.zeros(grid, dtype=bool)
        volume.reshape(-1)[np.flatnonzero(brain_mask.reshape(-1))] = nonzero_mask(values)
    else:
        raise GridMismatchError(
            f"{name}: got an array of shape {values.shape}; expected a 3-D mask of shape {grid}, "
            f"a flat mask over the grid ({n_grid} values, C order) or a flat mask over the "
            f"brain-mask voxels ({n_brain} values){_where(source)}."
        )
    return volume & brain_mask


def select_voxels(
    brain_mask: np.ndarray,
    *,
    roi_mask: np.ndarray | None = None,
    custom_mask: np.ndarray | None = None,
    noise_ceilings: Sequence[np.ndarray] = (),
    nc_threshold: float | None = None,
) -> np.ndarray:
    """Apply the selection order of FORMATS.md §1 and return a 3-D bool volume.

    Parameters
    ----------
    brain_mask
        3-D bool brain mask.
    roi_mask
        3-D bool ROI union (already within the brain mask), or None.
    custom_mask
        3-D bool custom mask that replaces the ROI, or None.
    noise_ceilings
        Noise-ceiling volumes of the sessions in the call.
    nc_threshold
        Keep voxels with NC >= threshold in *every* session; None keeps all.

    Raises
    ------
    SelectionError
        If both ``roi_mask`` and ``custom_mask`` are given, or a threshold is
        given without noise ceilings.
    """
    if roi_mask is not None and custom_mask is not None:
        raise SelectionError(
            "give either a ROI query or a custom mask, not both: the custom mask replaces the "
            "ROI selection (intersect them yourself with roi_mask(...) & mask if you need both)"
        )
    selected = brain_mask.copy()
    if roi_mask is not None:
        selected &= roi_mask
    if custom_mask is not None:
        selected &= custom_mask
    if nc_threshold is not None:
        if not noise_ceilings:
            raise SelectionError("nc_threshold was given but no noise ceiling was found")
        for volume in noise_ceilings:
            if volume.shape != brain_mask.shape:
                raise GridMismatchError(
                    f"noise ceiling of shape {volume.shape} does not match the grid "
                    f"{brain_mask.shape}"
                )
            selected &= nc_threshold_mask(volume, nc_threshold)
    return selected


def read_small_volume(
    path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read a small 3-D NIfTI eagerly (masks, ROIs, noise ceilings, R² maps).

    Scaling is applied (float64 result); the file is read by neurocube's own
    NIfTI reader (:func:`neurocube.ops.masks.read_volume`). ``path`` may be a
    URL, read with ``storage_options`` (ignored for a local path).

    Returns
    -------
    volume, affine
        The 3-D array (a 4-D file with one volume is squeezed) and the 4x4 affine.

    Raises
    ------
    FormatError
        If the file is not a NIfTI-1/2 image or is not 3-D.
    """
    from neurocube import storage
    from neurocube.ops.masks import read_volume

    # a URL is read with its options (read_volume takes storage_options for URLs)
    kwargs: dict[str, Any] = (
        {} if storage.is_local(path) else {"storage_options": storage.as_options(storage_options)}
    )
    volume, affine = read_volume(path, **kwargs)
    return volume.astype(np.float64, copy=False), affine
