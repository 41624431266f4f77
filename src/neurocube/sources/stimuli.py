"""Lazy stimulus files of a betas bucket: embeddings, images, segmentations (HDF5).

Built on the generic lazy HDF5 layer (:mod:`neurocube.sources.hdf5`: picklable
specs, one pool of read-only handles per process, local files and URLs alike:
a remote file is read over range requests, its spec carrying the object's
size, ETag and ``storage_options`` so Dask workers read the same version with
the same options). What this module adds is the *trial* alignment: a
subject's trials show images in any order, with repeats, while the HDF5 files
hold one row per image; each chunk task reads the rows it needs with
:func:`neurocube.sources.hdf5.read_rows` (sorted, unique, expanded to trial
order in memory).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from neurocube import storage
from neurocube.errors import FormatError
from neurocube.sources.hdf5 import HDF5DatasetSpec, hdf5_dask_array, read_rows, read_selection
from neurocube.sources.hdf5_handles import pooled_file, stat_key

__all__ = [
    "TrialImages",
    "open_segmentations",
    "open_trial_embeddings",
    "read_rows",
]


def _spec(
    path: str | os.PathLike[str], dataset: str, storage_options: Mapping[str, Any] | None = None
) -> HDF5DatasetSpec:
    """Stat the file (one HEAD request for an object) and describe its dataset ``dataset``."""
    key = stat_key(path, storage_options)
    with pooled_file(*key, storage_options) as h5:
        if dataset not in h5:
            raise FormatError(
                f"{key[0]}: no dataset {dataset!r}; found {sorted(h5.keys())}. Expected the "
                "stimuli layout described in docs/fmri.md."
            )
        return HDF5DatasetSpec.from_dataset(h5[dataset], key, storage_options)


def _rows_chunk(spec: HDF5DatasetSpec, rows: np.ndarray) -> np.ndarray:
    return read_rows(spec, rows)


def _rows_array(
    spec: HDF5DatasetSpec, rows: np.ndarray, per_chunk: int | Sequence[int], prefix: str
) -> Any:
    """Dask array of ``dataset[rows]`` in chunks of ``per_chunk`` rows (deterministic name).

    ``per_chunk`` may also be the chunk sizes themselves (summing to ``rows.size``), e.g.
    the chunks of betas the rows must line up with.
    """
    import dask.array as da
    from dask.base import tokenize

    n = int(rows.size)
    if isinstance(per_chunk, (int, np.integer)):
        per: Any = max(1, int(per_chunk))
        bounds = [*list(range(0, n, per)), n]
    else:
        per = tuple(int(s) for s in per_chunk)
        if sum(per) != n or any(s < 1 for s in per):
            raise ValueError(f"chunk sizes {per} do not split {n} rows")
        bounds = [0, *np.cumsum(per).tolist()] if n else [0, 0]
    sizes = tuple(b - a for a, b in itertools.pairwise(bounds)) or (0,)
    tail = tuple(spec.shape[1:])
    name = f"{prefix}-{tokenize(spec, rows, per)}"
    graph: dict[Any, Any] = {}
    for index, (start, stop) in enumerate(itertools.pairwise(bounds)):
        graph[(name, index) + (0,) * len(tail)] = (_rows_chunk, spec, rows[start:stop])
    if n == 0:
        graph[(name, 0) + (0,) * len(tail)] = (_rows_chunk, spec, rows[:0])
    chunks = (sizes, *((s,) for s in tail))
    return da.Array(graph, name, chunks=chunks, dtype=np.dtype(spec.dtype))


def open_trial_embeddings(
    path: str | os.PathLike[str],
    image_names: np.ndarray,
    *,
    trials_per_chunk: int | Sequence[int] = 1024,
    storage_options: Mapping[str, Any] | None = None,
) -> tuple[Any, np.ndarray]:
    """Return ``(embedding, valid)`` aligned with ``image_names`` (one row per trial).

    ``embedding`` is a lazy Dask array ``(trial, feature)`` in the file's dtype
    (float16); ``valid`` is a bool array (False where the file flags the row
    invalid or does not list the image). ``image_ids`` and ``valid`` are read
    here (small); the embedding matrix only when computed. ``path`` may be
    a URL, read with ``storage_options``. ``trials_per_chunk`` is a number of
    trials per chunk or the chunk sizes (e.g. the chunks of the betas).

    Raises
    ------
    FormatError
        If ``embedding`` / ``image_ids`` are missing or their lengths disagree.
    """
    spec = _spec(path, "embedding", storage_options)
    with pooled_file(spec.path, spec.size, spec.version, spec.storage_options) as h5:
        if "image_ids" not in h5:
            raise FormatError(
                f"{spec.path}: no dataset 'image_ids'; an embeddings file needs it to find the row "
                "of each image"
            )
        ids = [v.decode() if isinstance(v, bytes) else str(v) for v in h5["image_ids"][()]]
        valid_rows = np.asarray(h5["valid"][()], dtype=bool) if "valid" in h5 else None
    if len(spec.shape) != 2 or len(ids) != spec.shape[0]:
        raise FormatError(
            f"{spec.path}: 'embedding' has shape {spec.shape} and 'image_ids' {len(ids)} rows; "
            "expected a 2-D (N, D) matrix with one id per row"
        )
    row_of = {name: i for i, name in enumerate(ids)}
    rows = np.asarray([row_of.get(str(n), -1) for n in image_names], dtype=np.int64)
    valid = rows >= 0
    if valid_rows is not None:
        valid &= np.where(rows >= 0, valid_rows[np.maximum(rows, 0)], False)
    return _rows_array(spec, rows, trials_per_chunk, "stimulus-embedding"), valid


class TrialImages:
    """Per-trial stimulus images (JPEG bytes), read from ``task-images_stimuli.h5`` on access.

    Indexing by a global trial index (the index of ``Subject.metadata``) reads
    one row; :meth:`to_dask` gives a lazy object array for bulk work. Holds a
    path and row numbers only, so it pickles.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        rows: np.ndarray,
        *,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self._spec = _spec(path, "images", storage_options)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.path = self._spec.path

    def __len__(self) -> int:
        return int(self.rows.size)

    def __getitem__(self, trial: int) -> bytes:
        row = int(self.rows[int(trial)])
        if row < 0:
            raise KeyError(f"trial {trial}: its image is not listed in the stimuli metadata CSV")
        return bytes(np.asarray(read_selection(self._spec, row), dtype=np.uint8).tobytes())

    def __iter__(self) -> Iterator[bytes]:
        for trial in range(len(self)):
            yield self[trial]

    def to_pil(self, trial: int) -> Any:
        """Decode one trial's image with Pillow."""
        import io

        from PIL import Image

        return Image.open(io.BytesIO(self[trial]))

    def to_dask(self, trials_per_chunk: int = 256) -> Any:
        """Return a lazy 1-D object array of ``bytes`` per trial."""
        import dask.array as da
        from dask.base import tokenize

        n = len(self)
        per = max(1, trials_per_chunk)
        bounds = [*list(range(0, n, per)), n]
        name = f"stimulus-images-{tokenize(self._spec, self.rows, per)}"
        graph = {
            (name, i): (_image_chunk, self._spec, self.rows[a:b])
            for i, (a, b) in enumerate(itertools.pairwise(bounds))
        }
        sizes = tuple(b - a for a, b in itertools.pairwise(bounds))
        return da.Array(graph, name, chunks=(sizes,), dtype=object)

    def __repr__(self) -> str:
        return f"TrialImages({self.path!r}, {len(self)} trials)"


