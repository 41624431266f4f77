"""The header of a NIfTI-1/NIfTI-2 file, read and checked before any voxel is.

:func:`read_header` fetches only the first bytes of a ``.nii`` or ``.nii.gz``
(one small range of a remote object), inflating just enough of a gzip stream
to see the header, and turns them into a :class:`NiftiInfo` of plain values.
Fields that cannot describe an image are refused here, from the raw bytes,
before nibabel parses them and before anything is allocated for the declared
shape: impossible dimensions or datatype codes, a data offset inside the
header, scaling that overflows the output type, and a gzip file declaring
more image than deflate can produce from its size. :class:`VolumeGeometry`
derives sizes and offsets from shape, dtype and scaling, for the header and
for the reader's spec alike. Nothing here knows about chunks or Dask.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from neurocube import storage
from neurocube.errors import (
    ArgumentError,
    FormatError,
    NeurocubeError,
    TruncatedFileError,
)
from neurocube.sources.deflate import DEFLATE_MAX_RATIO  # also importable from here
from neurocube.storage import StorageOptions

__all__ = ["NiftiInfo", "VolumeGeometry", "read_header", "sniff_nifti"]

GZIP_MAGIC = b"\x1f\x8b"


class VolumeGeometry:
    """Sizes and offsets from a NIfTI's shape, dtype and scaling (header and spec share them)."""

    shape: tuple[int, ...]
    dtype: Any  # np.dtype or its string
    vox_offset: int
    slope: float | None
    inter: float | None

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """The spatial grid ``(X, Y, Z)``."""
        return (self.shape[0], self.shape[1], self.shape[2])

    @property
    def n_volumes(self) -> int:
        """Number of volumes (1 for a 3-D image)."""
        return self.shape[3] if len(self.shape) == 4 else 1

    @property
    def volume_elems(self) -> int:
        """Voxels in one volume (a Python int: a damaged header's product never overflows)."""
        return math.prod(int(n) for n in self.grid_shape)

    @property
    def volume_bytes(self) -> int:
        """Bytes of one volume on disk."""
        return self.volume_elems * np.dtype(self.dtype).itemsize

    @property
    def data_end(self) -> int:
        """Offset just past the last voxel byte."""
        return self.vox_offset + self.volume_bytes * self.n_volumes

    @property
    def out_dtype(self) -> np.dtype:
        """The dtype of values after scaling (native byte order)."""
        return _output_dtype(np.dtype(self.dtype), self.slope, self.inter)


@dataclass(frozen=True)
class NiftiInfo(VolumeGeometry):
    """What a NIfTI header says, in plain Python values.

    Attributes
    ----------
    path
        Absolute path of the file.
    version
        1 or 2.
    shape
        Spatial grid plus trials: ``(X, Y, Z)`` or ``(X, Y, Z, T)``.
    dtype
        On-disk dtype, with its byte order.
    vox_offset
        Byte offset of the first voxel (after the header and extensions).
    slope, inter
        Scaling to apply (``value * slope + inter``); ``None`` when the header
        asks for none.
    affine
        4x4 voxel-to-scanner (mm) transform (sform, else qform, else pixdim).
    compressed
        True for a gzip file.
    """

    path: str
    version: int
    shape: tuple[int, ...]
    dtype: np.dtype
    vox_offset: int
    slope: float | None
    inter: float | None
    affine: np.ndarray = field(compare=False)
    compressed: bool
    size: int = 0
    file_version: int | str = 0  # mtime_ns of a local file, ETag of an object
    storage_options: StorageOptions | None = None
    ctime_ns: int = 0  # a local file's status-change time when opened (0: an object)


def _output_dtype(stored: np.dtype, slope: float | None, inter: float | None) -> np.dtype:
    native = stored.newbyteorder("=")
    if slope is None and inter is None:
        return native
    if native.kind == "f" and native.itemsize >= 8:
        return np.dtype(np.float64)
    if native.kind in "iu" and native.itemsize >= 4:
        return np.dtype(np.float64)
    return np.dtype(np.float32)


HEADER_BLOCK = 64 << 10  # what a header read fetches of a remote file: one small range


