"""Lazy NIfTI-1/NIfTI-2 reader (``.nii`` and ``.nii.gz``).

NIfTI stores voxels with x fastest and the 4th axis (trials) slowest, so one
trial is one contiguous run of bytes: *volumes are the unit of I/O*. A chunk
reads a run of whole volumes, applies byte order, ``scl_slope``/``scl_inter``
and (optionally) a voxel mask, and returns ``(x, y, z, trial)`` or
``(trial, voxel)``. Arrays hold a picklable :class:`NiftiSpec` (path, shape,
dtype, offset, scaling), never an open file, so graphs run on Dask
distributed workers, each opening files itself.

The header is read and checked before this module sees it, by
:mod:`neurocube.sources.nifti_header`. Which trial rows a graph over these
arrays reads (for batches read without Dask) is found by
:mod:`neurocube.sources.nifti_rows`, through :func:`probing`; masked arrays
are loaded straight into their output by :mod:`neurocube.sources.nifti_load`,
from the arrays :func:`open_nifti` registers there
(:func:`~neurocube.sources.nifti_load.register_direct`), and trial selections
are pushed down into the reads by :mod:`neurocube.sources.pushdown`, with which
:func:`volume_dask_array` registers :class:`VolumeArray`. Neither of those two
imports this module. Which gzip index a file gets is
:mod:`neurocube.sources.nifti_index`'s choice.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from neurocube import storage
from neurocube.errors import (
    ArgumentError,
    FormatError,
    TruncatedFileError,
)
from neurocube.progress import watch_computes
from neurocube.sources import gzindex, gzindex_store, nifti_load, pushdown
from neurocube.sources.nifti_header import NiftiInfo, VolumeGeometry, read_header
from neurocube.sources.nifti_index import check_index_argument, gzip_spec
from neurocube.sources.nifti_load import READ_BLOCK, VolumeRuns, register_direct
from neurocube.sources.voxels import check_mask_grid, mask_from_array, voxel_coords
from neurocube.storage import IO_STATS, StorageOptions

# A plain .compute() of a NIfTI selection gets one progress bar, not one per file it streams.
watch_computes()

__all__ = [
    "MaskedVolume",
    "NiftiParts",
    "build_parts",
    "NiftiSpec",
    "VolumeArray",
    "as_mask",
    "open_nifti",
    "read_volume",
]

DEFAULT_CHUNK_BYTES = 32 << 20  # "tens of MB" of voxel data per chunk
#: a span of volumes at least this large is read by a forward pass of its own reader
#: (rapidgzip, opened with the span's seek points only); shorter spans seek through
#: indexed_gzip's pooled per-thread handles. Measured on 81x96x81 float32 volumes (2.5 MB)
#: through the stored index, CPU per volume in one thread, spans in shuffled order (medians
#: of 3-5 alternating rounds): spans of 13 volumes 4.9 ms forward against 6.0 ms through
#: indexed_gzip (a long forward pass: 4.1 ms); of 5 volumes 6.5 against 7.7; of 3 volumes
#: 7.6 against 8.0. A new reader costs ~10 ms (its seek points imported, inflation from the
#: point before the span, read-ahead past its end); indexed_gzip inflates with zlib
FORWARD_MIN_BYTES = 8 << 20
# (through a gzip index: gzindex.INDEXED_READ_BLOCK, since each read call there restarts
# inflation from a seek point)


# --- small images read eagerly -----------------------------------------------------------------


def read_volume(
    path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read a small 3-D NIfTI (local or remote) eagerly: ``(values, affine)``, scaling applied.

    For masks, noise-ceiling and R² maps, which are needed at graph-build time.
    A 4-D image with a single volume is accepted as 3-D.
    """
    info = read_header(path, storage_options)
    if len(info.shape) == 4 and info.shape[3] != 1:
        raise FormatError(
            f"{info.path}: expected a 3-D volume (a mask or a map), found shape {info.shape}."
        )
    gz = (
        gzindex_store.GzipIndexSpec(
            info.path, None, storage_options=info.storage_options, size=info.size,
            etag=str(info.file_version) if not storage.is_local(info.path) else "",
        )
        if info.compressed
        else None
    )
    spec = NiftiSpec.from_info(info, gz)
    x, y, z = info.grid_shape
    values = np.asarray(VolumeArray(spec)[(slice(None),) * len(info.shape)])
    return values.reshape(x, y, z), info.affine


