"""NPZ archives read member by member, without ``np.load`` of the whole archive.

An ``.npz`` file is a ZIP archive whose members are ``.npy`` files. This module
parses the ZIP central directory and the ``.npy`` header of each member to learn
every array's shape, dtype and byte position, then reads array data on demand:

- a *stored* member (``np.savez``) is memory-mapped at its data offset;
- a *deflated* member (``np.savez_compressed``) is inflated with :mod:`zlib`
  when a chunk that needs it is computed (one member is one deflate stream, so
  the unit of decompression is the member).

What a task carries is an :class:`NpzMember` (path, offsets, shape, dtype):
a frozen, picklable spec, never an open handle. Members with an object dtype
would need pickle to load; they are refused with :class:`UnsafeDataError`.

Examples
--------
>>> import numpy as np, tempfile, os
>>> folder = tempfile.mkdtemp()
>>> path = os.path.join(folder, "a.npz")
>>> np.savez_compressed(path, x=np.arange(6, dtype="float32").reshape(2, 3))
>>> members = read_npz_directory(path)
>>> members["x"].shape, members["x"].dtype
((2, 3), '<f4')
>>> read_member(members["x"]).tolist()
[[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import struct
import threading
import tokenize
import warnings
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from neurocube import storage
from neurocube.errors import (
    CorruptDataError,
    FormatError,
    SourceChangedError,
    TruncatedFileError,
    UnsafeDataError,
)
from neurocube.storage import IO_STATS, StorageOptions, as_options, is_url, open_file

__all__ = [
    "ZIP_MAGIC",
    "NpzMember",
    "is_zip_file",
    "open_member_memmap",
    "read_member",
    "read_members_into",
    "read_npz_directory",
]

ZIP_MAGIC = b"PK\x03\x04"
_EOCD_SIG = b"PK\x05\x06"
_ZIP64_LOCATOR_SIG = b"PK\x06\x07"
_ZIP64_EOCD_SIG = b"PK\x06\x06"
_CENTRAL_SIG = b"PK\x01\x02"
_NPY_MAGIC = b"\x93NUMPY"
_STORED = 0
_DEFLATED = 8
_EOCD_SIZE = 22
_MAX_COMMENT = 65535
# Files up to this size are read whole in one call while the directory is parsed.
_SMALL_FILE = 8 * 1024
# How much of a member's start is read (and inflated) to parse its .npy header.
_HEADER_PROBE = 1024
# First guess of the tail that holds the end-of-directory record and the directory.
_TAIL_GUESS = 2048


@dataclass(frozen=True)
class NpzMember:
    """Where one array of an NPZ archive lies, and what it is.

    Attributes
    ----------
    path
        Absolute path of the archive, or its URL.
    name
        Array name (the member file name without ``.npy``).
    shape, dtype, fortran_order
        From the member's ``.npy`` header (``dtype`` as a ``numpy`` dtype string).
    compression
        ``0`` (stored) or ``8`` (deflated).
    data_offset
        Absolute offset in the archive of the member's first (compressed) byte.
    compressed_size, uncompressed_size
        Sizes of the member in the archive and once inflated (``.npy`` header included).
    npy_header_size
        Bytes of the ``.npy`` header inside the (uncompressed) member.
    crc32
        CRC-32 of the uncompressed member, from the central directory.
    file_size, version, mtime_ns, ctime_ns
        Size and ETag of a remote archive, or size, mtime and status-change time (ns) of a
        local one, when the directory was read: a changed archive is refused at read time
        (:class:`~neurocube.errors.SourceChangedError`). ``0`` / ``""`` when unknown. The
        ctime tells a rewrite that kept the size and set the mtime back (``os.utime``).
    storage_options
        The options to read a remote archive with (travel to Dask workers;
        their text never shows a secret).
    """

    path: str
    name: str
    shape: tuple[int, ...]
    dtype: str
    fortran_order: bool
    compression: int
    data_offset: int
    compressed_size: int
    uncompressed_size: int
    npy_header_size: int
    crc32: int
    structured_header: bytes = b""
    file_size: int = 0
    version: str = ""
    storage_options: StorageOptions | None = field(default=None, repr=False)
    mtime_ns: int = 0
    ctime_ns: int = 0

    @property
    def is_remote(self) -> bool:
        """True if the archive is an object behind a URL (read by byte ranges)."""
        return is_url(self.path)

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        """The member's dtype (structured dtypes are rebuilt from the saved ``.npy`` header)."""
        if self.structured_header:
            return _dtype_from_header(self.structured_header)
        return np.dtype(self.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of array data (header excluded)."""
        return math.prod(self.shape) * self.numpy_dtype.itemsize

    @property
    def is_stored(self) -> bool:
        """True if the member is stored uncompressed (memory-mappable)."""
        return self.compression == _STORED


@functools.lru_cache(maxsize=256)
def _dtype_from_header(header: bytes) -> np.dtype[Any]:
    return _parse_npy_header(header, "<cached>", "<cached>")[1]


def is_zip_file(
    path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> bool:
    r"""Return True if ``path`` starts with the ZIP local-header magic ``PK\x03\x04``."""
    try:
        if is_url(path):
            head = storage.read_range(str(path), 0, 4, storage_options)
            return head == ZIP_MAGIC
        with open_file(path) as fh:
            head = fh.read(4)
    except (OSError, ValueError):
        return False
    IO_STATS.add_bytes(len(head))
    return head == ZIP_MAGIC


class _Reader:
    """Positional reads from one open file, served from blocks already read when possible.

    The directory parse reads the file's tail and one small block per member; the
    tail usually holds the last (small) members too, and one member's block the
    next small members, so each byte is read from the file at most once. A
    remote archive (``fh`` None) is read by byte ranges through
    :mod:`neurocube.storage`; :meth:`prefetch` fetches several ranges at once.
    """

    def __init__(
        self, fh: Any, path: str, size: int, options: Mapping[str, Any] | None = None
    ) -> None:
        self.fh = fh
        self.path = path
        self.size = size
        self.options = options
        self.blocks: list[tuple[int, bytes]] = []
        if size <= _SMALL_FILE:
            self._raw(0, size)

    def _raw(self, offset: int, length: int) -> bytes:
        if self.fh is None:
            data = storage.read_range(self.path, offset, offset + length, self.options)
        else:
            self.fh.seek(offset)
            data = self.fh.read(length)
            IO_STATS.add_bytes(len(data))
        self.blocks.append((offset, data))
        return data

    def prefetch(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Fetch ``[start, end)`` ranges not yet held (remote: concurrent requests)."""
        todo: list[tuple[int, int]] = []
        for start, end in sorted(ranges):
            start, end = max(0, start), min(self.size, end)
            if end <= start or any(a <= start and end <= a + len(b) for a, b in self.blocks):
                continue
            if todo and start <= todo[-1][1] + _HEADER_PROBE:  # close ranges: one request
                todo[-1] = (todo[-1][0], max(end, todo[-1][1]))
            else:
                todo.append((start, end))
        if not todo:
            return
        if self.fh is not None:
            for start, end in todo:
                self._raw(start, end - start)
            return
        for (start, _), data in zip(
            todo, storage.read_ranges(self.path, todo, self.options), strict=True
        ):
            self.blocks.append((start, data))

    def read_at(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise FormatError(
                f"{self.path}: corrupt ZIP structure (negative offset {offset}); "
                "the NPZ file is damaged, rewrite it."
            )
        length = max(0, min(length, self.size - offset))
        end = offset + length
        for start, block in self.blocks:
            if start <= offset and end <= start + len(block):
                return block[offset - start : end - start]
        return self._raw(offset, length)


def _truncated(path: str, what: str) -> TruncatedFileError:
    return TruncatedFileError(
        f"{path}: not a complete NPZ (ZIP) archive: {what}. The file is probably "
        "truncated or still being written; rewrite it (e.g. with np.savez_compressed)."
    )


def _find_end_of_directory(reader: _Reader) -> tuple[int, int, int]:
    """Return (entry count, central directory size, central directory offset)."""
    tail_len = min(reader.size, _TAIL_GUESS)
    tail_start = reader.size - tail_len
    tail = reader.read_at(tail_start, tail_len)
    pos = tail.rfind(_EOCD_SIG)
    if pos < 0 and tail_len < reader.size:  # a long archive comment: look further back
        tail_len = min(reader.size, _EOCD_SIZE + _MAX_COMMENT)
        tail_start = reader.size - tail_len
        tail = reader.read_at(tail_start, tail_len)
        pos = tail.rfind(_EOCD_SIG)
    if pos < 0 or len(tail) - pos < _EOCD_SIZE:
        raise _truncated(reader.path, "no end-of-central-directory record")
    (_, _, _, on_disk, n_entries, cd_size, cd_offset, _) = struct.unpack(
        "<4sHHHHIIH", tail[pos : pos + _EOCD_SIZE]
    )
    eocd_offset = tail_start + pos
    directory_end = eocd_offset  # the central directory ends where the end record begins
    saturated = n_entries == 0xFFFF or cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF
    # A ZIP64 end record may stand before the end record even when its values fit (Python's
    # zipfile writes one past 65535 members or 4 GiB): its values count, as zipfile reads them.
    if pos >= 20:  # the locator's 20 bytes came with the tail
        locator = tail[pos - 20 : pos]
    else:
        locator = reader.read_at(eocd_offset - 20, 20) if eocd_offset >= 20 else b""
    has_zip64 = len(locator) == 20 and locator[:4] == _ZIP64_LOCATOR_SIG
    if saturated and not has_zip64:
        raise _truncated(reader.path, "ZIP64 locator missing")
    if has_zip64:
        (_, _, z64_offset, _) = struct.unpack("<4sIQI", locator)
        record = reader.read_at(z64_offset, 56)
        if len(record) < 56 or record[:4] != _ZIP64_EOCD_SIG:
            raise _truncated(reader.path, "ZIP64 end-of-directory record missing")
        (_, _, _, _, _, _, on_disk, n_entries, cd_size, cd_offset) = struct.unpack(
            "<4sQHHIIQQQQ", record
        )
        directory_end = z64_offset
    if cd_offset + cd_size > directory_end:
        raise _truncated(
            reader.path,
            f"central directory at {cd_offset}+{cd_size} runs past its end record at "
            f"{directory_end}",
        )
    # the end record carries no CRC: its counts and sizes must agree with the layout
    if cd_offset + cd_size != directory_end or on_disk != n_entries:
        raise FormatError(
            f"{reader.path}: the ZIP end record is inconsistent: expected a central directory "
            f"ending at byte {directory_end} with as many members on this disk as in total, "
            f"found {cd_size} bytes at {cd_offset} and {on_disk} against {n_entries} members. "
            "The archive is damaged: re-download or re-write it."
        )
    return n_entries, cd_size, cd_offset


def _zip64_values(extra: bytes, wanted: list[str]) -> dict[str, int]:
    """Decode the ZIP64 extra field (id 0x0001) for the fields flagged 0xFFFFFFFF."""
    pos = 0
    while pos + 4 <= len(extra):
        header_id, size = struct.unpack("<HH", extra[pos : pos + 4])
        body = extra[pos + 4 : pos + 4 + size]
        if header_id == 0x0001:
            values: dict[str, int] = {}
            for i, name in enumerate(wanted):
                if 8 * (i + 1) > len(body):
                    break
                values[name] = struct.unpack("<Q", body[8 * i : 8 * (i + 1)])[0]
            return values
        pos += 4 + size
    return {}


def _parse_npy_header(
    prefix: bytes, path: str, name: str
) -> tuple[tuple[int, ...], np.dtype[Any], bool, int]:
    """Parse a ``.npy`` header from the first bytes of a member."""
    if len(prefix) < 10 or not prefix.startswith(_NPY_MAGIC):
        raise FormatError(
            f"{path}: member {name!r} is not a .npy array (no \\x93NUMPY magic). "
            "Only NPZ archives written by numpy (np.savez / np.savez_compressed) are supported."
        )
    major = prefix[6]
    if major == 1:
        (header_len,) = struct.unpack("<H", prefix[8:10])
        start = 10
    elif major in (2, 3):
        if len(prefix) < 12:
            raise _truncated(path, f"member {name!r} ends inside its .npy header")
        (header_len,) = struct.unpack("<I", prefix[8:12])
        start = 12
    else:
        raise FormatError(f"{path}: member {name!r} has unsupported .npy format version {major}.")
    if len(prefix) < start + header_len:
        raise _truncated(path, f"member {name!r} ends inside its .npy header")
    try:
        shape, dtype, fortran_order = _decode_header(bytes(prefix[: start + header_len]), major)
    except (ValueError, SyntaxError, tokenize.TokenError) as exc:
        # numpy's parser tokenizes the header: damaged bytes raise what the tokenizer raises
        raise FormatError(f"{path}: member {name!r} has a malformed .npy header: {exc}") from exc
    return shape, dtype, fortran_order, start + header_len


@functools.lru_cache(maxsize=1024)
def _decode_header(header: bytes, major: int) -> tuple[tuple[int, ...], np.dtype[Any], bool]:
    """Decode a whole .npy header (memoised: thousands of artifacts share a few headers)."""
    stream = io.BytesIO(header)
    stream.seek(8)
    # numpy's own header parser (ast.literal_eval of a dict literal; never eval). A damaged
    # header can look like one written by Python 2: numpy warns, the checks below decide.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if major == 1:
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
    return tuple(int(s) for s in shape), dtype, bool(fortran_order)


def _npy_prefix_length(prefix: bytes) -> int | None:
    """Return how many bytes the .npy header needs, or None if that is not known yet."""
    if len(prefix) < 12:
        return None
    if not prefix.startswith(_NPY_MAGIC):
        return 0  # not .npy: let the parser report it
    if prefix[6] == 1:
        return 10 + int(struct.unpack("<H", prefix[8:10])[0])
    return 12 + int(struct.unpack("<I", prefix[8:12])[0])


def _member_prefix(
    reader: _Reader, data_offset: int, csize: int, method: int, first: bytes
) -> bytes:
    """Return the first uncompressed bytes of a member, enough for its .npy header.

    ``first`` holds the member's first (compressed) bytes already read; more are
    read only if the header is longer than they cover.
    """
    raw = first[:csize]
    got = len(raw)
    inflater = zlib.decompressobj(-15) if method == _DEFLATED else None
    out = b""
    try:
        while True:
            pending = b""
            if inflater is not None:
                out += inflater.decompress(inflater.unconsumed_tail + raw, _HEADER_PROBE)
                pending = inflater.unconsumed_tail
            else:
                out += raw
            need = _npy_prefix_length(out)
            if need is not None and len(out) >= need:
                return out
            if pending:  # inflate what was read before reading more
                raw = b""
                continue
            if got >= csize:
                return out
            raw = reader.read_at(data_offset + got, min(csize - got, _HEADER_PROBE))
            if not raw:
                raise _truncated(reader.path, "a member's data runs past the end of the file")
            got += len(raw)
    except zlib.error as exc:
        raise FormatError(
            f"{reader.path}: a deflated member is corrupt ({exc}); "
            "the NPZ file is damaged, rewrite it."
        ) from exc


def read_npz_directory(
    path: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None = None,
    *,
    size: int | None = None,
    version: str | None = None,
) -> dict[str, NpzMember]:
    """Return every array of an NPZ archive as a :class:`NpzMember`, reading headers only.

    Reads the ZIP central directory and, per member, its local header and the
    first few KiB of its data (inflated for deflated members) to parse the
    ``.npy`` header. Array data is not read.

    Parameters
    ----------
    path
        A local ``.npz`` file, or its URL (read by byte ranges: the tail with the
        directory, then every member's first bytes in one round of concurrent
        requests).
    storage_options
        fsspec options for a URL (kept in the members, so Dask workers read with them).
    size, version
        The object's size and ETag when a listing already gave them (no stat then).

    Returns
    -------
    dict
        Array name -> :class:`NpzMember`, in archive order.

    Raises
    ------
    TruncatedFileError
        If the archive ends early (no end-of-directory record, members past EOF).
    FormatError
        If the file is not a ZIP archive, a member is not a ``.npy`` array, or a
        member uses a compression other than stored/deflated, or is encrypted.
    UnsafeDataError
        If a member holds an object dtype (loading it would need pickle).
    """
    remote = is_url(path)
    local = str(path) if remote else os.path.abspath(path)
    opts = as_options(storage_options) if remote else None
    mtime_ns = ctime_ns = 0
    with contextlib.ExitStack() as stack:
        if remote:
            if size is None or version is None:
                meta = storage.info(local, opts)
                size, version = meta.size, meta.etag
            fh = None
        else:
            fh = stack.enter_context(open_file(local))
            fst = os.fstat(fh.fileno())
            size, mtime_ns, ctime_ns = fst.st_size, fst.st_mtime_ns, fst.st_ctime_ns
            version = ""
        if size < _EOCD_SIZE:
            raise _truncated(local, f"only {size} bytes")
        reader = _Reader(fh, local, size, opts)
        if remote:  # the magic and the tail in one round of requests
            reader.prefetch([(0, 4), (max(0, size - _TAIL_GUESS), size)])
        head = reader.read_at(0, 4)
        if head != ZIP_MAGIC:
            raise FormatError(
                f"{local}: not an NPZ file (expected ZIP magic 'PK\\x03\\x04', found {head!r}). "
                "Check the path; NPZ files are written by np.savez / np.savez_compressed."
            )
        n_entries, cd_size, cd_offset = _find_end_of_directory(reader)
        directory = reader.read_at(cd_offset, cd_size)
        if len(directory) < cd_size:
            raise _truncated(local, "central directory cut short")
        members: dict[str, NpzMember] = {}
        if remote:  # every member's local header and first bytes, concurrently
            reader.prefetch(_local_offsets(directory, n_entries, local))
        pos = 0
        for _ in range(n_entries):
            if directory[pos : pos + 4] != _CENTRAL_SIG or pos + 46 > len(directory):
                raise FormatError(
                    f"{local}: corrupt ZIP central directory: expected entry {len(members) + 1} "
                    f"of {n_entries} at byte {pos} of {cd_size}, found "
                    f"{directory[pos : pos + 4]!r}. The archive is damaged: re-download or "
                    "re-write it."
                )
            fields = struct.unpack("<4sHHHHHHIIIHHHHHII", directory[pos : pos + 46])
            flags, method, crc = fields[3], fields[4], fields[7]
            csize, usize = fields[8], fields[9]
            name_len, extra_len, comment_len = fields[10], fields[11], fields[12]
            local_offset = fields[16]
            filename = directory[pos + 46 : pos + 46 + name_len].decode("utf-8", "replace")
            extra = directory[pos + 46 + name_len : pos + 46 + name_len + extra_len]
            pos += 46 + name_len + extra_len + comment_len
            wanted = [
                key
                for key, value in (("usize", usize), ("csize", csize), ("offset", local_offset))
                if value == 0xFFFFFFFF
            ]
            if wanted:
                big = _zip64_values(extra, wanted)
                usize = big.get("usize", usize)
                csize = big.get("csize", csize)
                local_offset = big.get("offset", local_offset)
            if flags & 0x1:
                raise FormatError(f"{local}: member {filename!r} is encrypted; cannot read it.")
            if method not in (_STORED, _DEFLATED):
                raise FormatError(
                    f"{local}: member {filename!r} uses ZIP compression method {method}; "
                    "only stored (0) and deflated (8) members are supported (what numpy writes)."
                )
            block = reader.read_at(local_offset, 30 + 512 + _HEADER_PROBE)
            local_header = block[:30]
            if len(local_header) < 30 or local_header[:4] != ZIP_MAGIC:
                raise _truncated(
                    local, f"member {filename!r} has no local header at {local_offset}"
                )
            lname_len, lextra_len = struct.unpack("<HH", local_header[26:30])
            local_name = block[30 : 30 + lname_len].decode("utf-8", "replace")
            if local_name != filename:  # names carry no CRC: two copies must agree
                raise FormatError(
                    f"{local}: member {filename!r} of the ZIP central directory is named "
                    f"{local_name!r} in its local header: the archive is damaged. Re-download "
                    "or re-write it."
                )
            data_offset = local_offset + 30 + lname_len + lextra_len
            if data_offset + csize > size:
                raise _truncated(
                    local,
                    f"member {filename!r} needs bytes up to {data_offset + csize}, file has {size}",
                )
            name = filename[:-4] if filename.endswith(".npy") else filename
            first = block[data_offset - local_offset :]
            prefix = _member_prefix(reader, data_offset, csize, method, first)
            shape, dtype, fortran, header_size = _parse_npy_header(prefix, local, name)
            if dtype.hasobject:
                raise UnsafeDataError(
                    f"{local}: array {name!r} has an object dtype ({dtype}); loading it would "
                    "unpickle data from the file, which neurocube never does. Rewrite the "
                    "array with a numeric or fixed-width string dtype."
                )
            member = NpzMember(
                path=local,
                name=name,
                shape=shape,
                dtype=dtype.str,
                fortran_order=fortran,
                compression=method,
                data_offset=data_offset,
                compressed_size=csize,
                uncompressed_size=usize,
                npy_header_size=header_size,
                crc32=crc,
                structured_header=b"" if np.dtype(dtype.str) == dtype else prefix[:header_size],
                file_size=size,
                version=version or "",
                storage_options=opts,
                mtime_ns=0 if remote else mtime_ns,
                ctime_ns=0 if remote else ctime_ns,
            )
            if usize != header_size + member.nbytes:
                raise FormatError(
                    f"{local}: array {name!r} announces shape {shape} of {dtype} "
                    f"({member.nbytes} bytes) but its member holds {usize - header_size} bytes "
                    "of data; the file is damaged, rewrite it."
                )
            members[name] = member
        if pos != cd_size:  # the count in the end record carries no CRC: the sizes must agree
            raise FormatError(
                f"{local}: the ZIP end record announces {n_entries} members in a central "
                f"directory of {cd_size} bytes, but those members fill {pos} bytes: the archive "
                "is damaged. Re-download or re-write it."
            )
    return members


def _local_offsets(directory: bytes, n_entries: int, path: str) -> list[tuple[int, int]]:
    """Return the byte ranges holding each member's local header and first bytes."""
    out = []
    pos = 0
    for _ in range(n_entries):
        if directory[pos : pos + 4] != _CENTRAL_SIG or len(directory) < pos + 46:
            break  # reported by the full parse
        fields = struct.unpack("<4sHHHHHHIIIHHHHHII", directory[pos : pos + 46])
        name_len, extra_len, comment_len, offset = fields[10], fields[11], fields[12], fields[16]
        if offset == 0xFFFFFFFF:
            extra = directory[pos + 46 + name_len : pos + 46 + name_len + extra_len]
            wanted = [k for k, v in (("usize", fields[9]), ("csize", fields[8]),
                                     ("offset", offset)) if v == 0xFFFFFFFF]
            offset = _zip64_values(extra, wanted).get("offset", offset)
        out.append((offset, offset + 30 + 512 + _HEADER_PROBE))
        pos += 46 + name_len + extra_len + comment_len
    return out


def open_member_memmap(member: NpzMember) -> np.memmap[Any, Any] | np.ndarray:
    """Memory-map a stored (uncompressed) member, read-only.

    A member of a remote archive cannot be mapped: it is read (one range
    request) into memory and returned as a read-only array.

    A mapping is not checked against the member's CRC-32 (its bytes are read later, page
    by page); :func:`read_member` and :func:`read_members_into` check it. The archive's
    size, mtime and ctime are compared with those of the directory when it is mapped.

    Raises
    ------
    FormatError
        If the member is deflated (it cannot be mapped; use :func:`read_member`).
    SourceChangedError
        If the archive changed since its directory was read.
    """
    if not member.is_stored:
        raise FormatError(
            f"{member.path}: array {member.name!r} is deflated (np.savez_compressed) and "
            "cannot be memory-mapped; read it with read_member()."
        )
    if member.is_remote:
        arr = read_member(member)
        arr.flags.writeable = False
        return arr
    with open_file(member.path) as fh:
        _check_local_unchanged(member, fh)
        mapped = np.memmap(
            fh,
            dtype=member.numpy_dtype,
            mode="r",
            offset=member.data_offset + member.npy_header_size,
            shape=member.shape,
            order="F" if member.fortran_order else "C",
        )
    return mapped


def _inflate(member: NpzMember, fh: Any) -> bytes:
    """Read a deflated member from an open archive and inflate it, checking size and CRC."""
    fh.seek(member.data_offset)
    raw = fh.read(member.compressed_size)
    IO_STATS.add_bytes(len(raw))
    return _check_member(member, raw)


def _check_local_unchanged(member: NpzMember, fh: Any) -> None:
    """Refuse an archive that changed since its directory was read (one fstat).

    Size and mtime, then the ctime, as :func:`neurocube.storage.check_unchanged` compares
    them, but on the open file itself: an archive replaced by rename after ``fh`` was
    opened leaves ``fh`` on the version whose directory was read. The ZIP CRC-32 of every
    member read is a second check (:func:`_fill`); it would report such a rewrite as
    damage, this names it as a change.
    """
    if not member.mtime_ns:
        return
    st = os.fstat(fh.fileno())
    if (st.st_size, st.st_mtime_ns) != (member.file_size, member.mtime_ns):
        raise SourceChangedError(
            f"{member.path}: changed since it was opened (then {member.file_size} bytes, "
            f"mtime {member.mtime_ns}; now {st.st_size} bytes, mtime {st.st_mtime_ns}). "
            "Values read now could mix two versions: open it again."
        )
    if member.ctime_ns and st.st_ctime_ns != member.ctime_ns:
        raise SourceChangedError(
            f"{member.path}: changed since it was opened (then ctime {member.ctime_ns} ns; now "
            f"ctime {st.st_ctime_ns} ns, with {st.st_size} bytes and mtime {st.st_mtime_ns}: "
            "rewritten, even if its size and mtime look the same). Values read now could mix "
            "two versions: open it again."
        )


def _fill(member: NpzMember, fh: Any, out: np.ndarray) -> None:
    """Read the whole of ``member`` into ``out`` (C-ordered, shape ``member.shape``).

    Every member is checked against the CRC-32 of the ZIP directory before ``out`` is
    returned to the caller: a deflated one after inflating it, a stored one over the
    bytes read (straight into ``out`` when its layout allows, so without a copy).
    """
    dtype = member.numpy_dtype
    if not member.is_stored:
        _place(member, _inflate(member, fh), out)
        return
    direct = (
        out.flags.c_contiguous
        and out.dtype == dtype
        and out.shape == member.shape
        and (not member.fortran_order or out.ndim <= 1)
        and not dtype.hasobject
    )
    if not direct:
        fh.seek(member.data_offset)
        raw = fh.read(member.compressed_size)
        IO_STATS.add_bytes(len(raw))
        _place(member, _check_member(member, raw), out)
        return
    fh.seek(member.data_offset)
    header = fh.read(member.npy_header_size)
    view = memoryview(out.reshape(-1).view(np.uint8).data) if out.size else memoryview(b"")
    got = fh.readinto(view) if len(view) else 0
    IO_STATS.add_bytes(len(header) + (got or 0))
    if len(header) + (got or 0) != member.uncompressed_size:
        raise _truncated(member.path, f"array {member.name!r} is cut short")
    if zlib.crc32(view, zlib.crc32(header)) != member.crc32:
        raise _crc_failed(member, member.uncompressed_size)


def _crc_failed(member: NpzMember, n: int) -> CorruptDataError:
    return CorruptDataError(
        f"{member.path}: array {member.name!r} fails its ZIP CRC-32 check ({n} bytes read, "
        f"{member.uncompressed_size} expected, CRC {member.crc32:#010x} expected); the NPZ "
        "file is damaged or changed. Its values are not returned: restore or rewrite it."
    )


def _check_member(member: NpzMember, data: bytes) -> bytes:
    """Return the uncompressed bytes of a member from its raw bytes, checking size and CRC."""
    if len(data) < member.compressed_size:
        raise _truncated(member.path, f"array {member.name!r} is cut short")
    if not member.is_stored:
        try:
            data = zlib.decompress(data, -15, member.uncompressed_size)
        except zlib.error as exc:
            raise CorruptDataError(
                f"{member.path}: array {member.name!r} does not inflate ({exc}); "
                "the NPZ file is damaged, restore or rewrite it."
            ) from exc
    if len(data) != member.uncompressed_size or zlib.crc32(data) != member.crc32:
        raise _crc_failed(member, len(data))
    return data


def _fetch_remote(members: Sequence[NpzMember]) -> list[bytes]:
    """Fetch the whole (compressed) bytes of remote members: one concurrent request each."""
    for member in {(m.path, m.file_size, m.version, m.storage_options): m
                   for m in members}.values():
        if member.version:
            storage.check_unchanged(member.path, member.storage_options, member.file_size,
                                    member.version)
    ranges = [(m.data_offset, m.data_offset + m.compressed_size) for m in members]
    if len(members) == 1:
        m = members[0]
        return [storage.read_range(m.path, ranges[0][0], ranges[0][1], m.storage_options)]
    return list(_remote_pool().map(
        lambda item: storage.read_range(item[0].path, item[1][0], item[1][1],
                                        item[0].storage_options),
        zip(members, ranges, strict=True),
    ))


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _remote_pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(storage.FETCH_THREADS, thread_name_prefix="neurocube-npz")
        return _POOL


def _fill_from_bytes(member: NpzMember, raw: bytes, out: np.ndarray) -> None:
    """Fill ``out`` from a member's raw (stored or deflated) bytes, CRC checked."""
    _place(member, _check_member(member, raw), out)


def _place(member: NpzMember, data: bytes, out: np.ndarray) -> None:
    """Fill ``out`` from a member's uncompressed ``.npy`` bytes (header included)."""
    order: Literal["C", "F"] = "F" if member.fortran_order else "C"
    flat = np.frombuffer(data, dtype=member.numpy_dtype, count=math.prod(member.shape),
                         offset=member.npy_header_size)
    out[...] = flat.reshape(member.shape, order=order)


def read_member(member: NpzMember) -> np.ndarray:
    """Read one member whole into a new (native byte order, C-ordered) array."""
    out = np.empty(member.shape, dtype=member.numpy_dtype.newbyteorder("="))
    if member.is_remote:
        _fill_from_bytes(member, _fetch_remote([member])[0], out)
        return out
    with open_file(member.path) as fh:
        _check_local_unchanged(member, fh)
        _fill(member, fh, out)
    return out


def read_members_into(
    members: Sequence[NpzMember], out: np.ndarray, *, stack: bool = False
) -> np.ndarray:
    """Read several members (one per file) into consecutive rows of ``out``.

    Parameters
    ----------
    members
        Specs to read, in order.
    out
        Preallocated output. With ``stack=False`` each member's first axis fills
        the next ``member.shape[0]`` rows; with ``stack=True`` each member fills
        one row (``out[i] = member``).
    stack
        See above.

    Returns
    -------
    numpy.ndarray
        ``out``.
    """
    remote = [m for m in members if m.is_remote]
    fetched = dict(zip((id(m) for m in remote), _fetch_remote(remote), strict=True)) if remote \
        else {}
    row = 0
    for member in members:
        if member.is_remote:
            n = 1 if stack else member.shape[0]
            target = out[row] if stack else out[row : row + n]
            _fill_from_bytes(member, fetched[id(member)], target)
            row += n
            continue
        with open_file(member.path) as fh:
            _check_local_unchanged(member, fh)
            if stack:
                _fill(member, fh, out[row])
                row += 1
            else:
                n = member.shape[0]
                _fill(member, fh, out[row : row + n])
                row += n
    return out
