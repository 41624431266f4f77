"""Foundation-model embedding derivatives (the coco-pipe layout) as lazy Datasets.

:func:`open_embeddings` turns thousands of per-recording NPZ artifacts into one
:class:`xarray.Dataset` whose ``embedding`` variable is a Dask array: building it
reads the sidecars and the NPZ directories (member headers), never array data.
:func:`write_combined_tables` materialises the merged per-(model, condition)
parquet tables chunk by chunk, and :func:`open_combined_table` reads one back
lazily (one Dask chunk per parquet row group).

Examples
--------
>>> import neurocube
>>> ds = neurocube.open_embeddings("derivatives/eeg_foundation_embeddings")  # doctest: +SKIP
>>> ds.embedding                                                           # doctest: +SKIP
<xarray.DataArray 'embedding' (recording: 4, feature: 4)> dask.array<...>
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from neurocube import storage
from neurocube.catalog.embeddings import (
    ARTIFACT_SUFFIX,
    EmbeddingArtifact,
    guess_npz_embedding,
    select_artifacts,
)
from neurocube.errors import DataNotFoundError, FormatError, SelectionError
from neurocube.io._atomic import atomic_path
from neurocube.sources.npz import NpzMember, read_members_into
from neurocube.sources.table import (
    ParquetRowGroup,
    parquet_layout,
    read_columns,
    read_feature_rowgroup,
)

__all__ = [
    "COMBINED_TABLE_LABELS",
    "REPRESENTATIONS",
    "aggregate_mean",
    "combined_table_path",
    "guess_npz_embedding",
    "open_combined_file",
    "open_combined_table",
    "open_embeddings",
    "write_combined_tables",
]

REPRESENTATIONS = ("recording", "epoch", "token")
COMBINED_TABLE_LABELS = {
    "epoch": "epoch_embeddings",
    "recording": "recording_embeddings",
    "subject": "subject_embeddings",
}
ID_COLUMNS = ("subject", "session", "run", "condition", "recording_id", "model_key")
SUBJECT_ID_COLUMNS = ("subject", "condition", "model_key")
_LEADING_COORDS = ("subject", "session", "run", "task", "condition", "recording_id", "model_key")
DEFAULT_CHUNK_BYTES = 32 * 1024 * 1024
MAX_FILES_PER_CHUNK = 1024


# --------------------------------------------------------------------------- coordinates


def _coordinate_values(values: list[Any]) -> np.ndarray:
    """Turn per-file sidecar scalars into a zarr-friendly numpy coordinate."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present) and len(present) == len(values):
        return np.asarray(values, dtype=bool)
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        if len(present) == len(values):
            return np.asarray(values, dtype=np.int64)
        return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
    return np.asarray(["" if v is None else str(v) for v in values], dtype=str)


def _file_coordinates(artifacts: Sequence[EmbeddingArtifact]) -> dict[str, np.ndarray]:
    """One coordinate per scalar sidecar key (union over files), plus the artifact path."""
    keys: dict[str, None] = {}
    for art in artifacts:
        for key, value in art.metadata.items():
            if value is None or isinstance(value, (str, int, float, bool)):
                keys.setdefault(key, None)
    # a key that is a list/dict in any file is not a coordinate (as in coco-pipe)
    scalar_keys = [
        k for k in keys if all(not isinstance(a.metadata.get(k), (list, dict)) for a in artifacts)
    ]
    ordered = [k for k in _LEADING_COORDS if k in scalar_keys]
    ordered += sorted(k for k in scalar_keys if k not in _LEADING_COORDS)
    coords = {k: _coordinate_values([a.metadata.get(k) for a in artifacts]) for k in ordered}
    coords["recording_id"] = np.asarray([a.recording_id for a in artifacts], dtype=str)
    coords["artifact_path"] = np.asarray([a.path for a in artifacts], dtype=str)
    return coords


# --------------------------------------------------------------------------- lazy arrays


def _read_chunk(
    members: tuple[NpzMember, ...], stack: bool, shape: tuple[int, ...], dtype: str
) -> np.ndarray:
    """Dask task: read the given members (one per file) into one chunk."""
    out = np.empty(shape, dtype=np.dtype(dtype))
    return read_members_into(members, out, stack=stack)