def _image_chunk(spec: HDF5DatasetSpec, rows: np.ndarray) -> np.ndarray:
    out = np.empty(rows.size, dtype=object)
    for i, row in enumerate(rows.tolist()):
        out[i] = (
            b"" if row < 0 else bytes(np.asarray(read_selection(spec, row), np.uint8).tobytes())
        )
    return out


def open_segmentations(
    path: str | os.PathLike[str],
    metadata_path: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> Any:
    """Open segmentation masks lazily: Dataset ``masks (mask, height, width)`` + metadata coords.

    The CSV's columns become coordinates along ``mask`` (text as ``str``;
    integer-looking columns as int64).

    Raises
    ------
    FormatError
        If ``masks`` is not 3-D or the CSV's row count differs from it.
    """
    import pandas as pd
    import xarray as xr

    spec = _spec(path, "masks", storage_options)
    if len(spec.shape) != 3:
        raise FormatError(f"{spec.path}: 'masks' has shape {spec.shape}; expected (N, H, W)")
    with storage.open_file(metadata_path, "rb", storage_options, block_size=8 << 20) as handle:
        table = pd.read_csv(handle, dtype=str, keep_default_na=False)
    if len(table) != spec.shape[0]:
        raise FormatError(
            f"{metadata_path}: {len(table)} rows, but {spec.path} holds {spec.shape[0]} masks; "
            "expected one metadata row per mask"
        )
    per = max(1, (64 * 2**20) // max(1, spec.shape[1] * spec.shape[2]))
    chunks = (min(per, max(spec.shape[0], 1)), spec.shape[1], spec.shape[2])
    if spec.chunks:
        step = spec.chunks[0]
        chunks = (max(step, (chunks[0] // step) * step), spec.shape[1], spec.shape[2])
    masks = hdf5_dask_array(spec, chunks)
    coords: dict[str, Any] = {}
    for column in table.columns:
        values = table[column]
        numeric = pd.to_numeric(values, errors="coerce")
        if len(values) and numeric.notna().all() and (numeric % 1 == 0).all():
            coords[str(column)] = ("mask", numeric.to_numpy(dtype=np.int64))
        else:
            coords[str(column)] = ("mask", values.to_numpy(dtype=str))
    return xr.Dataset(
        {"masks": (("mask", "height", "width"), masks)},
        coords=coords,
        attrs={"neurocube_sources": [spec.path, storage.normalize(metadata_path)]},
    )