def _read_prefix(
    path: str, n: int, storage_options: StorageOptions | None = None, size: int | None = None
) -> tuple[bytes, bool]:
    """Return the first ``n`` uncompressed bytes of ``path`` and whether it is gzip.

    A remote file costs one range request of :data:`HEADER_BLOCK` bytes
    (more only for a header that does not fit, which NIfTI's never do).
    """
    import zlib

    def fetch(offset: int) -> bytes:
        end = offset + HEADER_BLOCK if size is None else min(size, offset + HEADER_BLOCK)
        if storage.is_local(path):  # header bytes are not voxel data: IO_STATS does not count them
            with storage.open_file(path) as fh:
                fh.seek(offset)
                data: bytes = fh.read(end - offset)
            return data
        return storage.read_range(path, offset, end, storage_options)

    first = fetch(0)
    if first[:2] != GZIP_MAGIC:
        return first[:n], False
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = b""
    block, offset = first, len(first)
    while True:
        try:
            out += inflater.decompress(block, n - len(out))
        except zlib.error as exc:
            raise FormatError(
                f"{path}: starts like a gzip file but cannot be decompressed ({exc}). "
                "The file is corrupt: re-download it."
            ) from exc
        if len(out) >= n or inflater.eof or not block:
            return out, True
        if inflater.unconsumed_tail:
            block = inflater.unconsumed_tail
            continue
        block = fetch(offset)
        offset += len(block)