def _files_per_chunk(
    bytes_per_file: int, n_files: int, files_per_chunk: int | None, chunk_bytes: int
) -> int:
    """Files per chunk: about ``chunk_bytes`` each, and enough chunks to keep every core busy."""
    if files_per_chunk is not None:
        if files_per_chunk < 1:
            raise SelectionError(f"files_per_chunk must be >= 1, got {files_per_chunk}.")
        return int(files_per_chunk)
    by_size = chunk_bytes // max(1, bytes_per_file)
    by_cores = math.ceil(n_files / (4 * (os.cpu_count() or 1)))
    return int(max(1, min(MAX_FILES_PER_CHUNK, by_size, by_cores)))


def _member_array(
    members: Sequence[NpzMember],
    *,
    stack: bool,
    dtype: np.dtype[Any],
    row_shape: tuple[int, ...],
    files_per_chunk: int,
    label: str,
) -> Any:
    """Build a Dask array over one member per file, files grouped into chunks along axis 0."""
    import dask.array as da
    from dask.base import tokenize

    groups = [
        tuple(members[i : i + files_per_chunk]) for i in range(0, len(members), files_per_chunk)
    ]
    rows = [len(g) if stack else sum(m.shape[0] for m in g) for g in groups]
    digest = hashlib.sha1(usedforsecurity=False)
    for m in members:
        digest.update(
            f"{m.path}\0{m.name}\0{m.data_offset}\0{m.compressed_size}\0{m.crc32}\n".encode()
        )
    identity = digest.hexdigest()
    name = f"neurocube-npz-{label}-" + tokenize(
        identity, stack, dtype.str, row_shape, files_per_chunk
    )
    zeros = (0,) * len(row_shape)
    graph = {
        (name, i, *zeros): (_read_chunk, group, stack, (n, *row_shape), dtype.str)
        for i, (group, n) in enumerate(zip(groups, rows, strict=True))
    }
    chunks = (tuple(rows), *((s,) for s in row_shape))
    return da.Array(graph, name, chunks, dtype=dtype)


def _check_compatible(artifacts: Sequence[EmbeddingArtifact], representation: str) -> None:
    """Refuse mixed model keys, widths or token axes, naming the offending files."""
    by_model: dict[str, list[str]] = {}
    for art in artifacts:
        key = str(art.metadata.get("model_key", "")).strip().lower()
        if key:
            by_model.setdefault(key, []).append(art.path)
    if len(by_model) > 1:
        listing = "; ".join(f"{k!r}: {v[0]} ({len(v)} files)" for k, v in sorted(by_model.items()))
        raise FormatError(
            "Embedding derivatives from several foundation models cannot be stacked as "
            f"observations ({listing}). Pass model_key= to open one model at a time."
        )
    lead = "token_embeddings" if representation == "token" else "window_embeddings"
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for art in artifacts:
        by_shape.setdefault(art.members[lead].shape[1:], []).append(art.path)
    if len(by_shape) > 1:
        listing = "; ".join(
            f"{shape}: {paths[0]} ({len(paths)} files)" for shape, paths in by_shape.items()
        )
        what = (
            "token shapes (after the window axis)"
            if representation == "token"
            else "embedding widths"
        )
        raise FormatError(f"Artifacts have different {what}: {listing}. Open them separately.")
    if representation == "token":
        by_axes: dict[tuple[str, ...], list[str]] = {}
        for art in artifacts:
            axes = art.metadata.get("token_axes")
            if not isinstance(axes, list) or len(axes) != len(art.members[lead].shape):
                raise FormatError(
                    f"{art.path}: its sidecar token_axes {axes!r} does not name the "
                    f"{len(art.members[lead].shape)} axes of token_embeddings; cannot label them."
                )
            by_axes.setdefault(tuple(str(a) for a in axes), []).append(art.path)
        if len(by_axes) > 1:
            listing = "; ".join(f"{list(a)}: {p[0]} ({len(p)} files)" for a, p in by_axes.items())
            raise FormatError(f"Token artifacts name their axes differently: {listing}.")