def as_mask(
    mask: Any,
    grid_shape: tuple[int, int, int],
    affine: np.ndarray | None = None,
    *,
    name: str = "mask",
    data_path: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> np.ndarray:
    """Return ``mask`` as a boolean array of shape ``grid_shape``.

    Parameters
    ----------
    mask
        A boolean (or 0/1) array on the grid, a flat array of ``prod(grid)``
        values in C order, or the path or URL of a NIfTI mask. For a NIfTI
        mask, NaN is outside and any non-zero value (negative ones included)
        is inside.
    grid_shape
        The data's spatial grid.
    affine
        The data's affine; a NIfTI mask must match it (within 1e-3 mm).
    name
        What to call the mask in messages.
    data_path
        The data file, named in messages.
    storage_options
        For a mask given as a URL.

    Raises
    ------
    GridMismatchError
        If the mask lies on another grid (shape or affine).
    """
    where = f" for {data_path}" if data_path else ""
    grid = tuple(int(s) for s in grid_shape)
    if isinstance(mask, (str, os.PathLike)):
        values, mask_affine = read_volume(mask, storage_options)
        label = f"{name} {storage.normalize(mask)}"
        return check_mask_grid(values, mask_affine, grid, affine, label=label, where=where)
    return mask_from_array(mask, grid, name=name, where=where)


# --- spec and chunk reads -------------------------------------------------------------------


@dataclass(frozen=True)
class NiftiSpec(VolumeGeometry):
    """Everything a task needs to read volumes of one file: paths and numbers only."""

    path: str
    shape: tuple[int, ...]
    dtype: str  # on-disk dtype string with byte order, e.g. '<f4', '>i2'
    vox_offset: int
    slope: float | None
    inter: float | None
    compressed: bool
    gzip: gzindex_store.GzipIndexSpec | None = None
    storage_options: StorageOptions | None = None
    size: int = 0
    file_version: int | str = 0
    ctime_ns: int = 0

    @classmethod
    def from_info(cls, info: NiftiInfo, gzip_spec: gzindex_store.GzipIndexSpec | None) -> NiftiSpec:
        """Build the spec of a file from its header."""
        return cls(
            path=info.path,
            shape=info.shape,
            dtype=info.dtype.str,
            vox_offset=info.vox_offset,
            slope=info.slope,
            inter=info.inter,
            compressed=info.compressed,
            gzip=gzip_spec,
            storage_options=info.storage_options,
            size=info.size,
            file_version=info.file_version,
            ctime_ns=info.ctime_ns,
        )

    @property
    def remote(self) -> bool:
        """True for a file reached over the network."""
        return not storage.is_local(self.path)

    def check_unchanged(self) -> None:
        """Raise :class:`~neurocube.errors.SourceChangedError` if the file is not the one opened.

        Its size and version (mtime locally, ETag remotely) are compared with those recorded
        at open, and a local file's ctime too (a rewrite that keeps the size and sets the
        mtime back still changes it): one stat per chunk task (a remote object is asked
        once per process and version). A file replaced by one with another grid or
        ``vox_offset`` would otherwise be read with the old header's geometry; nothing is
        re-hashed.
        """
        storage.check_unchanged(self.path, self.storage_options, self.size, self.file_version,
                                ctime_ns=self.ctime_ns or None)

    @property
    def volume_layout(self) -> tuple[int, int, int]:
        """``(vox_offset, volume_bytes, n_volumes)``: what per-volume checksums are taken over."""
        return (self.vox_offset, self.volume_bytes, self.n_volumes)

    def read_volumes(
        self, start: int, stop: int, buffer: np.ndarray | None = None, *, verify: bool = True
    ) -> np.ndarray:
        """Return volumes ``[start, stop)`` as raw on-disk values, shape ``(n, X*Y*Z)``.

        Each row is one volume in file order (x fastest). ``buffer`` (uint8, at
        least that many bytes) is filled and viewed instead of a new allocation.
        From a ``.nii.gz`` the bytes are verified before they are returned (see
        :func:`gzindex.read_range`); ``verify=False`` (or a read inside
        :func:`_deferred_verification`) leaves the check of a first pass to
        the caller, who must call :func:`gzindex.ensure_verified` before
        handing values out.
        """
        n = stop - start
        nbytes = n * self.volume_bytes
        buf = np.empty(nbytes, dtype=np.uint8) if buffer is None else buffer[:nbytes]
        offset = self.vox_offset + start * self.volume_bytes
        if self.compressed:
            assert self.gzip is not None
            try:
                gzindex.read_range(
                    self.gzip,
                    offset,
                    memoryview(buf),  # type: ignore[arg-type]
                    data_end=self.vox_offset + self.n_volumes * self.volume_bytes,
                    volumes=self.volume_layout,
                    verify=verify and not _verification_deferred(),
                )
            except TruncatedFileError as exc:
                where = getattr(exc, "offset", None)
                if where is None:  # the damage has no place (a missing trailer)
                    raise
                bad = max(start, (where - self.vox_offset) // self.volume_bytes)
                raise TruncatedFileError(
                    f"{exc} Volume {bad} of {self.n_volumes} (0-based) is the first that cannot "
                    f"be read (while reading volumes {start}..{stop - 1})."
                ) from exc
        else:
            _read_plain(self, offset, buf, start, stop)
        return buf.view(np.dtype(self.dtype)).reshape(n, self.volume_elems)

    def scale(self, raw: np.ndarray) -> np.ndarray:
        """Convert raw values to output values (native byte order, scaling applied)."""
        out = raw.astype(self.out_dtype, copy=True)
        self.scale_inplace(out)
        return out

    def scale_inplace(self, values: np.ndarray) -> None:
        """Apply ``scl_slope``/``scl_inter`` to output-typed ``values`` in place."""
        if self.slope is not None:
            if self.slope != 1.0:
                values *= values.dtype.type(self.slope)
            if self.inter:
                values += values.dtype.type(self.inter)


REMOTE_PIECE = 8 << 20  # a remote .nii read goes out as concurrent ranges of this size


def _read_plain(spec: NiftiSpec, offset: int, buf: np.ndarray, start: int, stop: int) -> None:
    path, n_vol = spec.path, spec.n_volumes
    if spec.remote:
        storage.check_unchanged(path, spec.storage_options, spec.size, spec.file_version)
        end = offset + buf.nbytes
        pieces = [(a, min(end, a + REMOTE_PIECE)) for a in range(offset, end, REMOTE_PIECE)]
        got = 0
        etag = str(spec.file_version)
        for data in storage.read_ranges(path, pieces, spec.storage_options, etag=etag):
            buf[got : got + len(data)] = np.frombuffer(data, dtype=np.uint8)
            got += len(data)
            if len(data) < REMOTE_PIECE:
                break
    else:
        IO_STATS.add_bytes(buf.nbytes)
        with storage.open_file(path) as fh:
            fh.seek(offset)
            got = fh.readinto(memoryview(buf))  # type: ignore[attr-defined,arg-type]
    if got != buf.nbytes:
        bad = start + got // (buf.nbytes // max(stop - start, 1))
        raise TruncatedFileError(
            f"{path}: the file ends inside the voxel data: volume {bad} of {n_vol} (0-based) "
            f"is the first that cannot be read (volumes {start}..{stop - 1} asked, {got} of "
            f"{buf.nbytes} bytes found). It was truncated after it was opened: re-write or "
            "re-download it."
        )


class VolumeArray:
    """A lazily read NIfTI array, indexable with slices (for ``dask.array.from_array``).

    Unmasked, its shape is the image's (``(X, Y, Z, T)`` or ``(X, Y, Z)``).
    With flat voxel indices it is ``(T, n_voxels)``: row ``t`` holds the
    selected voxels of volume ``t``, in the order of ``voxels``.

    Only a spec and (for a mask) an index array are stored: it pickles small
    and never holds a file open.
    """

    def __init__(
        self,
        spec: NiftiSpec,
        voxels: np.ndarray | None = None,
        volumes: np.ndarray | None = None,
    ) -> None:
        self.spec = spec
        if voxels is not None and voxels.size and (
            int(voxels.min()) < 0 or int(voxels.max()) >= spec.volume_elems
        ):  # _gather relies on this (np.take in "clip" mode)
            raise IndexError(
                f"{spec.path}: voxel positions must lie in [0, {spec.volume_elems}) for its grid "
                f"{spec.grid_shape}; got {int(voxels.min())}..{int(voxels.max())}."
            )
        self.voxels = voxels  # positions inside one volume in file (Fortran) order
        # the file's volumes behind each trial row (None: all of them, in order)
        self.volumes = None if volumes is None else np.asarray(volumes, dtype=np.int64)
        n = spec.n_volumes if self.volumes is None else int(self.volumes.size)
        if voxels is None:
            self.shape: tuple[int, ...] = spec.shape
            if len(spec.shape) == 4:
                self.shape = (*spec.shape[:3], n)
        else:
            self.shape = (n, int(voxels.size))
        self.dtype = spec.out_dtype
        self.ndim = len(self.shape)

    @property
    def n_rows(self) -> int:
        """Number of trials (rows) this array reads."""
        return self.spec.n_volumes if self.volumes is None else int(self.volumes.size)

    def select_volumes(self, rows: np.ndarray) -> VolumeArray:
        """Return the array of trial rows ``rows`` of this one: only their volumes are read."""
        base = np.arange(self.spec.n_volumes) if self.volumes is None else self.volumes
        return VolumeArray(self.spec, self.voxels, base[rows])

    def _volume_runs(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """Rows ``[lo, hi)`` as runs of consecutive volumes: ``(first row, first volume, n)``."""
        if self.volumes is None:
            return [(lo, lo, hi - lo)] if hi > lo else []
        vols = self.volumes[lo:hi]
        if vols.size == 0:
            return []
        breaks = np.flatnonzero(np.diff(vols) != 1) + 1
        starts = np.concatenate(([0], breaks))
        ends = np.concatenate((breaks, [vols.size]))
        return [(lo + int(a), int(vols[a]), int(b - a)) for a, b in zip(starts, ends, strict=True)]

    def __dask_tokenize__(self) -> Any:
        from dask.base import tokenize

        return ("neurocube.VolumeArray", self.spec, tokenize(self.voxels), tokenize(self.volumes))

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (self.ndim - len(key))
        probe: ReadProbe | None = getattr(_THREAD_STATE, "probe", None)
        if probe is not None:  # trial_rows() asks which rows a graph reads: nothing is read
            return probe.rows_of(self, key)
        self.spec.check_unchanged()  # one stat per chunk task: no values from a replaced file
        if self.voxels is None:
            return self._get_grid(key)
        return self._get_masked(key)

    def _trial_range(self, k: Any, n: int) -> tuple[int, int, Any]:
        """Turn a key along trials into a contiguous read range plus a selection inside it."""
        if isinstance(k, slice):
            start, stop, step = k.indices(n)
            if step == 1:
                return start, max(start, stop), slice(None)
            idx = np.arange(start, stop, step)
        elif isinstance(k, (int, np.integer)):
            t = int(k) + (n if k < 0 else 0)
            return t, t + 1, 0
        else:
            idx = np.asarray(k)
            if idx.dtype == bool:
                idx = np.flatnonzero(idx)
            idx = np.where(idx < 0, idx + n, idx)
        if idx.size == 0:
            return 0, 0, slice(None)
        lo, hi = int(idx.min()), int(idx.max()) + 1
        return lo, hi, idx - lo

    def _get_masked(self, key: tuple[Any, ...]) -> np.ndarray:
        assert self.voxels is not None
        lo, hi, inner = self._trial_range(key[0], self.n_rows)
        if hi <= lo:
            return np.empty((0, self.shape[1]), dtype=self.dtype)[:, key[1]]
        if not isinstance(inner, (int, slice)) and inner.size < hi - lo:
            # a scattered pick of rows: read only those volumes, not the whole span
            rows, where = np.unique(inner + lo, return_inverse=True)
            picked = self.select_volumes(rows)
            block = np.empty((rows.size, self.voxels.size), dtype=self.dtype)
            picked.read_masked_into(block, 0, rows.size)
            return block[where][:, key[1]]
        out = np.empty((hi - lo, self.voxels.size), dtype=self.dtype)
        self.read_masked_into(out, lo, hi)
        if isinstance(inner, int):
            return out[inner][key[1]]
        if not isinstance(inner, slice):
            out = out[inner]
        return out[:, key[1]]

    def read_masked_into(self, out: np.ndarray, lo: int, hi: int) -> None:
        """Fill ``out`` (``(hi - lo, n_voxels)``, C-contiguous rows) with masked trial rows.

        Volumes are read in sub-blocks into this thread's reusable buffer (fresh
        pages cost page faults on every call) and the masked voxels are gathered
        straight into ``out``. Rows map to volumes through :attr:`volumes`;
        each run of consecutive volumes is read on its own, by a forward reader
        of its own when it is long enough (:meth:`read_forward_into`).
        """
        for row, first, n in self._volume_runs(lo, hi):
            self.read_forward_into(out[row - lo : row - lo + n], first, n)

    def _read_volume_span(self, out: np.ndarray, lo: int, hi: int) -> None:
        """Fill ``out`` with the masked voxels of the file's volumes ``[lo, hi)``.

        On a first read (no index yet) the pieces go through the stream
        unchecked and the pass is verified (CRC32, to the end of the stream)
        once the span is read, before ``out`` is handed back.
        """
        spec = self.spec
        assert self.voxels is not None
        indexed = gzindex.has_index(spec.gzip)
        block = gzindex.INDEXED_READ_BLOCK if indexed else READ_BLOCK
        step = max(1, block // max(spec.volume_bytes, 1))
        scratch = _scratch(step * spec.volume_bytes)
        raw_dtype = np.dtype(spec.dtype)
        for a in range(lo, hi, step):
            b = min(hi, a + step)
            raw = spec.read_volumes(a, b, scratch, verify=indexed)
            self.gather(raw, out[a - lo : b - lo], raw_dtype)
        if spec.gzip is not None and not indexed and not _verification_deferred():
            gzindex.ensure_verified(spec.gzip, data_end=spec.data_end, volumes=spec.volume_layout)

    def gather(self, raw: np.ndarray, rows: np.ndarray, raw_dtype: np.dtype) -> None:
        """Store the masked voxels of raw volumes ``raw`` (``(n, X*Y*Z)``) into ``rows``."""
        assert self.voxels is not None
        # mode="clip": the voxel positions are checked when the array is made, and numpy
        # buffers ``out`` (one more copy, ~40 % of the gather) only in the default mode
        if raw_dtype == self.dtype:  # native float32/float64 (the usual betas)
            np.take(raw, self.voxels, axis=1, out=rows, mode="clip")
        else:
            rows[...] = np.take(raw, self.voxels, axis=1, mode="clip")  # byte swap / int -> float
        self.spec.scale_inplace(rows)

    def read_masked_runs(self, out: np.ndarray, runs: VolumeRuns) -> None:
        """Fill rows of ``out`` (``(n_volumes, n_voxels)``) from ``runs`` until none is left.

        Each run is read in one forward pass (:meth:`_read_run`); a thread
        whose run is done takes the back half of the largest run left.
        """
        r = runs.claim()
        while r is not None:
            self._read_run(out, runs, r)
            r = runs.claim()

    def _read_run(self, out: np.ndarray, runs: VolumeRuns, r: int) -> None:
        """Read run ``r`` of ``runs`` into its rows of ``out``, front to back.

        For a ``.nii.gz`` with a usable index this opens a private
        :class:`~neurocube.sources.gzindex.SequentialReader` at the run's
        first volume and reads on, a few MiB per call, gathering each piece
        while it is still in the CPU cache. Anything else (no usable index, a
        reader that fails on damaged data) goes through
        :meth:`read_masked_into` from the first volume not yet read, volume by
        volume over a piece that failed, so the error names the first volume
        indexed_gzip cannot deliver.
        """
        spec = self.spec
        assert self.voxels is not None
        reader = None
        if spec.gzip is not None:
            start = runs.start(r)
            reader = gzindex.open_sequential(
                spec.gzip, spec.vox_offset + start * spec.volume_bytes, spec.volume_layout
            )
        failed = None
        if reader is not None:
            step = max(1, gzindex.SEQUENTIAL_READ_BLOCK // max(spec.volume_bytes, 1))
            scratch = _scratch(step * spec.volume_bytes)
            raw_dtype = np.dtype(spec.dtype)
            with reader:
                while (piece := runs.take(r, step)) is not None:
                    a, b = piece
                    # fetch no further ahead than this run's end (another thread may have
                    # taken its back half): a remote pass then moves each byte once
                    reader.limit_to(spec.vox_offset + runs.end(r) * spec.volume_bytes)
                    buf = scratch[: (b - a) * spec.volume_bytes]
                    try:
                        reader.readinto(memoryview(buf))  # type: ignore[arg-type]
                    except gzindex.SequentialReadError:
                        failed = piece  # re-read through indexed_gzip, which names the damage
                        break
                    raw = buf.view(raw_dtype).reshape(b - a, spec.volume_elems)
                    self.gather(raw, out[a:b], raw_dtype)
        if failed is not None:
            for v in range(*failed):
                self.read_masked_into(out[v : v + 1], v, v + 1)
        block = max(1, gzindex.INDEXED_READ_BLOCK // max(spec.volume_bytes, 1))
        while (piece := runs.take(r, block)) is not None:
            self.read_masked_into(out[piece[0] : piece[1]], *piece)

    def read_forward_into(self, out: np.ndarray, first: int, n: int) -> None:
        """Fill ``out`` (``(n, n_voxels)``) with masked file volumes ``[first, first + n)``.

        One forward pass of a private reader (:func:`gzindex.open_sequential`), as
        :func:`~neurocube.sources.nifti_load.direct_load` reads a run, when the
        ``.nii.gz`` has a usable index and the span is worth opening a reader
        for (:data:`FORWARD_MIN_BYTES`); else (a ``.nii``, a first read that
        builds the index, a short span, a reader failing on damaged data)
        through :meth:`_read_volume_span`, which verifies and names the damage.
        """
        spec = self.spec
        reader = None
        if spec.gzip is not None and n * spec.volume_bytes >= FORWARD_MIN_BYTES:
            reader = gzindex.open_sequential(
                spec.gzip, spec.vox_offset + first * spec.volume_bytes, spec.volume_layout,
                end=spec.vox_offset + (first + n) * spec.volume_bytes,
            )
        done = 0
        if reader is not None:
            step = max(1, gzindex.SEQUENTIAL_READ_BLOCK // max(spec.volume_bytes, 1))
            scratch = _scratch(step * spec.volume_bytes)
            raw_dtype = np.dtype(spec.dtype)
            with reader:
                while done < n:
                    b = min(n, done + step)
                    buf = scratch[: (b - done) * spec.volume_bytes]
                    try:
                        reader.readinto(memoryview(buf))  # type: ignore[arg-type]
                    except gzindex.SequentialReadError:
                        break  # re-read below through indexed_gzip, which names the damage
                    raw = buf.view(raw_dtype).reshape(b - done, spec.volume_elems)
                    self.gather(raw, out[done:b], raw_dtype)
                    done = b
        if done < n:
            self._read_volume_span(out[done:n], first + done, first + n)

    def _get_grid(self, key: tuple[Any, ...]) -> np.ndarray:
        spec = self.spec
        x, y, z = spec.grid_shape
        if len(spec.shape) == 3:
            raw = spec.read_volumes(0, 1)
            vol = spec.scale(raw).reshape(z, y, x).transpose(2, 1, 0)
            return vol[key[0], key[1], key[2]]
        lo, hi, inner = self._trial_range(key[3], self.n_rows)
        if hi <= lo:
            return np.empty((x, y, z, 0), dtype=self.dtype)[key[0], key[1], key[2]]
        if not isinstance(inner, (int, slice)) and inner.size < hi - lo:
            rows, where = np.unique(inner + lo, return_inverse=True)
            picked = self.select_volumes(rows)[:, :, :, :]
            return picked[key[0], key[1], key[2], where]
        runs = self._volume_runs(lo, hi)
        raws = [spec.read_volumes(first, first + n) for _, first, n in runs]
        raw = raws[0] if len(raws) == 1 else np.concatenate(raws)
        block = spec.scale(raw).reshape(hi - lo, z, y, x).transpose(3, 2, 1, 0)
        return block[key[0], key[1], key[2], inner]


class MaskedVolume:
    """The masked voxels of a 3-D image as a 1-D array ``(n_voxels,)`` (for ``from_array``).

    Wraps the ``(1, n_voxels)`` :class:`VolumeArray` of the image's single
    volume. ``voxels`` is None: it is not a ``(trial, voxel)`` array, so it is
    read through Dask (one small chunk), not by
    :func:`~neurocube.sources.nifti_load.direct_load`.
    """

    voxels = None

    def __init__(self, volumes: VolumeArray) -> None:
        self.volumes = volumes
        self.spec = volumes.spec
        self.shape: tuple[int, ...] = (volumes.shape[1],)
        self.dtype = volumes.dtype
        self.ndim = 1

    def __dask_tokenize__(self) -> Any:
        return ("neurocube.MaskedVolume", self.volumes.__dask_tokenize__())

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        full_key = (0, *tuple(key))
        return self.volumes[full_key]


_THREAD_STATE = threading.local()


class ReadProbe(Protocol):
    """What answers every :class:`VolumeArray` read of a thread inside :func:`probing`."""

    def rows_of(self, arr: VolumeArray, key: tuple[Any, ...]) -> np.ndarray:
        """Return what stands in for ``arr[key]`` (no file is read)."""
        ...


@contextlib.contextmanager
def probing(probe: ReadProbe) -> Iterator[None]:
    """In this block, reads of :class:`VolumeArray` in this thread return ``probe.rows_of``.

    For :func:`neurocube.sources.nifti_rows.trial_rows`, which runs a graph to
    learn which rows it reads; the check of a first pass is skipped too.
    """
    _THREAD_STATE.probe = probe
    try:
        yield
    finally:
        _THREAD_STATE.probe = None


def _verification_deferred() -> bool:
    """Return True inside :func:`_deferred_verification` (reads leave the check to it)."""
    return bool(getattr(_THREAD_STATE, "defer", False))


class _deferred_verification:
    """Reads in this block go through a first-pass stream without finishing it.

    Only the ordered graph of a first read uses this: its chunks are read in
    file order, and its verification task (:func:`verify_after`) finishes
    the pass (CRC32 to the end of the stream) before any chunk is released.
    """

    def __enter__(self) -> None:
        self._old = _verification_deferred()
        _THREAD_STATE.defer = True

    def __exit__(self, *exc: object) -> None:
        _THREAD_STATE.defer = self._old


def _scratch(nbytes: int) -> np.ndarray:
    """Return the calling thread's reusable read buffer, at least ``nbytes`` long."""
    buf: np.ndarray | None = getattr(_THREAD_STATE, "buffer", None)
    if buf is None or buf.nbytes < nbytes:
        buf = np.empty(nbytes, dtype=np.uint8)
        _THREAD_STATE.buffer = buf
    return buf


# --- chunking --------------------------------------------------------------------------------

_SIZE_RE = re.compile(r"^\s*([\d.]+)\s*([kmgt]?i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def _volumes_per_chunk(chunks: Any, spec: NiftiSpec, path: str) -> int:
    """Interpret ``chunks`` as a number of whole volumes per chunk."""
    n = spec.n_volumes
    if chunks is None or chunks == "auto":
        target = DEFAULT_CHUNK_BYTES
    elif isinstance(chunks, dict):
        if set(chunks) - {"trial"}:
            raise ArgumentError(
                f"{path}: chunks={chunks!r}: neurocube chunks NIfTI data along 'trial' only "
                "(whole volumes are the unit of I/O); pass chunks={'trial': n}."
            )
        return _volumes_per_chunk(chunks.get("trial", "auto"), spec, path)
    elif isinstance(chunks, (int, np.integer)) and not isinstance(chunks, bool):
        if chunks == -1:
            return max(n, 1)
        if chunks < 1:
            raise ArgumentError(f"{path}: chunks={chunks}: expected a positive number of volumes")
        return int(min(chunks, max(n, 1)))
    elif isinstance(chunks, str):
        match = _SIZE_RE.match(chunks)
        if not match:
            raise ArgumentError(
                f"{path}: chunks={chunks!r}: expected 'auto', a number of volumes, "
                "{'trial': n} or a size such as '64MiB'"
            )
        target = int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])
    else:
        raise ArgumentError(
            f"{path}: chunks={chunks!r}: expected 'auto', a number of volumes, "
            "{'trial': n} or a size such as '64MiB'"
        )
    per = max(1, target // max(spec.volume_bytes, 1))
    return int(min(per, max(n, 1)))


def _chunk_tuple(n: int, per: int) -> tuple[int, ...]:
    if n == 0:
        return (0,)
    full, rest = divmod(n, per)
    return (per,) * full + ((rest,) if rest else ())


# --- opening -------------------------------------------------------------------------------

def open_nifti(
    path: str | os.PathLike[str],
    *,
    mask: Any = None,
    chunks: Any = "auto",
    index: Any = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    index_store: str | os.PathLike[str] | None = None,
    index_store_options: dict[str, Any] | None = None,
) -> Any:
    """Open a 3-D or 4-D NIfTI file as a lazy, chunked :class:`xarray.Dataset`.

    Only the header (and, with ``mask`` as a path, the mask file) is read;
    voxel data is read when the result is computed, a chunk of whole volumes
    at a time.

    Parameters
    ----------
    path
        A ``.nii`` or ``.nii.gz`` file (NIfTI-1 or NIfTI-2, any byte order): a
        local path or a URL (``s3://bucket/key``, ``https://...``).
    mask
        None for the full grid, or a voxel selection: a boolean array on the
        3-D grid, a flat boolean array in C order over the grid, or the path
        of a NIfTI mask on the same grid (NaN outside, any non-zero inside).
    chunks
        Volumes per chunk: ``"auto"`` (about 32 MiB of voxel data), an int,
        ``{"trial": n}``, or a size such as ``"64MiB"``.
    index
        Gzip random access: ``"auto"`` builds a seek index on the first read
        and stores it in the cache folder, ``False`` always streams, a path
        uses that index file (it must match the file). For a plain ``.nii``
        only the default and the values that name no file are accepted (they
        change nothing); anything else is an
        :class:`~neurocube.errors.ArgumentError`.
    cache_dir
        Where indexes are stored; default ``$NEUROCUBE_CACHE_DIR`` or the
        per-user cache folder.
    storage_options
        For a URL (data and mask): a dict handed to fsspec, e.g.
        ``{"anon": True}`` for a public bucket, or ``{"key": ..., "secret":
        ..., "client_kwargs": {"endpoint_url": ...}}``. Dask workers read with
        it; it never appears in attributes, keys or messages.
    index_store, index_store_options
        A folder or URL where gzip indexes are shared (default
        ``$NEUROCUBE_INDEX_STORE``, none): an index found there is used instead
        of streaming the file, and a new one is put there. Its options default
        to ``storage_options``.

    Returns
    -------
    xarray.Dataset
        Variable ``data`` with dims ``("x", "y", "z", "trial")`` (or
        ``("x", "y", "z")`` for a 3-D image), or ``("trial", "voxel")`` with a
        mask. Voxels are in C order of the grid and carry ``i, j, k`` (grid
        indices) and ``x, y, z`` (scanner mm). Attributes: ``affine``,
        ``grid_shape``, ``source``.

    Raises
    ------
    DataNotFoundError, FormatError, TruncatedFileError, GridMismatchError, IndexMismatchError
        With the file, what was expected and what was found.
    SourceChangedError
        When computed, if the file changed (size or modification time, ETag
        remotely) since it was opened: open it again.

    Examples
    --------
    >>> import numpy as np, nibabel as nib, neurocube, tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "betas.nii.gz")
    >>> nib.Nifti1Image(np.ones((4, 5, 6, 3), np.float32), np.eye(4)).to_filename(p)
    >>> ds = neurocube.open_nifti(p, mask=np.ones((4, 5, 6), bool))
    >>> ds.data.dims, ds.data.shape
    (('trial', 'voxel'), (3, 120))
    >>> float(ds.data.mean())
    1.0
    """
    import xarray as xr  # ``ds.neuro`` comes with it: ``neurocube/__init__.py`` registers it

    parts = build_parts(
        path,
        mask=mask,
        chunks=chunks,
        index=index,
        cache_dir=cache_dir,
        storage_options=storage_options,
        index_store=index_store,
        index_store_options=index_store_options,
    )
    arr = parts.array
    gz = arr.spec.gzip
    if gz is not None and gz.index_path is not None and gz.store is not None:
        gzindex_store.fetch_index(gz)  # an index shared in the store: no first pass over the data
    data = volume_dask_array(arr, parts.chunks, parts.dims, parts.identity)
    return xr.Dataset(
        {"data": (parts.dims, data, parts.variable_attrs())}, coords=parts.coords, attrs=parts.attrs
    )


def volume_dask_array(
    arr: VolumeArray | MaskedVolume,
    chunks: tuple[tuple[int, ...], ...],
    dims: tuple[str, ...],
    identity: tuple[str, int, int | str],
) -> Any:
    """Wrap ``arr`` in a Dask array of whole-volume chunks.

    A ``.gz`` with no index yet is read in file order (one stream, see
    :func:`_streaming_array`); otherwise chunks are independent tasks, and a
    trial selection of them reads only the selected volumes
    (:mod:`neurocube.sources.pushdown`). Masked arrays are registered for
    :func:`~neurocube.sources.nifti_load.direct_load`.
    """
    import dask.array as da
    from dask.base import tokenize

    pushdown.install(VolumeArray, layer_prefix="nifti-", whole_reads=nifti_load)

    name = ("nifti-masked-" if arr.voxels is not None else "nifti-") + tokenize(
        identity, arr, chunks
    )
    meta = np.empty((0,) * len(dims), dtype=arr.dtype)
    gz = arr.spec.gzip
    if gz is not None and not gzindex.has_index(gz):
        data = _streaming_array(arr, chunks, dims, name, meta)
    else:
        data = da.from_array(
            arr, chunks=chunks, name=name, asarray=False, fancy=False, lock=False, meta=meta
        )
    if isinstance(arr, VolumeArray) and arr.voxels is not None:
        register_direct(name, arr, chunks)
    return data


def read_after(arr: VolumeArray, key: tuple[slice, ...], _previous: Any) -> np.ndarray:
    """Read ``arr[key]`` once the previous chunk of the same stream has been read (unverified)."""
    with _deferred_verification():
        return arr[key]


def verify_after(arr: VolumeArray, _last: Any) -> None:
    """Finish and check the first pass the chunks were read from (raises if it fails)."""
    if getattr(_THREAD_STATE, "probe", None) is not None:
        return  # trial_rows() only asks which rows the graph reads
    spec = arr.spec
    if spec.gzip is not None:
        gzindex.ensure_verified(spec.gzip, data_end=spec.data_end, volumes=spec.volume_layout)


def verified(chunk: np.ndarray, _check: Any) -> np.ndarray:
    """Release ``chunk`` once the pass it was read from has been verified."""
    return chunk


def chunk_done(_chunk: Any) -> None:
    """Mark that the chunk this task depends on has been read (returns nothing)."""
    return None


def _streaming_array(
    arr: VolumeArray | MaskedVolume,
    chunks: tuple[tuple[int, ...], ...],
    dims: tuple[str, ...],
    name: str,
    meta: np.ndarray,
) -> Any:
    """Build a Dask array whose chunks are read in file order (a ``.gz`` with no index yet).

    Dask's local schedulers start independent chunk tasks from the *last* one;
    on a gzip stream without seek points that inflates the whole file to reach
    it, and then every other chunk again. Chaining each chunk after a marker of
    the previous one makes the first read one sequential pass, during which the
    seek index is recorded. The array name is the same as the parallel graph's,
    so tokens (and cache keys) do not depend on whether an index existed.
    """
    import dask.array as da
    from dask.highlevelgraph import HighLevelGraph

    trial_axis = dims.index("trial") if "trial" in dims else None
    if trial_axis is None:  # a 3-D image is one chunk: nothing to order
        return da.from_array(arr, chunks=chunks, name=name, asarray=False, fancy=False,
                             lock=False, meta=meta)
    source_key = f"volumes-{name}"
    verify_key = f"verify-{name}"
    graph: dict[Any, Any] = {source_key: arr}
    previous: Any = None
    start = 0
    for idx, size in enumerate(chunks[trial_axis]):
        key_slices = tuple(
            slice(start, start + size) if ax == trial_axis else slice(0, n[0])
            for ax, n in enumerate(chunks)
        )
        block_index = tuple(idx if ax == trial_axis else 0 for ax in range(len(chunks)))
        raw_key = (f"unverified-{name}", *block_index)
        graph[raw_key] = (read_after, source_key, key_slices, previous)
        chunk_key = (name, *block_index)
        graph[chunk_key] = (verified, raw_key, verify_key)
        previous = (f"read-{name}", idx)
        graph[previous] = (chunk_done, raw_key)
        start += size
    graph[verify_key] = (verify_after, source_key, previous)
    hlg = HighLevelGraph.from_collections(name, graph, dependencies=[])
    return da.Array(hlg, name, chunks=chunks, meta=meta)


@dataclass
class NiftiParts:
    """The pieces of an opened NIfTI Dataset before they are wrapped (Dask or xarray-lazy)."""

    info: NiftiInfo
    array: VolumeArray | MaskedVolume
    dims: tuple[str, ...]
    chunks: tuple[tuple[int, ...], ...]
    coords: dict[str, Any]
    attrs: dict[str, Any]
    identity: tuple[str, int, int | str]

    def variable_attrs(self) -> dict[str, Any]:
        """Attributes of the ``data`` variable: what places it (affine, grid) and its files."""
        keep = ("affine", "grid_shape", "source", "mask_source", "neurocube_sources")
        return {name: self.attrs[name] for name in keep if name in self.attrs}


def build_parts(
    path: str | os.PathLike[str],
    *,
    mask: Any = None,
    chunks: Any = "auto",
    index: Any = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    index_store: str | os.PathLike[str] | None = None,
    index_store_options: dict[str, Any] | None = None,
) -> NiftiParts:
    """Read the header (and mask) of ``path``; return lazy array, dims, chunks, coords, attrs."""
    info = read_header(path, storage_options)
    storage.remember_options(info.path, info.storage_options)
    check_index_argument(index, info)
    index_spec = (
        gzip_spec(info, index, cache_dir, index_store, index_store_options)
        if info.compressed
        else None
    )
    spec = NiftiSpec.from_info(info, index_spec)
    identity = (info.path, info.size, info.file_version)
    per = _volumes_per_chunk(chunks, spec, info.path)
    attrs: dict[str, Any] = {
        "affine": info.affine.tolist(),
        "grid_shape": list(info.grid_shape),
        "source": info.path,
        "neurocube_sources": [info.path],
        "nifti_version": info.version,
        "stored_dtype": info.dtype.str,
    }
    if info.slope is not None:
        attrs["scl_slope"] = info.slope
        attrs["scl_inter"] = info.inter
    coords: dict[str, Any] = {}
    if mask is None:
        arr = VolumeArray(spec)
        chunk_spec: tuple[tuple[int, ...], ...] = tuple((s,) for s in info.grid_shape)
        if len(info.shape) == 4:
            dims: tuple[str, ...] = ("x", "y", "z", "trial")
            chunk_spec += (_chunk_tuple(info.n_volumes, per),)
            coords["trial"] = np.arange(info.n_volumes)
        else:
            dims = ("x", "y", "z")
        return NiftiParts(info, arr, dims, chunk_spec, coords, attrs, identity)

    grid = as_mask(mask, info.grid_shape, info.affine, name="mask", data_path=info.path,
                   storage_options=storage_options)
    i, j, k = np.nonzero(grid)  # C order over the grid
    x_n, y_n, _ = info.grid_shape
    fortran_pos = (i + x_n * (j + y_n * k)).astype(np.int64)
    arr = VolumeArray(spec, fortran_pos)
    attrs["n_voxels"] = int(fortran_pos.size)
    if isinstance(mask, (str, os.PathLike)):
        attrs["mask_source"] = storage.normalize(mask)
        attrs["neurocube_sources"] = [info.path, attrs["mask_source"]]
    coords = voxel_coords(grid, info.affine)
    if len(info.shape) == 3:  # a masked map: one value per voxel, no length-1 trial dim
        single = MaskedVolume(arr)
        return NiftiParts(info, single, ("voxel",), ((int(fortran_pos.size),),), coords, attrs,
                          identity)
    chunk_spec = (_chunk_tuple(info.n_volumes, per), (int(fortran_pos.size),))
    coords = {"trial": np.arange(info.n_volumes), **coords}
    return NiftiParts(info, arr, ("trial", "voxel"), chunk_spec, coords, attrs, identity)