def sniff_nifti(
    path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> int | None:
    """Return 1 or 2 if ``path`` holds a NIfTI-1/NIfTI-2 header (gzip or not), else None.

    Checks ``sizeof_hdr`` (348 or 540, either byte order) and the magic
    string, not the suffix.
    """
    try:
        head, _ = _read_prefix(storage.normalize(path), 544, storage.as_options(storage_options))
    except (OSError, NeurocubeError):
        return None
    return _version_from_bytes(head)


def _version_from_bytes(head: bytes) -> int | None:
    if len(head) < 348:
        return None
    for order in "<>":
        (size,) = struct.unpack(order + "i", head[:4])
        if size == 348 and head[344:347] in (b"n+1", b"ni1"):
            return 1
        if size == 540 and len(head) >= 540 and head[4:7] in (b"n+2", b"ni2"):
            return 2
    return None


def read_header(
    path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> NiftiInfo:
    """Read the header of a NIfTI file or object (only the header bytes).

    ``path`` is a local path or a URL (``s3://``, ``https://``, ...) read
    with ``storage_options``; a remote file costs a stat and one small range.

    Raises
    ------
    DataNotFoundError
        If the file does not exist.
    FormatError
        If it is not NIfTI-1/NIfTI-2 (by magic bytes), or is a ``.hdr/.img``
        pair, or has an unsupported shape; if a header field cannot describe an
        image (an unknown datatype code, ``dim[0]`` outside 1..7, a dimension
        below 1, a NaN or too small ``vox_offset``, a non-finite ``scl_inter``
        with a valid ``scl_slope``); if a ``.nii.gz`` declares more image than
        its size can inflate to
        (:data:`~neurocube.sources.deflate.DEFLATE_MAX_RATIO`). Nothing is
        allocated for the declared shape before these checks.
    TruncatedFileError
        If an uncompressed file is shorter than its header says.
    ArgumentError
        If ``path`` is not a path or URL.
    """
    import nibabel as nib

    if not isinstance(path, (str, os.PathLike)):
        raise ArgumentError(
            f"expected the path or URL of a .nii/.nii.gz file, found {type(path).__name__}: "
            f"{path!r}"
        )
    options = storage.as_options(storage_options)
    spath = storage.normalize(path)
    meta = storage.info(spath, options)
    if meta.is_dir:
        raise FormatError(f"{spath}: a folder, expected a .nii or .nii.gz image")
    head, compressed = _read_prefix(spath, 544, options, meta.size)
    version = _version_from_bytes(head)
    if version is None:
        what = "a gzip file whose content" if compressed else "a file that"
        raise FormatError(
            f"{spath}: {what} is not NIfTI: expected sizeof_hdr 348 (NIfTI-1) or 540 (NIfTI-2) "
            f"with the 'n+1'/'n+2' magic, found first bytes {head[:8]!r}. Is this the right file?"
        )
    _check_header_fields(spath, head, version)
    header_cls = nib.Nifti1Header if version == 1 else nib.Nifti2Header
    hdr_size = 348 if version == 1 else 540
    # Extensions are skipped (their bytes lie before vox_offset): clear the extension flag so
    # the header parser does not look for them in the prefix read here.
    head = head[:hdr_size] + b"\0\0\0\0"
    try:
        hdr = header_cls.from_fileobj(_BytesReader(head), check=False)
    except Exception as exc:  # nibabel raises a variety of errors on bad headers
        raise FormatError(f"{spath}: the NIfTI-{version} header cannot be parsed: {exc}") from exc
    if hdr["magic"].item() in (b"ni1", b"ni2"):
        raise FormatError(
            f"{spath}: a NIfTI '.hdr/.img' pair header (magic 'ni{version}'); neurocube reads "
            "single-file NIfTI (.nii/.nii.gz). Convert it with nibabel: "
            "nib.save(nib.load(hdr_path), 'out.nii.gz')."
        )
    shape = tuple(int(s) for s in hdr.get_data_shape())
    while len(shape) > 4 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 3:
        shape = shape + (1,) * (3 - len(shape))
    if len(shape) > 4:
        raise FormatError(
            f"{spath}: a {len(shape)}-D image of shape {shape}; neurocube expects 3-D (x, y, z) "
            "or 4-D (x, y, z, trial) images."
        )
    if len(shape) == 4 and shape[3] == 1:
        shape = shape  # a 4-D image with one volume stays 4-D
    dtype = hdr.get_data_dtype()
    if dtype.kind not in "iuf" or dtype.fields is not None:
        raise FormatError(
            f"{spath}: voxel type {dtype} is not supported (expected integer or float voxels)."
        )
    try:
        slope, inter = hdr.get_slope_inter()
    except nib.spatialimages.HeaderDataError as exc:  # a valid scl_slope with a NaN/inf scl_inter
        raise FormatError(
            f"{spath}: the header's scaling cannot be applied: {exc} (scl_slope "
            f"{hdr['scl_slope'].item()}, scl_inter {hdr['scl_inter'].item()}); expected a finite "
            "scl_inter whenever scl_slope is a finite non-zero number. The header is damaged: "
            "re-download or re-write the file."
        ) from exc
    if slope is not None and (not math.isfinite(slope) or slope == 0):
        slope = None
    if inter is not None and not math.isfinite(inter):
        inter = None
    if slope is None and inter is not None and inter != 0:
        slope = 1.0
    if slope == 1.0 and (inter is None or inter == 0):
        slope = inter = None
    if slope is not None and inter is None:
        inter = 0.0
    _check_scaled_range(spath, dtype, slope, inter)
    try:
        affine = np.asarray(hdr.get_best_affine(), dtype=np.float64)
    except ValueError as exc:  # nibabel: a qform quaternion whose b, c, d exceed unit length
        raise FormatError(
            f"{spath}: the header's orientation cannot be computed: {exc} (qform_code "
            f"{hdr['qform_code'].item()}, quatern_b/c/d {hdr['quatern_b'].item()}, "
            f"{hdr['quatern_c'].item()}, {hdr['quatern_d'].item()}); expected a rotation "
            "quaternion with b^2 + c^2 + d^2 <= 1. The header is damaged: re-download or "
            "re-write the file."
        ) from exc
    info = NiftiInfo(
        path=spath,
        version=version,
        shape=shape,
        dtype=dtype,
        vox_offset=int(hdr.get_data_offset()),
        slope=None if slope is None else float(slope),
        inter=None if inter is None else float(inter),
        affine=affine,
        compressed=compressed,
        size=meta.size,
        file_version=meta.mtime_ns if storage.is_local(spath) else meta.etag,
        storage_options=options,
        ctime_ns=meta.ctime_ns if storage.is_local(spath) else 0,
    )
    _check_declared_size(info)
    if not compressed:
        size = meta.size
        if size < info.data_end:
            complete = max(0, (size - info.vox_offset) // info.volume_bytes)
            raise TruncatedFileError(
                f"{spath}: the file has {size} bytes but its header promises {info.data_end} "
                f"({info.n_volumes} volumes of {info.volume_bytes} bytes from offset "
                f"{info.vox_offset}); volume {complete} onwards cannot be read. The file is "
                "truncated: re-download or re-write it."
            )
    return info


# NIfTI-1 / NIfTI-2 field layout: (dim offset, dim format, datatype offset, vox_offset offset,
# vox_offset format); both keep the 4 extension-flag bytes right after the header.
_FIELDS = {1: (40, "8h", 70, 108, "f"), 2: (16, "8q", 12, 168, "q")}


def _check_header_fields(path: str, head: bytes, version: int) -> None:
    """Refuse a header whose shape, datatype or data offset cannot describe an image.

    Read from the raw bytes (in the byte order ``sizeof_hdr`` gives) before nibabel parses
    them: nibabel guesses the byte order from ``dim[0]`` and fails on these with a
    ``KeyError`` or an overflow, or accepts them (a zero or negative dimension).
    """
    import nibabel as nib

    order = "<" if struct.unpack_from("<i", head, 0)[0] in (348, 540) else ">"
    dim_at, dim_fmt, dtype_at, off_at, off_fmt = _FIELDS[version]
    dim = struct.unpack_from(order + dim_fmt, head, dim_at)
    (code,) = struct.unpack_from(order + "h", head, dtype_at)
    (vox_offset,) = struct.unpack_from(order + off_fmt, head, off_at)
    damaged = "The header is damaged: re-download or re-write the file."
    if not 1 <= dim[0] <= 7:
        raise FormatError(
            f"{path}: dim[0] (the number of dimensions) is {dim[0]}; expected 1 to 7. {damaged}"
        )
    sizes = dim[1 : dim[0] + 1]
    if any(n < 1 for n in sizes):
        raise FormatError(
            f"{path}: the header declares dimensions {tuple(sizes)}; expected every dimension "
            f"to be at least 1. {damaged}"
        )
    try:
        nib.nifti1.data_type_codes.dtype[code]
    except KeyError:
        raise FormatError(
            f"{path}: datatype code {code} is not a NIfTI datatype (expected e.g. 2 uint8, "
            f"4 int16, 8 int32, 16 float32, 64 float64, 256 int8, 512 uint16). {damaged}"
        ) from None
    first = 352 if version == 1 else 544  # header + extension flag
    if not math.isfinite(vox_offset) or vox_offset < first:
        raise FormatError(
            f"{path}: vox_offset (where the voxel data starts) is {vox_offset}; expected a byte "
            f"offset of at least {first}, just past the NIfTI-{version} header. {damaged}"
        )


def _check_scaled_range(
    path: str, stored: np.dtype, slope: float | None, inter: float | None
) -> None:
    """Refuse scaling that takes an integer type's range beyond the output dtype.

    Found by a byte-by-byte header scan: one flipped exponent bit makes an int16 file's
    ``scl_slope`` of 0.5 into 1.7e38; scaled in float32 the voxels became ``inf`` where
    nibabel (float64) reads finite numbers. No real image is scaled like that. Float voxels
    are not checked: their range is only known from the data.
    """
    if slope is None or stored.kind not in "iu":
        return
    out = _output_dtype(stored, slope, inter)
    limits = np.iinfo(stored)
    reach = abs(slope) * max(abs(int(limits.min)), int(limits.max)) + abs(inter or 0.0)
    top = float(np.finfo(out).max)
    if not reach <= top:
        raise FormatError(
            f"{path}: scl_slope {slope:g} and scl_inter {inter:g} scale {stored.name} voxels "
            f"(range {limits.min}..{limits.max}) up to {reach:g}; expected values that fit "
            f"{out.name} (at most {top:g}). The header is damaged: re-download or re-write the "
            "file."
        )


def _check_declared_size(info: NiftiInfo) -> None:
    """Refuse a ``.nii.gz`` declaring more image than its compressed bytes can inflate to.

    Checked at open, before anything is allocated for the declared shape (a 1 KB file can
    declare 32767^4 voxels). A ``.nii`` is checked against its size by the caller.
    """
    if not info.compressed:
        return
    limit = info.size * DEFLATE_MAX_RATIO
    if info.data_end > limit:
        raise FormatError(
            f"{info.path}: the header declares {info.data_end} bytes of image (shape "
            f"{info.shape}, {info.dtype}, data from byte {info.vox_offset}), but a gzip file of "
            f"{info.size} bytes inflates to at most {limit} (deflate's maximum ratio is "
            f"{DEFLATE_MAX_RATIO}:1). The header is damaged or the file is truncated: "
            "re-download or re-write it."
        )


class _BytesReader:
    """A minimal file object over bytes, for nibabel's header parser."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else self._pos + n
        out = self._data[self._pos : end]
        self._pos += len(out)
        return out

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: len(self._data)}[whence]
        self._pos = base + pos
        return self._pos