def open_embeddings(
    root: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    representation: str = "recording",
    model_key: str | None = None,
    condition: str | None = None,
    *,
    aggregate_by: str | Sequence[str] | None = None,
    files_per_chunk: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    storage_options: Mapping[str, Any] | None = None,
    on_error: str = "raise",
) -> Any:
    """Open embedding artifacts as one lazy :class:`xarray.Dataset`.

    Parameters
    ----------
    root
        A derivative folder (discovered as coco-pipe does: successful manifest
        records, else a recursive scan), one artifact ``.npz``, or a list of them;
        local paths or URLs (``s3://...``, ``https://...``).
    representation
        ``"recording"``: ``embedding(recording, feature)`` from each file's pooled
        ``recording_embedding``. ``"epoch"``: ``embedding(epoch, feature)``, one
        row per window, with lazy ``window_index`` / ``window_start`` /
        ``window_stop`` coordinates. ``"token"``: the ``*_tokens.npz`` files'
        ``token_embeddings`` with the sidecar's ``token_axes`` as dims (the window
        axis is called ``epoch``; the dtype, e.g. float16, is kept).
    model_key
        Keep one model (case-insensitive, through the sidecars). Without it,
        artifacts from several models are refused.
    condition
        Keep one condition (sidecar ``condition``, exact match).
    aggregate_by
        A coordinate name (or several): return the lazy NaN-ignoring mean of the
        rows of each group (see :func:`aggregate_mean`). ``aggregate_by="subject"``
        on ``representation="epoch"`` with one condition is coco-pipe's subject level.
    files_per_chunk
        Files read by one Dask task (default: about ``chunk_bytes`` per chunk).
    chunk_bytes
        Target chunk size when ``files_per_chunk`` is not given.
    storage_options
        fsspec options for URLs (``{"anon": True}`` for a public bucket, or an
        endpoint and keys). A remote root is listed once; opening reads the
        sidecars and each NPZ's directory and member headers (a few byte ranges
        per file); the specs carry the options so Dask workers read with them.
    on_error
        ``"raise"`` (default): an artifact that cannot be used (its sidecar missing,
        empty, not JSON, or without ``model_key`` when selecting by it; its NPZ
        damaged) is an error naming the file. ``"skip"``: it is left out with a
        :class:`~neurocube.errors.NeurocubeWarning`, and the result's attrs list it
        (``skipped``: paths, ``skipped_errors``: why). A manifest record its writer
        marked as failed is left out in both modes (as coco-pipe does).

    Returns
    -------
    xarray.Dataset
        Variable ``embedding``; per-row coordinates from the sidecars (``subject``,
        ``session``, ``run``, ``task``, ``condition``, ``recording_id``,
        ``model_key``, every other scalar, ``artifact_path``); ``feature`` labels
        ``embedding_0000``... Attributes: ``representation``, ``model_key``,
        ``neurocube_sources``.

    Raises
    ------
    DataNotFoundError
        If nothing is found.
    FormatError, UnsafeDataError, TruncatedFileError
        For bad artifacts (message names the file), mixed models or widths.
    SelectionError
        For an unknown representation or ``aggregate_by`` coordinate.
    """
    if representation not in REPRESENTATIONS:
        raise SelectionError(
            f"representation must be one of {list(REPRESENTATIONS)}, got {representation!r} "
            "(the subject level is aggregate_by='subject' on representation='epoch')."
        )
    kind = "token" if representation == "token" else "embedding"
    skipped: list[dict[str, str]] = []
    artifacts = select_artifacts(root, model_key, kind, condition, storage_options,
                                 on_error=on_error, skipped=skipped)
    _remember(root, storage_options)
    if model_key is not None:
        other = [
            a.path
            for a in artifacts
            if str(a.metadata.get("model_key", "")).strip().lower() != model_key.strip().lower()
        ]
        if other:
            raise FormatError(
                f"Requested model_key={model_key!r}, but {len(other)} artifacts hold another "
                f"model, e.g. {other[0]}."
            )
    if not artifacts:
        raise DataNotFoundError(
            f"No {kind} artifacts found in {root!s} (model_key={model_key!r}, "
            f"condition={condition!r}). Check the folder and the filters."
        )
    wrong_kind = [a.path for a in artifacts if a.kind != kind]
    if wrong_kind:
        raise FormatError(
            f"{wrong_kind[0]}: is not {'a token' if kind == 'token' else 'a pooled embedding'} "
            f"artifact, so it has no array for representation {representation!r} "
            f"({len(wrong_kind)} such files). Pass *{ARTIFACT_SUFFIX[kind]} files for it."
        )
    _check_compatible(artifacts, representation)

    ds = _dataset_from_artifacts(
        artifacts, representation, condition, aggregate_by, files_per_chunk, chunk_bytes
    )
    if on_error == "skip":
        ds.attrs["skipped"] = [s["path"] for s in skipped]
        ds.attrs["skipped_errors"] = [s["error"] for s in skipped]
    return ds


