"""Refuse damaged HDF5 metadata before any value of the file is read.

Most HDF5 files carry no checksum over their metadata, and h5py trusts what that metadata
says: a flipped bit in a datatype message reads floats with another exponent bias, a
damaged dataspace declares far more data than was ever written, a moved chunk address points
at another dataset's bytes, a repeated name in a group's name heap hands out one member's
values for two, and some damaged string types crash the whole process when h5py reads them.
The functions here look at that metadata first (datatypes, attribute types, declared sizes
against stored bytes, where each dataset's bytes lie, group member names and links) and turn
what they find into a :class:`~neurocube.errors.FormatError` that names the file, the object
and what to do. :func:`read_errors` and :func:`structure_errors` do the same for the errors
h5py raises while values or structure are then read (a failed fletcher32 or Adler-32 check
becomes a :class:`~neurocube.errors.CorruptDataError`).

The readers in :mod:`neurocube.sources.hdf5` and the HDF5 layouts in
:mod:`neurocube.datasets` call these checks; this module does not import either of them.
"""

from __future__ import annotations

import contextlib
import os
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import h5py
import numpy as np

from neurocube.errors import CorruptDataError, FormatError, NeurocubeError
from neurocube.sources.deflate import DEFLATE_MAX_RATIO
from neurocube.storage import is_local

__all__ = [
    "DECLARED_SLACK_BYTES",
    "DEFLATE_MAX_RATIO",
    "DIRECT_BATCH_BYTES",
    "check_attribute_types",
    "check_declared_size",
    "check_storage",
    "check_type",
    "member",
    "read_errors",
    "structure_errors",
    "type_problem",
    "unique_names",
]

#: Stored chunk bytes copied per turn of the handle's lock (bounds the extra memory); also
#: the largest chunk :func:`check_storage` inflates to check the chunk shape.
DIRECT_BATCH_BYTES = 16 * 2**20

#: A declared dataset at most this large is never refused for its size (fill values are legal).
DECLARED_SLACK_BYTES = 1 << 20

#: Filters whose output is never more than deflate's ratio smaller than their input.
_BOUNDED_FILTERS = frozenset({
    h5py.h5z.FILTER_DEFLATE, h5py.h5z.FILTER_SHUFFLE, h5py.h5z.FILTER_FLETCHER32,
    h5py.h5z.FILTER_SCALEOFFSET, h5py.h5z.FILTER_NBIT, h5py.h5z.FILTER_SZIP,
})  # fmt: skip


def _filters(dset: h5py.Dataset) -> list[int]:
    try:
        plist = dset.id.get_create_plist()
        return [int(plist.get_filter(i)[0]) for i in range(plist.get_nfilters())]
    except (RuntimeError, OSError, ValueError):
        return []


#: The floating-point types numpy can hold exactly: HDF5 converts any other float layout (a
#: changed exponent bias, mantissa size or normalisation) into these without complaint.
_IEEE_FLOATS = (
    *(
        getattr(h5py.h5t, f"IEEE_F{bits}{order}")
        for bits in (16, 32, 64)
        for order in ("LE", "BE")
        if hasattr(h5py.h5t, f"IEEE_F{bits}{order}")
    ),
    h5py.h5t.NATIVE_LDOUBLE,
)

#: String encodings HDF5 defines (ASCII, UTF-8).
_STRING_CSETS = (h5py.h5t.CSET_ASCII, h5py.h5t.CSET_UTF8)


