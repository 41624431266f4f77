"""ROI query grammar and voxel selection rules of the betas bucket (docs/fmri.md).

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
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from neurocube.errors import GridMismatchError, NeurocubeWarning, SelectionError

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
    allow_empty: bool = True,
) -> np.ndarray:
    """Apply the selection order above (docs/fmri.md) and return a 3-D bool volume.

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
        Noise ceilings are in percent: a threshold outside [0, 100] is refused,
        one below 1 warns (:class:`NoiseCeilingUnitsWarning`).
    allow_empty
        False to refuse a selection with no voxel left, naming the filter that
        removed the last ones.

    Raises
    ------
    SelectionError
        If both ``roi_mask`` and ``custom_mask`` are given, a threshold is
        given without noise ceilings or outside [0, 100], or (``allow_empty``
        False) nothing is left.
    """
    if roi_mask is not None and custom_mask is not None:
        raise SelectionError(
            "give either a ROI query or a custom mask, not both: the custom mask replaces the "
            "ROI selection (intersect them yourself with roi_mask(...) & mask if you need both)"
        )
    if nc_threshold is not None:
        check_nc_threshold(nc_threshold)
    steps: list[tuple[str, int]] = []  # (filter, voxels left after it), for empty selections
    selected = brain_mask.copy()
    steps.append(("the brain mask", int(selected.sum())))
    if roi_mask is not None:
        selected &= roi_mask
        steps.append(("the ROI selection", int(selected.sum())))
    if custom_mask is not None:
        selected &= custom_mask
        steps.append(("the custom mask", int(selected.sum())))
    if nc_threshold is not None:
        if not noise_ceilings:
            raise SelectionError("nc_threshold was given but no noise ceiling was found")
        for n, volume in enumerate(noise_ceilings):
            if volume.shape != brain_mask.shape:
                raise GridMismatchError(
                    f"noise ceiling of shape {volume.shape} does not match the grid "
                    f"{brain_mask.shape}"
                )
            selected &= nc_threshold_mask(volume, nc_threshold)
            steps.append((
                f"nc_threshold={nc_threshold} (noise ceiling of session {n + 1} of "
                f"{len(noise_ceilings)}, max {float(np.nanmax(volume)):.4g} %)"
                if np.isfinite(volume).any() else f"nc_threshold={nc_threshold} (an all-NaN map)",
                int(selected.sum()),
            ))
    if not allow_empty and not selected.any():
        first = next(name for name, left in steps if left == 0)
        raise SelectionError(
            f"the selection has no voxel left: {first} removed every voxel ("
            + ", then ".join(f"{name}: {left}" for name, left in steps)
            + "). Loosen that filter (a lower nc_threshold, another ROI or mask)."
        )
    return selected


class NoiseCeilingUnitsWarning(NeurocubeWarning):
    """A noise-ceiling threshold below 1 is probably a fraction; noise ceilings are in percent."""


def check_nc_threshold(nc_threshold: Any) -> None:
    """Refuse a threshold that cannot be a noise ceiling in percent; warn on a likely fraction.

    Raises
    ------
    SelectionError
        If ``nc_threshold`` is not a number in [0, 100] (NaN included).
    """
    try:
        value = float(nc_threshold)
    except (TypeError, ValueError):
        raise SelectionError(
            f"nc_threshold={nc_threshold!r}: expected a number of percent in [0, 100]"
        ) from None
    if not (0.0 <= value <= 100.0):  # NaN fails both comparisons
        raise SelectionError(
            f"nc_threshold={nc_threshold!r}: expected a noise ceiling in percent, in [0, 100] "
            "(e.g. 15 keeps voxels whose noise ceiling is at least 15 %)"
        )
    if 0.0 < value < 1.0:
        warnings.warn(
            f"nc_threshold={nc_threshold!r}: noise ceilings are in percent (0-100), so this "
            f"keeps voxels above {value} %; for {value * 100:g} % pass nc_threshold="
            f"{value * 100:g}.",
            NoiseCeilingUnitsWarning,
            stacklevel=4,
        )


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