def _remember(
    root: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    storage_options: Mapping[str, Any] | None,
) -> None:
    """Record the options of remote sources (attrs name them by URL only)."""
    roots = [root] if isinstance(root, (str, os.PathLike)) else list(root)
    for r in roots:
        if storage.is_url(r):
            storage.remember_options(str(r), storage_options)


def _dataset_from_artifacts(
    artifacts: Sequence[EmbeddingArtifact],
    representation: str,
    condition: str | None,
    aggregate_by: str | Sequence[str] | None,
    files_per_chunk: int | None,
    chunk_bytes: int,
) -> Any:
    """Build the lazy Dataset of checked, compatible artifacts (no file is read)."""
    import xarray as xr

    file_coords = _file_coordinates(artifacts)
    if representation == "recording":
        members = [a.members["recording_embedding"] for a in artifacts]
        row_dim = "recording"
        stack = True
        row_shape: tuple[int, ...] = members[0].shape
        dims: tuple[str, ...] = (row_dim, "feature")
        repeats = np.ones(len(artifacts), dtype=np.int64)
    else:
        lead = "token_embeddings" if representation == "token" else "window_embeddings"
        members = [a.members[lead] for a in artifacts]
        row_dim = "epoch"
        stack = False
        row_shape = members[0].shape[1:]
        if representation == "token":
            axes = [str(x) for x in artifacts[0].metadata["token_axes"]]
            dims = (row_dim, *axes[1:])
        else:
            dims = (row_dim, "feature")
        repeats = np.asarray([m.shape[0] for m in members], dtype=np.int64)
    dtype = np.result_type(*{m.numpy_dtype.newbyteorder("=") for m in members})
    per_file = max(int(r) for r in repeats) * math.prod(row_shape) * dtype.itemsize
    fpc = _files_per_chunk(per_file, len(artifacts), files_per_chunk, chunk_bytes)
    data = _member_array(
        members,
        stack=stack,
        dtype=dtype,
        row_shape=row_shape,
        files_per_chunk=fpc,
        label=representation,
    )

    coords: dict[Hashable, Any] = {
        name: (row_dim, np.repeat(values, repeats)) for name, values in file_coords.items()
    }
    if representation == "recording":
        coords["n_windows"] = (row_dim, np.asarray([a.n_windows for a in artifacts], np.int64))
    else:
        for key in ("window_index", "window_start", "window_stop"):
            window_members = [a.members[key] for a in artifacts]
            coords[key] = (
                row_dim,
                _member_array(
                    window_members,
                    stack=False,
                    dtype=np.dtype(np.int64),
                    row_shape=(),
                    files_per_chunk=fpc,
                    label=key,
                ),
            )
    feature_dim = "feature"
    if representation == "token":
        feature_dim = str(artifacts[0].metadata.get("token_feature_axis") or dims[-1])
        if feature_dim not in dims:
            raise FormatError(
                f"{artifacts[0].path}: token_feature_axis {feature_dim!r} is not one of the "
                f"token axes {list(dims[1:])}."
            )
    width = data.shape[dims.index(feature_dim)]
    coords[feature_dim] = (feature_dim, np.asarray([f"embedding_{i:04d}" for i in range(width)]))
    model_keys = sorted({str(a.metadata.get("model_key", "")) for a in artifacts})
    attrs: dict[str, Any] = {
        "representation": representation,
        "model_key": model_keys[0] if model_keys else "",
        "source_format": "coco-pipe embedding derivative (NPZ + JSON sidecar)",
        "n_artifacts": len(artifacts),
        "neurocube_sources": [a.path for a in artifacts],
    }
    if condition is not None:
        attrs["condition"] = condition
    ds = xr.Dataset({"embedding": (dims, data)}, coords=coords, attrs=attrs)
    if aggregate_by is not None:
        ds = aggregate_mean(ds, aggregate_by)
    return ds


# --------------------------------------------------------------------------- aggregation