def type_problem(tid: Any, *, sequences: bool = True) -> str | None:
    """Say what is wrong with an HDF5 datatype, or return None if numpy can hold it exactly.

    Refused: floats that are not IEEE 754 (as a damaged exponent bias, mantissa or sign
    field reads), integers whose precision or bit offset do not fill their bytes, strings in
    an encoding HDF5 does not define, and (``sequences=False``) variable-length sequences,
    which h5py reads from a damaged string type by crashing the process. Enums, arrays and
    compounds are checked member by member.
    """
    cls = tid.get_class()
    if cls == h5py.h5t.FLOAT:
        if any(tid.equal(std) for std in _IEEE_FLOATS):
            return None
        sign, epos, esize, mpos, msize = tid.get_fields()
        return (
            f"a {tid.get_size()}-byte float that is not IEEE 754 (sign bit {sign}, exponent "
            f"{esize} bits at {epos}, bias {tid.get_ebias()}, mantissa {msize} bits at {mpos})"
        )
    if cls == h5py.h5t.INTEGER:
        if tid.get_precision() != 8 * tid.get_size() or tid.get_offset() != 0:
            return (
                f"a {tid.get_size()}-byte integer of {tid.get_precision()} bits at bit "
                f"{tid.get_offset()}"
            )
        return None
    if cls == h5py.h5t.STRING:
        if tid.get_cset() not in _STRING_CSETS:
            return f"a string in encoding {tid.get_cset()} (HDF5 defines 0 ASCII and 1 UTF-8)"
        return None
    if cls in (h5py.h5t.ENUM, h5py.h5t.ARRAY):
        return type_problem(tid.get_super(), sequences=sequences)
    if cls == h5py.h5t.COMPOUND:
        for index in range(tid.get_nmembers()):
            problem = type_problem(tid.get_member_type(index), sequences=sequences)
            if problem:
                return f"a compound whose member {index} is {problem}"
        return None
    if cls == h5py.h5t.VLEN:
        if not sequences:
            return "a variable-length sequence (expected strings, numbers or arrays of them)"
        return type_problem(tid.get_super(), sequences=sequences)
    return None


def check_type(
    tid: Any, path: str, what: str, *, sequences: bool = True, context: str = ""
) -> None:
    """Raise a :class:`~neurocube.errors.FormatError` if :func:`type_problem` finds one.

    The message names ``path`` and ``what`` (after ``context``, e.g. "expected readable
    attributes on '/x'; ").
    """
    try:
        problem = type_problem(tid, sequences=sequences)
    except (RuntimeError, OSError, ValueError, TypeError) as exc:
        problem = f"a datatype HDF5 cannot describe ({exc})"
    if problem:
        raise FormatError(
            f"{path}: {context}{what} is stored as {problem}; expected an IEEE float, a "
            "full-width integer or an ASCII/UTF-8 string. The datatype in the file is damaged: "
            "restore or re-create the file."
        )


def check_attribute_types(obj: Any, path: str) -> None:
    """Check the datatype of every attribute of ``obj`` before any is read.

    h5py converts what a damaged attribute datatype says without question: a float with
    another exponent bias reads as other numbers, an unknown string encoding raises a
    ``TypeError``, and a string type whose class bits now say "sequence" crashes the process
    when read. Variable-length sequences are therefore refused in attributes.
    """
    oid = obj.id
    try:
        count = h5py.h5a.get_num_attrs(oid)
        for index in range(count):
            attr = h5py.h5a.open(oid, index=index)
            name = attr.name.decode("utf-8", errors="replace")
            check_type(
                attr.get_type(), path, f"attribute {name!r}", sequences=False,
                context=f"expected readable attributes on {obj.name!r}; ",
            )
    except NeurocubeError:
        raise
    except (OSError, RuntimeError, ValueError, TypeError, KeyError) as exc:
        raise FormatError(
            f"{path}: expected readable attributes on {obj.name!r}; HDF5 cannot read them "
            f"({type(exc).__name__}: {exc}). The file is damaged: restore or re-create it."
        ) from exc


