"""Label views of a behaviour dataset: events, dense per-frame labels, id tags.

Label files are NPZs listed in ``labels/<kind>/index.csv``. Building a view
reads the ``.npy`` member headers only (:func:`read_npz_headers`); the events
are read by the chunk tasks (:func:`_read_label_events`, :func:`_mark_labels`),
each from the file version the dataset saw (:class:`_LabelSource`). Object
members (pickles) are never loaded unless the caller passes ``trusted=True``.
The methods live on :class:`LabelsMixin`, which
:class:`~neurocube.datasets.behavior.BehaviorDataset` inherits.
"""

from __future__ import annotations

import contextlib
import os
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from neurocube import storage
from neurocube.catalog.behavior import BehaviorCatalog, split_list_cell
from neurocube.datasets.behavior.graph import constant_strings, pick_variable
from neurocube.errors import (
    CorruptDataError,
    DataNotFoundError,
    FormatError,
    NeurocubeError,
    NeurocubeWarning,
    SelectionError,
    UnsafeDataError,
)
from neurocube.storage import StorageOptions, is_url, open_file

if TYPE_CHECKING:
    from neurocube.catalog.behavior import Manifest


class LabelsMixin:
    """The label methods of :class:`~neurocube.datasets.behavior.BehaviorDataset`.

    A mixin: it holds no state of its own and uses the dataset's ``catalog``,
    ``manifest``, ``_options_for`` and ``to_dense``.
    """

    catalog: BehaviorCatalog

    if TYPE_CHECKING:  # given by BehaviorDataset

        @property
        def manifest(self) -> Manifest:
            """The dataset manifest."""

        def _options_for(self, path: str) -> StorageOptions | None: ...

        def to_dense(self, *args: Any, **kwargs: Any) -> xr.Dataset:
            """Return the selected tracks in the ``movement`` shape, lazily."""

    def _label_source(self, path: str) -> _LabelSource:
        """Where a label file is and which version of it the dataset saw."""
        meta = self.catalog.stat(path)
        if meta is None:
            raise DataNotFoundError(
                f"{path}: label file listed in the labels index does not exist. If the dataset "
                "moved, open it with path_map={old_prefix: new_prefix}."
            )
        remote = is_url(path)
        return _LabelSource(
            path, meta.size, meta.etag if remote else str(meta.mtime_ns),
            self._options_for(path) if remote else None,
        )

    # -- labels ---------------------------------------------------------------------------------

    def label_kinds(self) -> list[str]:
        """Return the label kinds with an index (``behavior``, ``id_tags``, ...)."""
        return self.catalog.label_kinds()

    def label_map(self, kind: str = "behavior") -> dict[int, str]:
        """Return ``{label id: label name}`` of a label kind, from its index CSV (no NPZ read).

        Falls back to ``meta.labels.<kind>`` of the manifest when the index has no names.
        """
        table = self.catalog.read_index(f"labels/{kind}")
        for _, row in table.iterrows():
            ids = split_list_cell(str(row.get("label_ids", "")))
            names = split_list_cell(str(row.get("label_names", "")))
            if ids and len(ids) == len(names):
                return {int(i): n for i, n in zip(ids, names, strict=True)}
        meta = self.manifest.meta.get("labels", {})
        entry = meta.get(kind, {}) if isinstance(meta, dict) else {}
        ids_m, names_m = entry.get("label_ids"), entry.get("label_names")
        if isinstance(ids_m, list) and isinstance(names_m, list) and len(ids_m) == len(names_m):
            return {int(i): str(n) for i, n in zip(ids_m, names_m, strict=True)}
        raise FormatError(
            f"{self.catalog.index_path('labels/' + kind)}: no label_ids/label_names in the index "
            "or the manifest; the names are only in the NPZ object arrays. Load them with "
            "labels(kind, trusted=True) if you trust the files."
        )

    def _label_files(
        self,
        kind: str,
        groups: str | Iterable[str] | None,
        sequences: str | Iterable[str] | None,
        run_id: str | None = None,
    ) -> pd.DataFrame:
        from neurocube.io.behavior.index import filter_pairs

        table = self.catalog.labels_table(kind, run_id)
        table = filter_pairs(table, groups, sequences, self.catalog.index_path(f"labels/{kind}"))
        if table.empty:
            raise SelectionError(f"no {kind} labels for groups={groups!r}, sequences={sequences!r}")
        table = table.copy()
        table["path"] = [str(self.catalog.resolve_path(p)) for p in table["abs_path"]]
        return table

    def labels(
        self,
        kind: str = "behavior",
        groups: str | Iterable[str] | None = None,
        sequences: str | Iterable[str] | None = None,
        *,
        trusted: bool = False,
        run_id: str | None = None,
    ) -> xr.Dataset:
        """Return the label events of the selected sequences as a lazy table.

        Reads only the NPZ member headers now. Variables along ``event``:
        ``frames``, ``labels``, ``individual_ids(event, pair)`` (``[id, -1]`` one
        animal, ``[a, b]`` a pair, ``[-1, -1]`` the scene); coords ``group`` and
        ``sequence``; ``label_name(label_id)`` gives the names.

        Label names come from the labels index CSV. The NPZ member
        ``label_names`` is an object array that only pickle can load: it is
        skipped (with a :class:`~neurocube.errors.NeurocubeWarning`) unless
        ``trusted=True``, in which case the names are read from the first file.
        """
        table = self._label_files(kind, groups, sequences, run_id)
        skipped: set[str] = set()
        specs: list[_LabelSpec] = []
        for _, row in table.iterrows():
            source = self._label_source(row["path"])
            headers = _headers(source)
            for required in ("frames", "labels"):
                if required not in headers:
                    raise FormatError(
                        f"{row['path']}: label file has no {required!r} member; members are "
                        f"{sorted(headers)} (expected the individual_pair_v1 layout)."
                    )
            skipped |= {name for name, (_, dt) in headers.items() if dt == "object"}
            n = headers["frames"][0][0] if headers["frames"][0] else 0
            has_pairs = "individual_ids" in headers
            specs.append(
                _LabelSpec(row["path"], int(n), has_pairs, row["group"], row["sequence"], source)
            )
        label_map = self._label_names(kind, table, skipped, trusted)
        token = tokenize(
            "labels", kind, [(s.path, s.source.key if s.source else None) for s in specs]
        )
        read_name = f"labels-read-{token}"
        read_layer: dict[Any, Any] = {
            (read_name, i): (_read_label_events, s) for i, s in enumerate(specs)
        }
        chunks = tuple(s.n_events for s in specs)
        out: dict[str, Any] = {}
        for var, tail, dt in (
            ("frames", (), "int64"),
            ("labels", (), "int64"),
            ("individual_ids", (2,), "int64"),
        ):
            name = f"labels-{var}-{token}"
            layer: dict[Any, Any] = {
                (name, i, *([0] * len(tail))): (pick_variable, (read_name, i), var)
                for i in range(len(specs))
            }
            graph = HighLevelGraph(
                {read_name: read_layer, name: layer}, {read_name: set(), name: {read_name}}
            )
            arr = da.Array(graph, name, (chunks, *((t,) for t in tail)), dtype=np.dtype(dt))
            out[var] = (("event", "pair") if tail else ("event",), arr)
        coords: dict[str, Any] = {
            "group": (
                "event",
                constant_strings([[(s.group, s.n_events)] for s in specs], "group"),
            ),
            "sequence": (
                "event",
                constant_strings([[(s.sequence, s.n_events)] for s in specs], "sequence"),
            ),
            "label_id": np.asarray(sorted(label_map), dtype=np.int64),
        }
        coords["label_name"] = (
            "label_id",
            np.asarray([label_map[i] for i in sorted(label_map)], dtype=str),
        )
        ds = xr.Dataset(out, coords=coords)
        ds.attrs.update(
            {
                "neurocube_sources": [s.path for s in specs],
                "label_kind": kind,
                "label_formats": sorted(set(table.get("label_format", pd.Series([""])))),
                "trusted": bool(trusted),
            }
        )
        return ds

    def _label_names(
        self, kind: str, table: pd.DataFrame, skipped: set[str], trusted: bool
    ) -> dict[int, str]:
        if trusted:
            for path in table["path"]:
                with _npz_errors(path), self._label_source(path).open() as fh, np.load(
                    fh, allow_pickle=True
                ) as npz:
                    if "label_names" in npz.files and "label_ids" in npz.files:
                        ids = np.asarray(npz["label_ids"]).tolist()
                        names = [str(n) for n in np.asarray(npz["label_names"]).tolist()]
                        return {int(i): n for i, n in zip(ids, names, strict=True)}
        if skipped:
            warnings.warn(
                f"labels/{kind}: skipped NPZ object member(s) {sorted(skipped)} (loading them "
                "needs pickle); label names come from the labels index CSV. Pass trusted=True "
                "if you trust these files to load them.",
                NeurocubeWarning,
                stacklevel=3,
            )
        try:
            return self.label_map(kind)
        except FormatError:
            known: set[int] = set()
            for cell in table.get("label_ids", pd.Series([], dtype=str)):
                known |= {int(i) for i in split_list_cell(cell)}
            return {i: str(i) for i in sorted(known)}

    def _events(
        self, group: str, sequence: str, kind: str, run_id: str | None = None
    ) -> dict[str, np.ndarray]:
        table = self._label_files(kind, group, sequence, run_id)
        row = table.iloc[0]
        source = self._label_source(row["path"])
        n = _headers(source)["frames"][0]
        spec = _LabelSpec(row["path"], int(n[0]) if n else 0, True, group, sequence, source)
        return _read_label_events(spec)

    def labels_for_individual(
        self,
        group: str,
        sequence: str,
        individual_id: int,
        kind: str = "behavior",
        frame_range: tuple[int, int] | None = None,
    ) -> dict[str, np.ndarray]:
        """Return the events involving ``individual_id`` (either slot of the pair), eagerly.

        ``frame_range`` is ``(start, end)``, end exclusive.
        """
        ev = self._events(group, sequence, kind)
        keep = (ev["individual_ids"] == individual_id).any(axis=1)
        if frame_range is not None:
            keep &= (ev["frames"] >= frame_range[0]) & (ev["frames"] < frame_range[1])
        return {k: v[keep] for k, v in ev.items()}

    def labels_at_frame(
        self,
        group: str,
        sequence: str,
        frame: int,
        kind: str = "behavior",
        individual_id: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Return the events at ``frame`` (of one individual when given), eagerly."""
        ev = self._events(group, sequence, kind)
        keep = ev["frames"] == frame
        if individual_id is not None:
            keep &= (ev["individual_ids"] == individual_id).any(axis=1)
        return {k: v[keep] for k, v in ev.items()}

    def labels_dense(
        self,
        kind: str = "behavior",
        groups: str | Iterable[str] | None = None,
        sequences: str | Iterable[str] | None = None,
        *,
        start_frame: int | None = None,
        end_frame: int | None = None,
        individuals: Sequence[int] | None = None,
        frame_chunk: int | None = None,
        pairs: Iterable[tuple[str, str]] | None = None,
        stack: bool | None = None,
    ) -> xr.Dataset:
        """Return ``labels(frame, individual, label)`` booleans aligned with :meth:`to_dense`.

        The frame and individual axes are those :meth:`to_dense` gives for the
        same selection. An event ``[a, b]`` marks individual ``a`` (a symmetric
        pair is stored both ways, so ``b`` gets its own event); ``[-1, -1]``
        (the scene) marks every individual. Reads the label NPZ files only when
        computed (their non-object members).
        """
        tracks = self.to_dense(
            groups,
            sequences,
            start_frame=start_frame,
            end_frame=end_frame,
            individuals=individuals,
            frame_chunk=frame_chunk,
            pairs=pairs,
            stack=stack,
        )
        stacked = "sequence" in tracks.dims
        label_map = self.label_map(kind)
        label_ids = sorted(label_map)
        table = self._label_files(kind, None, None)
        by_pair = {
            (g, s): p
            for g, s, p in zip(table["group"], table["sequence"], table["path"], strict=True)
        }
        sources = {p: self._label_source(by_pair[p]) for p in by_pair}
        if stacked:
            seqs = list(
                zip(
                    tracks["group"].values.tolist(), tracks["sequence"].values.tolist(), strict=True
                )
            )
            starts = tracks["frame_start"].values.tolist()
            lengths = tracks["n_frames"].values.tolist()
        else:
            seqs = [(tracks.attrs["group"], tracks.attrs["sequence"])]
            starts = [int(tracks["frame"].values[0]) if tracks.sizes["frame"] else 0]
            lengths = [tracks.sizes["frame"]]
        ind = tuple(int(i) for i in tracks["individual"].values)
        position_chunks = tracks["position"].chunks
        assert position_chunks is not None
        frame_chunks = position_chunks[1 if stacked else 0]
        token = tokenize(
            "labels-dense",
            kind,
            seqs,
            starts,
            lengths,
            ind,
            label_ids,
            frame_chunks,
            [(sources[p].key if p in sources else None) for p in seqs],
        )
        name = f"labels-dense-{token}"
        layer: dict[Any, Any] = {}
        offset = 0
        bounds = []
        for size in frame_chunks:
            bounds.append((offset, offset + size))
            offset += size
        for s, pair in enumerate(seqs):
            source = sources.get(pair)
            for j, (a, b) in enumerate(bounds):
                key = (name, s, j, 0, 0) if stacked else (name, j, 0, 0)
                layer[key] = (
                    _dense_labels_chunk,
                    source,
                    starts[s] + a,
                    b - a,
                    max(0, min(b, lengths[s]) - a),
                    ind,
                    tuple(label_ids),
                    stacked,
                )
        chunks: tuple[tuple[int, ...], ...] = (tuple(frame_chunks), (len(ind),), (len(label_ids),))
        if stacked:
            chunks = ((1,) * len(seqs), *chunks)
        arr = da.Array(
            HighLevelGraph.from_collections(name, layer, dependencies=()), name, chunks, dtype=bool
        )
        dims = ("frame", "individual", "label")
        coords = {k: v for k, v in tracks.coords.items() if k not in ("space", "keypoint")}
        ds = xr.Dataset(
            {"labels": (("sequence", *dims) if stacked else dims, arr)},
            coords={
                **coords,
                "label": np.asarray(label_ids, dtype=np.int64),
                "label_name": ("label", np.asarray([label_map[i] for i in label_ids], dtype=str)),
            },
        )
        ds.attrs.update(
            {
                "neurocube_sources": sorted({by_pair[p] for p in seqs if p in by_pair}),
                "label_kind": kind,
                "layout": "dense",
            }
        )
        return ds

    def id_tags(
        self,
        groups: str | Iterable[str] | None = None,
        sequences: str | Iterable[str] | None = None,
        *,
        kind: str = "id_tags",
        trusted: bool = False,
    ) -> dict[tuple[str, str], dict[str, Any]]:
        """Return per-individual tags: ``{(group, sequence): {"labels": {id: {field: value}}}}``.

        id_tags files hold object arrays only (pickled). Without ``trusted=True``
        every object member is skipped with a warning and only the field names
        from the index are returned (``"fields"``); with it, the values are loaded.
        """
        table = self._label_files(kind, groups, sequences)
        out: dict[tuple[str, str], dict[str, Any]] = {}
        skipped: set[str] = set()
        for _, row in table.iterrows():
            entry: dict[str, Any] = {
                "path": row["path"],
                "fields": split_list_cell(str(row.get("label_names", ""))),
                "labels": {},
                "metadata": {},
            }
            source = self._label_source(row["path"])
            headers = _headers(source)
            objects = {n for n, (_, dt) in headers.items() if dt == "object"}
            if objects and not trusted:
                skipped |= objects
            with _npz_errors(source.path), source.open() as fh, np.load(
                fh, allow_pickle=trusted
            ) as npz:
                members = {n: np.asarray(npz[n]) for n in npz.files if trusted or n not in objects}
            ids = members.get("ids")
            for n, values in members.items():
                if n.startswith("meta__"):
                    entry["metadata"][n[len("meta__") :]] = values.tolist()
                elif n != "ids" and ids is not None and values.shape[:1] == ids.shape[:1]:
                    for i, v in zip(ids.tolist(), values.tolist(), strict=True):
                        entry["labels"].setdefault(i, {})[n] = v
            out[(row["group"], row["sequence"])] = entry
        if skipped:
            warnings.warn(
                f"labels/{kind}: skipped NPZ object member(s) {sorted(skipped)} (loading them "
                "needs pickle); only field names from the index are returned. Pass "
                "trusted=True if you trust these files to load their values.",
                NeurocubeWarning,
                stacklevel=2,
            )
        return out


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class _LabelSource:
    """A label NPZ as a task sees it: location, the version opened, options (picklable)."""

    path: str
    size: int
    version: str  # mtime_ns (as text) of a local file, ETag of an object
    storage_options: StorageOptions | None = None

    @property
    def key(self) -> tuple[str, int, str]:
        """What identifies this version (for graph tokens; no secret in it)."""
        return (self.path, self.size, self.version)

    def open(self) -> Any:
        """Open for reading: a local file, or a block reader over the object.

        A remote object that changed since the dataset was opened is refused;
        its 1 MiB blocks are shared by every read of the process, so a label
        file read for its headers and then its events travels once.
        """
        if not is_url(self.path):
            return open_file(self.path, "rb")
        storage.check_unchanged(self.path, self.storage_options, self.size, self.version)
        return storage.BlockReader(
            self.path, self.storage_options, size=self.size, version=self.version
        )


def read_npz_headers(
    path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> dict[str, tuple[tuple[int, ...], str]]:
    """Return ``{member: (shape, dtype)}`` of an NPZ from the ``.npy`` headers only.

    Object members report dtype ``"object"``; nothing is unpickled. ``path``
    may be a URL (read with ``storage_options``).

    Raises
    ------
    FormatError
        If the file is not a zip of ``.npy`` members.
    """
    if is_url(path):
        opts = storage.as_options(storage_options)
        meta = storage.info(path, opts)
        return _headers(_LabelSource(str(path), meta.size, meta.etag, opts))
    return _headers(_LabelSource(os.fspath(path), 0, ""))


def _headers(source: _LabelSource) -> dict[str, tuple[tuple[int, ...], str]]:
    path = source.path
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    with source.open() as fh:
        try:
            zf = zipfile.ZipFile(fh)
        except zipfile.BadZipFile as exc:
            raise FormatError(f"{path}: not an NPZ (zip) file ({exc}).") from exc
        with zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as member:
                    try:
                        version = np.lib.format.read_magic(member)
                        if version == (1, 0):
                            shape, _, dtype = np.lib.format.read_array_header_1_0(member)
                        else:
                            shape, _, dtype = np.lib.format.read_array_header_2_0(member)
                    except ValueError as exc:
                        raise FormatError(
                            f"{path}: member {info.filename} is not a .npy array ({exc})"
                        ) from exc
                dt = "object" if dtype.hasobject else dtype.str
                out[info.filename[: -len(".npy")]] = (tuple(shape), dt)
    return out


@dataclass(frozen=True)
class _LabelSpec:
    path: str
    n_events: int
    has_pairs: bool
    group: str
    sequence: str
    source: _LabelSource | None = None


@contextlib.contextmanager
def _npz_errors(path: str) -> Iterator[None]:
    """Turn numpy's and zipfile's errors while loading a label NPZ into neurocube errors.

    ``np.load`` checks each member's ZIP CRC-32 as it reads it (``BadZipFile: Bad
    CRC-32``): that is a :class:`CorruptDataError`; an object member without
    ``trusted=True`` an :class:`UnsafeDataError`; anything else a :class:`FormatError`.
    """
    import zipfile

    try:
        yield
    except NeurocubeError:
        raise
    except zipfile.BadZipFile as exc:
        kind = CorruptDataError if "crc" in str(exc).lower() else FormatError
        raise kind(f"{path}: the label NPZ is damaged ({exc}); restore or rewrite it.") from exc
    except (ValueError, KeyError, OSError, EOFError, TypeError) as exc:
        if isinstance(exc, ValueError) and "allow_pickle" in str(exc):
            raise UnsafeDataError(
                f"{path}: the label NPZ holds object arrays ({exc}); loading them would "
                "unpickle data from the file. Pass trusted=True if you trust this file."
            ) from exc
        raise FormatError(
            f"{path}: the label NPZ cannot be read ({type(exc).__name__}: {exc}); expected "
            "numeric 'frames' and 'labels' arrays. Restore or rewrite it."
        ) from exc


def _read_label_events(spec: _LabelSpec) -> dict[str, np.ndarray]:
    source = spec.source or _LabelSource(spec.path, 0, "")
    with _npz_errors(spec.path), source.open() as fh, np.load(fh, allow_pickle=False) as npz:
        frames = np.asarray(npz["frames"]).astype(np.int64).reshape(-1)
        labels = np.asarray(npz["labels"]).astype(np.int64).reshape(-1)
        if "individual_ids" in npz.files:
            pairs = np.asarray(npz["individual_ids"]).astype(np.int64).reshape(-1, 2)
        else:
            pairs = np.full((frames.size, 2), -1, dtype=np.int64)
    if not (frames.size == labels.size == pairs.shape[0] == spec.n_events):
        raise FormatError(
            f"{spec.path}: frames/labels/individual_ids have {frames.size}/{labels.size}/"
            f"{pairs.shape[0]} events, {spec.n_events} expected from the header"
        )
    return {"frames": frames, "labels": labels, "individual_ids": pairs}


def _dense_labels_chunk(
    path: _LabelSource | None,
    frame_lo: int,
    n_frames: int,
    n_valid: int,
    individuals: tuple[int, ...],
    label_ids: tuple[int, ...],
    stacked: bool = False,
) -> np.ndarray:
    out = np.zeros((n_frames, len(individuals), len(label_ids)), dtype=bool)
    if path is not None and n_valid and individuals:
        _mark_labels(out, path, frame_lo, n_valid, individuals, label_ids)
    return out[np.newaxis] if stacked else out


def _mark_labels(
    out: np.ndarray,
    path: _LabelSource,
    frame_lo: int,
    n_valid: int,
    individuals: tuple[int, ...],
    label_ids: tuple[int, ...],
) -> None:
    headers = _headers(path)
    ev = _read_label_events(
        _LabelSpec(path.path, headers["frames"][0][0] if headers["frames"][0] else 0, True, "", "",
                   path)
    )
    rel = ev["frames"] - frame_lo
    lab = np.searchsorted(np.asarray(label_ids), ev["labels"])
    lab_ok = lab < len(label_ids)
    lab_ok[lab_ok] = np.asarray(label_ids)[lab[lab_ok]] == ev["labels"][lab_ok]
    keep = (rel >= 0) & (rel < n_valid) & lab_ok
    ind = np.asarray(individuals, dtype=np.int64)
    actor = ev["individual_ids"][:, 0]
    for r, a, lb in zip(rel[keep], actor[keep], lab[keep], strict=True):
        if a == -1:
            out[r, :, lb] = True
            continue
        pos = np.searchsorted(ind, a)
        if pos < len(ind) and ind[pos] == a:
            out[r, pos, lb] = True