def _group_partial(block: np.ndarray, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """Dask task: per-group sums and finite counts of a row block, shape (1, 2, G, ...).

    Rows are sorted by group (a no-op when they already are, the usual case) and
    summed run by run with ``np.add.reduceat`` in float64: O(rows x features).
    """
    rest = block.shape[1:]
    flat = block.reshape(block.shape[0], -1)
    out = np.zeros((1, 2, n_groups, flat.shape[1]), dtype=np.float64)
    if len(codes) == 0:
        return out.reshape((1, 2, n_groups, *rest))
    if np.any(codes[1:] < codes[:-1]):
        order = np.argsort(codes, kind="stable")
        codes = codes[order]
        flat = flat[order]
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    present = codes[starts]
    finite = np.isfinite(flat)
    if finite.all():
        sizes = np.diff(np.r_[starts, len(codes)])
        out[0, 0, present] = np.add.reduceat(flat, starts, axis=0, dtype=np.float64)
        out[0, 1, present] = sizes[:, None]
    else:
        cleaned = np.where(finite, flat, 0)
        out[0, 0, present] = np.add.reduceat(cleaned, starts, axis=0, dtype=np.float64)
        out[0, 1, present] = np.add.reduceat(finite, starts, axis=0, dtype=np.float64)
    return out.reshape((1, 2, n_groups, *rest))


def aggregate_mean(ds: Any, by: str | Sequence[str]) -> Any:
    """Lazy mean of the ``embedding`` rows of each group of a row coordinate.

    Groups are numbered in order of first appearance (as coco-pipe's
    ``DataContainer.aggregate``); each cell is the mean of its finite values
    (NaN where a group has none). Coordinates that are constant within every
    group are kept; ``row_count`` gives the rows per group.

    Parameters
    ----------
    ds
        A Dataset from :func:`open_embeddings` (or :func:`open_combined_table`).
    by
        One coordinate along the row dimension (the result's dim is named after
        it) or several (the result's dim is ``group``, one coordinate per key).
        Coordinates must be known without computing (sidecar values), so
        ``window_index`` cannot be used.

    Raises
    ------
    SelectionError
        If a key is not a non-lazy coordinate along the row dimension.
    """
    import dask.array as da
    import xarray as xr
    from dask.base import tokenize

    keys = [by] if isinstance(by, str) else list(by)
    if not keys:
        raise SelectionError("aggregate_by needs at least one coordinate name.")
    embedding = ds["embedding"]
    row_dim = embedding.dims[0]
    for key in keys:
        if key not in ds.coords or ds.coords[key].dims != (row_dim,):
            usable = sorted(
                str(k) for k, c in ds.coords.items() if c.dims == (row_dim,) and c.chunks is None
            )
            raise SelectionError(
                f"aggregate_by={key!r} is not a coordinate along {row_dim!r}; "
                f"choose one of {usable}."
            )
        if ds.coords[key].chunks is not None:
            raise SelectionError(
                f"aggregate_by={key!r} is read lazily from the NPZ files; group by a sidecar "
                "coordinate (subject, session, run, condition, recording_id, ...) instead."
            )
    labels = (
        pd.MultiIndex.from_arrays([ds.coords[k].values for k in keys])
        if len(keys) > 1
        else (pd.Index(ds.coords[keys[0]].values))
    )
    codes, uniques = pd.factorize(labels)
    n_groups = len(uniques)
    data = embedding.data
    if not hasattr(data, "dask"):
        data = da.from_array(data, chunks=(max(1, data.shape[0]), *data.shape[1:]))
    if any(len(c) > 1 for c in data.chunks[1:]):
        data = data.rechunk({i: -1 for i in range(1, data.ndim)})
    code_chunks = np.split(codes, np.cumsum(data.chunks[0])[:-1])
    name = "neurocube-groupsum-" + tokenize(data.name, codes, n_groups)
    rest = data.shape[1:]
    zeros = (0,) * len(rest)
    graph: dict[Any, Any] = {
        (name, i, 0, 0, *zeros): (_group_partial, (data.name, i, *zeros), code_chunks[i], n_groups)
        for i in range(len(code_chunks))
    }
    from dask.highlevelgraph import HighLevelGraph

    hlg = HighLevelGraph.from_collections(name, graph, dependencies=[data])
    partial = da.Array(
        hlg,
        name,
        ((1,) * len(code_chunks), (2,), (n_groups,), *((s,) for s in rest)),
        dtype=np.float64,
    )
    totals = partial.sum(axis=0)
    sums, counts = totals[0], totals[1]
    out_dtype = (
        embedding.dtype if np.issubdtype(embedding.dtype, np.floating) else np.dtype(np.float64)
    )
    mean = da.where(counts > 0, sums / da.where(counts > 0, counts, 1), np.nan).astype(out_dtype)

    group_dim = keys[0] if len(keys) == 1 else "group"
    first_rows = np.unique(codes, return_index=True)[1]
    row_counts = np.bincount(codes, minlength=n_groups)
    coords: dict[Hashable, Any] = {}
    for cname, coord in ds.coords.items():
        if coord.dims == (row_dim,):
            if coord.chunks is not None or cname in keys:
                continue
            values = coord.values
            frame = pd.DataFrame({"v": values, "g": codes})
            if (frame.groupby("g")["v"].nunique(dropna=False) == 1).all():
                coords[cname] = (group_dim, values[first_rows])
        elif row_dim not in coord.dims:
            coords[cname] = coord
    for key in keys:
        coords[key] = (group_dim, ds.coords[key].values[first_rows])
    coords["row_count"] = (group_dim, row_counts.astype(np.int64))
    dims = (group_dim, *embedding.dims[1:])
    attrs = dict(ds.attrs)
    attrs["aggregated_by"] = list(keys)
    attrs["aggregation"] = "mean"
    return xr.Dataset({"embedding": (dims, mean)}, coords=coords, attrs=attrs)


# --------------------------------------------------------------------------- combined tables


def combined_table_path(
    root: str | os.PathLike[str], model_key: str, condition: str, representation: str = "recording"
) -> Path:
    """Return ``<root>/combined/<model_key>_<condition>_<representation>_embeddings.parquet``.

    For a URL root see :func:`combined_table_location` (a URL is not a Path).
    """
    return Path(combined_table_location(root, model_key, condition, representation))


def combined_table_location(
    root: str | os.PathLike[str], model_key: str, condition: str, representation: str = "recording"
) -> str:
    """Return ``<root>/combined/<model_key>_<condition>_<representation>_embeddings.parquet``."""
    if representation not in COMBINED_TABLE_LABELS:
        raise SelectionError(
            f"representation must be one of {sorted(COMBINED_TABLE_LABELS)}, "
            f"got {representation!r}."
        )
    label = COMBINED_TABLE_LABELS[representation]
    name = f"{model_key}_{condition}_{label}.parquet"
    if storage.is_url(root):
        return storage.join(str(root), "combined", name)
    return os.path.join(os.fspath(root), "combined", name)


def _table_for(
    artifacts: Sequence[EmbeddingArtifact], condition: str, level: str, chunk_bytes: int
) -> Any:
    representation = "epoch" if level == "subject" else level
    aggregate_by = "subject" if level == "subject" else None
    return _dataset_from_artifacts(
        artifacts, representation, condition, aggregate_by, None, chunk_bytes
    )


def write_combined_tables(
    root: str | os.PathLike[str],
    model_key: str,
    conditions: Sequence[str] | None = None,
    representations: Sequence[str] = ("epoch", "recording", "subject"),
    *,
    output_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = True,
    chunk_bytes: int = 8 * 1024 * 1024,
    parallel_chunks: int | None = None,
) -> list[Path]:
    """Write the merged per-(model, condition) parquet tables from the NPZ artifacts.

    For each condition and level, the lazy Dataset of :func:`open_embeddings` is
    computed a few chunks at a time and each chunk is appended as one parquet
    row group, so memory holds ``parallel_chunks`` chunks, never the table.
    Columns: ``subject, session, run, condition, recording_id, model_key``
    (``window_index`` for the epoch table; ``subject, condition, model_key`` for
    the subject table, which is the mean of the epoch rows per subject), then
    ``embedding_0000`` ... as float32 (the artifacts' float dtype).

    Parameters
    ----------
    root
        The derivative folder.
    model_key
        The model to write (case-insensitive match; used as given in file names).
    conditions
        Conditions to write (default: every condition found for the model).
    representations
        Levels among ``epoch``, ``recording``, ``subject``.
    output_dir
        Where to write (default ``<root>/combined``).
    overwrite
        Replace existing tables (default True: they are derived data).
    chunk_bytes
        Target bytes per chunk, hence per row group.
    parallel_chunks
        Chunks computed at once (default: the number of CPUs).

    Returns
    -------
    list of pathlib.Path
        The tables written.
    """
    import dask
    import pyarrow as pa
    import pyarrow.parquet as pq

    for level in representations:
        if level not in COMBINED_TABLE_LABELS:
            raise SelectionError(
                f"representation must be among {sorted(COMBINED_TABLE_LABELS)}, got {level!r}."
            )
    artifacts = select_artifacts(root, model_key, "embedding", None)
    artifacts = [
        a for a in artifacts if str(a.metadata.get("model_key", "")).lower() == model_key.lower()
    ]
    if not artifacts:
        raise DataNotFoundError(f"No artifacts of model {model_key!r} under {root}.")
    _check_compatible(artifacts, "epoch")
    by_condition: dict[str, list[EmbeddingArtifact]] = {}
    for art in artifacts:
        by_condition.setdefault(str(art.metadata.get("condition", "")), []).append(art)
    if conditions is None:
        conditions = sorted(by_condition)
    target = Path(output_dir) if output_dir is not None else Path(root) / "combined"
    n_parallel = parallel_chunks or os.cpu_count() or 1
    written: list[Path] = []
    for condition in conditions:
        for level in representations:
            if condition not in by_condition:
                raise DataNotFoundError(
                    f"No artifacts of model {model_key!r} and condition {condition!r} under "
                    f"{root} (conditions found: {sorted(by_condition)})."
                )
            ds = _table_for(by_condition[condition], condition, level, chunk_bytes)
            path = target / combined_table_path(".", model_key, condition, level).name
            id_columns = SUBJECT_ID_COLUMNS if level == "subject" else ID_COLUMNS
            row_dim = ds["embedding"].dims[0]
            ids = {}
            for col in id_columns:
                if col in ds.coords and ds.coords[col].dims == (row_dim,):
                    ids[col] = np.asarray(ds.coords[col].values).astype(str)
                else:
                    ids[col] = np.full(ds.sizes[row_dim], "", dtype=str)
            features = [str(f) for f in ds["feature"].values]
            fields = [pa.field(c, pa.large_string()) for c in id_columns]
            if level == "epoch":
                fields.append(pa.field("window_index", pa.int64()))
            value_dtype = ds["embedding"].dtype
            arrow_value = pa.from_numpy_dtype(value_dtype)
            fields += [pa.field(f, arrow_value) for f in features]
            schema = pa.schema(fields)
            writer_options = {
                # dictionaries help the repeated id strings, not float features
                "use_dictionary": [*id_columns],
                "write_page_checksum": True,  # readers verify page CRCs (issue 11)
            }
            data = ds["embedding"].data
            window = ds.coords["window_index"].data if level == "epoch" else None
            bounds = np.concatenate([[0], np.cumsum(data.chunks[0])])
            with (
                atomic_path(path, overwrite=overwrite) as tmp,
                pq.ParquetWriter(tmp, schema, **writer_options) as writer,
            ):
                for start in range(0, len(data.chunks[0]), n_parallel):
                    block_ids = range(start, min(start + n_parallel, len(data.chunks[0])))
                    todo = [data.blocks[i] for i in block_ids]
                    if window is not None:
                        todo += [window.blocks[i] for i in block_ids]
                    results = dask.compute(*todo)
                    for j, i in enumerate(block_ids):
                        values = np.asarray(results[j])
                        lo, hi = int(bounds[i]), int(bounds[i + 1])
                        columns: list[Any] = [
                            pa.array(ids[c][lo:hi], pa.large_string()) for c in id_columns
                        ]
                        if window is not None:
                            columns.append(
                                pa.array(np.asarray(results[len(block_ids) + j], np.int64))
                            )
                        columns += [pa.array(values[:, k]) for k in range(values.shape[1])]
                        writer.write_table(pa.Table.from_arrays(columns, schema=schema))
            written.append(path)
    return written


def _read_rowgroup_task(spec: ParquetRowGroup) -> np.ndarray:
    return read_feature_rowgroup(spec)


def open_combined_table(
    root: str | os.PathLike[str],
    model_key: str,
    condition: str,
    representation: str = "recording",
    *,
    aggregate_by: str | Sequence[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Any:
    """Open one merged ``combined/*_embeddings.parquet`` table as a lazy Dataset.

    The id columns (``subject`` ... ``model_key``, ``window_index``) are read
    when opening (they become coordinates); the ``embedding_*`` columns are read
    when computed, one Dask chunk per parquet row group. ``root`` may be a URL,
    read with ``storage_options`` (the footer in one range request, the id
    columns' byte ranges, then each row group's feature columns when computed).

    Returns
    -------
    xarray.Dataset
        ``embedding(<representation>, feature)`` where the row dim is
        ``recording``, ``epoch`` or ``subject``.

    Raises
    ------
    DataNotFoundError
        If the table does not exist (the message lists the tables that do).
    FormatError
        If it has no ``embedding_*`` columns or they are not numeric.
    """
    path = combined_table_location(root, model_key, condition, representation)
    opts = storage.as_options(storage_options) if storage.is_url(path) else None
    try:
        parquet_layout(path, opts)
    except DataNotFoundError:
        folder = storage.parent(path)
        existing = sorted(
            storage.basename(p) for p in storage.find(folder, opts) if p.endswith(".parquet")
        )
        raise DataNotFoundError(
            f"{path}: combined table not found (tables in {folder}: {existing or 'none'}). "
            "Write it with neurocube.write_combined_tables(root, model_key)."
        ) from None
    return open_combined_file(
        path, representation, model_key=model_key, condition=condition,
        aggregate_by=aggregate_by, storage_options=storage_options,
    )  # fmt: skip


def open_combined_file(
    path: str | os.PathLike[str],
    representation: str = "recording",
    *,
    model_key: str = "",
    condition: str = "",
    aggregate_by: str | Sequence[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Any:
    """Open a combined embedding table given by its path (see :func:`open_combined_table`).

    ``representation`` names the row dim; ``model_key`` and ``condition`` go to attrs.
    """
    import dask.array as da
    import xarray as xr
    from dask.base import tokenize

    path = str(path)
    opts = storage.as_options(storage_options) if storage.is_url(path) else None
    layout = parquet_layout(path, opts)
    if opts is not None:
        storage.remember_options(path, opts)
    features = [c for c in layout.columns if c.startswith("embedding_")]
    if not features:
        raise FormatError(f"{path}: no embedding_* feature columns (found {list(layout.columns)}).")
    id_columns = [c for c in layout.columns if c not in features]
    types = {layout.column_types[c] for c in features}
    value_types = {"float": "float32", "double": "float64", "halffloat": "float16"}
    if not types <= set(value_types):
        raise FormatError(
            f"{path}: feature columns must be floating point, found types {sorted(types)}."
        )
    dtype = np.result_type(*[np.dtype(value_types[t]) for t in types])
    ids = read_columns(layout, id_columns) if id_columns else {}
    row_dim = representation
    name = "neurocube-parquet-" + tokenize(
        layout.path, layout.size, layout.mtime_ns, layout.etag, tuple(features), dtype.str
    )
    graph = {
        (name, i, 0): (
            _read_rowgroup_task,
            ParquetRowGroup(
                layout.path, layout.size, layout.mtime_ns, i, tuple(features), dtype.str,
                layout.etag, layout.storage_options, layout.ctime_ns,
            ),
        )
        for i in range(len(layout.row_group_rows))
    }
    if layout.row_group_rows:
        data = da.Array(graph, name, (layout.row_group_rows, (len(features),)), dtype=dtype)
    else:  # a table with no rows has no row group
        data = da.zeros((0, len(features)), dtype=dtype, chunks=(1, len(features)))
    coords: dict[Hashable, Any] = {"feature": ("feature", np.asarray(features))}
    for col, values in ids.items():
        arr = np.asarray(values)
        if arr.dtype == object:
            arr = np.asarray(["" if v is None else str(v) for v in arr], dtype=str)
        coords[col] = (row_dim, arr)
    attrs = {
        "representation": representation,
        "model_key": model_key,
        "condition": condition,
        "source_format": "coco-pipe combined embedding table (parquet)",
        "neurocube_sources": [layout.path],
    }
    ds = xr.Dataset({"embedding": ((row_dim, "feature"), data)}, coords=coords, attrs=attrs)
    if aggregate_by is not None:
        ds = aggregate_mean(ds, aggregate_by)
    return ds