def check_declared_size(dset: h5py.Dataset, path: str, what: str = "") -> None:
    """Refuse a dataset that declares more data than the file stores for it.

    The bytes its shape and dtype declare are compared with the bytes stored for it
    (``H5Dget_storage_size``: the chunks actually written) times the largest ratio its
    filters allow (deflate's 1032:1; 1 without compression). Datasets up to
    :data:`DECLARED_SLACK_BYTES` are never refused (unwritten chunks read as fill values).
    Nothing is allocated in proportion to the declared shape. First, the dataset's datatype
    must pass :func:`check_type` (a damaged float layout would read as other numbers).

    Raises
    ------
    FormatError
        Naming the file and the dataset, with the declared shape and the stored bytes, or
        the damaged datatype.
    """
    name = what or str(dset.name)
    try:
        tid = dset.id.get_type()
    except (RuntimeError, OSError, ValueError) as exc:
        raise FormatError(
            f"{path}: the datatype of dataset {name!r} cannot be read ({exc}); the file is "
            "damaged. Restore or re-create it."
        ) from exc
    check_type(tid, path, f"dataset {name!r}")
    shape = tuple(int(n) for n in dset.shape or ())
    declared = int(np.prod(shape, dtype=object)) * int(np.dtype(dset.dtype).itemsize)
    if declared <= DECLARED_SLACK_BYTES:
        return
    try:
        stored = int(dset.id.get_storage_size())
    except (RuntimeError, OSError, ValueError):
        stored = 0
    filters = _filters(dset)
    compressing = [f for f in filters if f not in (h5py.h5z.FILTER_FLETCHER32,)]
    if not compressing:
        ratio = 1
    elif set(compressing) <= _BOUNDED_FILTERS:
        ratio = DEFLATE_MAX_RATIO
    else:
        ratio = 100_000  # a plugin compressor: bound it generously, never by the shape alone
    if declared > stored * ratio + DECLARED_SLACK_BYTES:
        raise FormatError(
            f"{path}: dataset {name!r} declares shape {shape} of {np.dtype(dset.dtype)} "
            f"({declared:,} bytes) but the file stores only {stored:,} bytes for it; the "
            "header is damaged or the data was never written. Re-create the file."
        )


def _header_address(obj: Any) -> int | None:
    try:
        return int(h5py.h5o.get_info(obj.id).addr)
    except (RuntimeError, OSError, ValueError, AttributeError):
        return None


def _unwritten(path: str, name: str, shape: tuple[int, ...], what: str) -> FormatError:
    return FormatError(
        f"{path}: dataset {name!r} of shape {shape} has {what}; this format's writer writes "
        "every value, so its chunk index or layout message is damaged. Restore or re-create "
        "the file."
    )


def _stored_ranges(
    dset: h5py.Dataset, path: str, name: str, complete: bool = False
) -> list[tuple[int, int, str]]:
    """Return the byte ranges that hold ``dset``'s data; refuse an inconsistent chunk index.

    ``complete``: the format's writer writes every chunk, so a missing one is damage.
    """
    dcpl = dset.id.get_create_plist()
    layout = dcpl.get_layout()
    shape = tuple(int(n) for n in dset.shape or ())
    if layout == h5py.h5d.CONTIGUOUS:
        offset = dset.id.get_offset()
        if offset is None:  # never written: reads as fill values
            if complete and int(np.prod(shape, dtype=object)) > 0:
                raise _unwritten(path, name, shape, "no data stored")
            return []
        return [(int(offset), int(offset) + int(dset.id.get_storage_size()), name)]
    if layout != h5py.h5d.CHUNKED or not dset.chunks:
        return []
    chunks = tuple(int(n) for n in dset.chunks)
    chunk_bytes = int(np.prod(chunks, dtype=np.int64)) * int(np.dtype(dset.dtype).itemsize)
    filters = [int(dcpl.get_filter(i)[0]) for i in range(dcpl.get_nfilters())]
    found: list[Any] = []
    dset.id.chunk_iter(found.append)
    ranges = []
    for info in found:
        where = tuple(int(n) for n in info.chunk_offset)
        problem = None
        if len(where) != len(chunks) or any(
            o % c or o >= n for o, c, n in zip(where, chunks, shape, strict=False)
        ):
            problem = f"a chunk at {where}, outside shape {shape} or off its {chunks} grid"
        elif not filters and int(info.size) != chunk_bytes:
            problem = (
                f"an unfiltered chunk at {where} of {info.size} bytes, expected {chunk_bytes} "
                f"(chunk shape {chunks}, {np.dtype(dset.dtype)})"
            )
        if problem:
            raise FormatError(
                f"{path}: the chunk index of dataset {name!r} lists {problem}; the dataset's "
                "layout or filter messages are damaged. Restore or re-create the file."
            )
        ranges.append((int(info.byte_offset), int(info.byte_offset) + int(info.size), name))
    if complete:
        grid = int(np.prod([-(-n // c) for n, c in zip(shape, chunks, strict=False)], dtype=object))
        if len(found) != grid:
            raise _unwritten(
                path, name, shape, f"{len(found)} stored chunks of {chunks}, expected {grid}"
            )
    if found and filters == [h5py.h5z.FILTER_DEFLATE] and chunk_bytes <= DIRECT_BATCH_BYTES:
        # The chunk shape itself is not checksummed: one chunk inflating to another size
        # shows a damaged shape (HDF5 would place the bytes on the wrong grid).
        mask, data = dset.id.read_direct_chunk(tuple(int(n) for n in found[0].chunk_offset))
        if not mask & 1:
            try:
                size = len(zlib.decompress(bytes(data), bufsize=chunk_bytes))
            except zlib.error:
                size = -1  # a damaged chunk: left to the read, which names it
            if size not in (-1, chunk_bytes):
                raise FormatError(
                    f"{path}: a chunk of dataset {name!r} inflates to {size} bytes, expected "
                    f"{chunk_bytes} (chunk shape {chunks}, {np.dtype(dset.dtype)}); the "
                    "dataset's layout message is damaged. Restore or re-create the file."
                )
    return ranges


def check_storage(
    h5: h5py.File, datasets: Mapping[str, h5py.Dataset], path: str, *, complete: bool = False
) -> None:
    """Check that the data of ``datasets`` lies where an intact file would keep it.

    A file without checksums cannot show that a data address or chunk index entry was
    damaged, but an address moved onto other data or onto metadata can be seen: every
    dataset's stored bytes (contiguous block or chunks, as HDF5 lists them) must lie past the
    superblock, inside the file, apart from every other dataset's bytes, and must not hold
    the start of any object header of the file's root, of the datasets or of their groups.
    Chunks must sit on the chunk grid; unfiltered chunks must be exactly one chunk long, and
    the first deflated chunk must inflate to one chunk. With ``complete`` (formats whose writer
    writes every value), every chunk of the grid must be stored and a contiguous dataset must
    have its data: an emptied chunk index would read as fill values. About a microsecond per
    chunk.

    Raises
    ------
    FormatError
        Naming the file and the dataset(s), what overlaps what.
    """
    try:
        size = os.fstat(h5.id.get_vfd_handle()).st_size if is_local(path) else None
    except (OSError, ValueError, TypeError, RuntimeError):
        size = None
    try:
        headers: dict[int, str] = {}
        root = _header_address(h5)
        if root is not None:
            headers[root] = "/"
        ranges: list[tuple[int, int, str]] = []
        seen: set[int] = set()  # a dataset reached by two links (a soft link) is one dataset
        for name, dset in datasets.items():
            parts = name.strip("/").split("/")
            for depth in range(1, len(parts)):
                addr = _header_address(h5["/".join(parts[:depth])])
                if addr is not None:
                    headers.setdefault(addr, "/" + "/".join(parts[:depth]))
            addr = _header_address(dset)
            if addr is not None:
                if addr in seen:
                    continue
                seen.add(addr)
                headers.setdefault(addr, name)
            ranges.extend(_stored_ranges(dset, path, name, complete))
    except NeurocubeError:
        raise
    except (RuntimeError, OSError, ValueError, KeyError, TypeError) as exc:
        raise FormatError(
            f"{path}: the storage of its datasets cannot be listed ({type(exc).__name__}: "
            f"{exc}); the file is damaged. Restore or re-create it."
        ) from exc
    first_header = min(headers, default=0)
    marks = sorted(headers)
    ranges.sort()
    previous: tuple[int, int, str] | None = None
    for start, stop, name in ranges:
        problem = None
        if start < first_header:
            problem = f"starts at byte {start}, inside the superblock (before byte {first_header})"
        elif size is not None and stop > size:
            problem = f"ends at byte {stop}, past the end of the {size}-byte file"
        elif previous is not None and start < previous[1]:
            problem = f"overlaps the data of {previous[2]!r} (bytes {start}..{previous[1]})"
        else:
            inside = [m for m in marks if start <= m < stop]
            if inside:
                problem = f"holds the object header of {headers[inside[0]]!r} (byte {inside[0]})"
        if problem:
            raise FormatError(
                f"{path}: the data of dataset {name!r} (bytes {start}..{stop}) {problem}; its "
                "address or chunk index is damaged. Restore or re-create the file."
            )
        if previous is None or stop > previous[1]:
            previous = (start, stop, name)


def unique_names(group: h5py.Group, path: str) -> list[str]:
    """Return the member names of ``group`` in HDF5 order, refusing a name listed twice.

    A group's index lists each name once; a damaged name in its name heap can repeat another
    (trace "0" read as "1"), and HDF5 then returns the first member for both.
    """
    names = [str(name) for name in group.keys()]
    if len(set(names)) != len(names):
        twice = sorted({name for name in names if names.count(name) > 1})
        raise FormatError(
            f"{path}: group {group.name!r} lists the member name(s) {twice} more than once; "
            "its name heap is damaged. Restore or re-create the file."
        )
    return names


def member(group: h5py.Group, name: str, path: str) -> Any:
    """Return ``group[name]``, refusing links that leave the file or lead nowhere.

    Hard links and soft links to an object of the same file are followed; an external
    link (it would open another file, possibly any file on the machine), a dangling
    soft link or a user-defined link is a :class:`~neurocube.errors.FormatError`
    naming the file and the member.
    """
    where = f"{group.name.rstrip('/')}/{name}"
    try:
        link = group.get(name, getlink=True)
    except (KeyError, RuntimeError, OSError, ValueError) as exc:
        raise FormatError(f"{path}: member {where!r} cannot be read ({exc}); the file is "
                          "damaged. Re-create it.") from exc
    if link is None:
        raise FormatError(f"{path}: member {where!r} is missing (the file changed or is "
                          "damaged). Open it again or re-create it.")
    if isinstance(link, h5py.ExternalLink):
        raise FormatError(
            f"{path}: member {where!r} is an external link to {link.filename}:{link.path}; "
            "neurocube never follows links into other files. Copy the data into this file."
        )
    if not isinstance(link, (h5py.HardLink, h5py.SoftLink)):
        raise FormatError(f"{path}: member {where!r} is a {type(link).__name__}, expected a "
                          "dataset or group of this file.")
    try:
        return group[name]
    except (KeyError, RuntimeError, OSError, ValueError) as exc:
        target = f" to {link.path!r}" if isinstance(link, h5py.SoftLink) else ""
        raise FormatError(
            f"{path}: member {where!r} is a link{target} that leads nowhere ({exc}); the file "
            "is damaged or was edited. Remove the link or re-create the file."
        ) from exc


@contextlib.contextmanager
def read_errors(path: str, dataset: str, dset: h5py.Dataset | None = None) -> Iterator[None]:
    """Turn h5py's errors while reading values of ``dataset`` into neurocube errors.

    A dataset with the fletcher32 filter whose read fails is a
    :class:`~neurocube.errors.CorruptDataError` (HDF5 checks fletcher32 on every chunk
    it reads); any other failure of HDF5 (a chunk that does not inflate, an index
    pointing past the end) is a :class:`~neurocube.errors.FormatError`. Both name the
    file and the dataset.
    """
    try:
        yield
    except NeurocubeError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, (TypeError, ValueError)) and "synchronously" not in str(exc):
            raise  # a caller's bad selection, not the file
        filters = _filters(dset) if dset is not None else []
        if h5py.h5z.FILTER_FLETCHER32 in filters or h5py.h5z.FILTER_DEFLATE in filters:
            check = "fletcher32" if h5py.h5z.FILTER_FLETCHER32 in filters else "deflate Adler-32"
            raise CorruptDataError(
                f"{path}: dataset {dataset!r} could not be read ({exc}); its chunks carry "
                f"{check} checksums, so a chunk failed its check or is damaged. Its values are "
                "not returned: restore or re-create the file."
            ) from exc
        raise FormatError(
            f"{path}: dataset {dataset!r} could not be read ({exc}); a stored chunk is "
            "damaged or the file is truncated. Restore or re-create the file."
        ) from exc


@contextlib.contextmanager
def structure_errors(path: str) -> Iterator[None]:
    """Turn HDF5's errors while reading a file's groups, links and attributes into FormatError.

    Used around the code that opens a layout (headers only); a damaged object header,
    B-tree or attribute names the file instead of leaking h5py's ``OSError`` / ``KeyError``.
    """
    try:
        yield
    except NeurocubeError:
        raise
    except (OSError, RuntimeError, KeyError) as exc:
        raise FormatError(
            f"{path}: the HDF5 structure cannot be read ({type(exc).__name__}: {exc}); the "
            "file is damaged. Restore or re-create it."
        ) from exc
