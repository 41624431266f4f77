"""Check a parquet footer's consistency before pyarrow builds its metadata objects.

A parquet footer is a Thrift (compact protocol) ``FileMetaData`` with no checksum. When a
damaged footer still parses but disagrees with itself, pyarrow does not always raise: a
column whose schema entry says ``BOOLEAN`` while its statistics hold the bytes of a string
makes pyarrow's C++ code throw past a ``noexcept`` boundary, and the whole process is
aborted (``terminate called after throwing an instance of 'parquet::ParquetException'``).
No ``try`` can catch that, so the footer is checked here first, in Python:

- every column chunk's name and physical type equal its schema leaf's (names have no
  checksum either: a damaged copy would rename a column);
- every statistics value of a fixed-width type (min, max) has that type's width;
- size statistics fit the column: byte-array sizes only on byte arrays, level histograms
  with one bin per level the schema allows;
- the structure itself is well formed (field types, lengths within the footer, nesting).

Anything else is a :class:`~neurocube.errors.FormatError` naming the file. The parser reads
only what these checks need and skips everything else; it does not replace pyarrow's.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from neurocube.errors import FormatError

# compact protocol field types
_STOP, _TRUE, _FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT = (
    range(13)
)
_MAX_DEPTH = 32

# parquet physical types -> the width of one plain-encoded value (None: variable)
_BOOLEAN, _INT32, _INT64, _INT96, _FLOAT, _DOUBLE_T, _BYTE_ARRAY, _FIXED = range(8)
_WIDTH = {_BOOLEAN: 1, _INT32: 4, _INT64: 8, _INT96: 12, _FLOAT: 4, _DOUBLE_T: 8}
_REQUIRED, _OPTIONAL, _REPEATED = range(3)
_TYPE_NAMES = ("BOOLEAN", "INT32", "INT64", "INT96", "FLOAT", "DOUBLE", "BYTE_ARRAY",
               "FIXED_LEN_BYTE_ARRAY")  # fmt: skip


class _Malformed(Exception):
    """The footer's Thrift structure is not well formed (turned into a FormatError)."""


# What the checks read of a FileMetaData, with each field's Thrift type: {field id: (compact
# type, element or struct spec)}. A field whose wire type differs is skipped, as Thrift's
# generated readers (pyarrow's) skip it; every other field is stepped over without being built.
_I32_F, _I64_F, _BIN_F = (_I32, None), (_I64, None), (_BINARY, None)
_SCHEMA_ELEMENT = {1: _I32_F, 2: _I32_F, 3: _I32_F, 4: _BIN_F, 5: _I32_F}
_STATISTICS = {1: _BIN_F, 2: _BIN_F, 5: _BIN_F, 6: _BIN_F}
_SIZE_STATISTICS = {1: _I64_F, 2: (_LIST, _I64_F), 3: (_LIST, _I64_F)}
_COLUMN_META = {1: _I32_F, 3: (_LIST, _BIN_F), 5: _I64_F, 7: _I64_F, 9: _I64_F, 11: _I64_F,
                12: (_STRUCT, _STATISTICS), 16: (_STRUCT, _SIZE_STATISTICS)}
_COLUMN_CHUNK = {1: _BIN_F, 3: (_STRUCT, _COLUMN_META)}
_ROW_GROUP = {1: (_LIST, (_STRUCT, _COLUMN_CHUNK)), 3: _I64_F}
_FILE_META = {2: (_LIST, (_STRUCT, _SCHEMA_ELEMENT)), 3: _I64_F,
              4: (_LIST, (_STRUCT, _ROW_GROUP))}


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    byte = data[pos]  # an IndexError past the end is reported as a malformed footer
    pos += 1
    if byte < 0x80:
        return byte, pos
    result, shift = byte & 0x7F, 7
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _Malformed("a varint longer than 10 bytes")


def _zigzag(data: bytes, pos: int) -> tuple[int, int]:
    n, pos = _varint(data, pos)
    return (n >> 1) ^ -(n & 1), pos


def _list_header(data: bytes, pos: int) -> tuple[int, int, int]:
    header = data[pos]
    size, element = header >> 4, header & 0x0F
    pos += 1
    if size == 15:
        size, pos = _varint(data, pos)
    if size > len(data) - pos:  # every element takes at least one byte
        raise _Malformed(f"a list of {size} elements in a {len(data)}-byte footer")
    return size, element, pos


def _value(data: bytes, pos: int, kind: int, sub: Any, depth: int) -> tuple[Any, int]:
    """Read one value of the expected compact type ``kind`` (``sub``: element or struct spec)."""
    if kind in (_I16, _I32, _I64):
        return _zigzag(data, pos)
    if kind == _BINARY:
        n, pos = _varint(data, pos)
        if n > len(data) - pos:
            raise _Malformed(f"a {n}-byte value runs past the footer's end")
        return data[pos : pos + n], pos + n
    if kind == _STRUCT:
        return _struct(data, pos, sub, depth + 1)
    # a list: its elements are read as the expected type, whatever the header says (as Thrift)
    size, _, pos = _list_header(data, pos)
    element, element_sub = sub
    out = []
    for _ in range(size):
        item, pos = _value(data, pos, element, element_sub, depth + 1)
        out.append(item)
    return out, pos


def _skip(data: bytes, pos: int, kind: int, depth: int) -> int:
    """Step over one value of wire type ``kind`` without building it."""
    if depth > _MAX_DEPTH:
        raise _Malformed("structures nested too deeply")
    if kind in (_I16, _I32, _I64):
        while data[pos] & 0x80:
            pos += 1
        return pos + 1
    if kind == _BINARY:
        n, pos = _varint(data, pos)
        if n > len(data) - pos:
            raise _Malformed(f"a {n}-byte value runs past the footer's end")
        return pos + n
    if kind == _STRUCT:
        return _struct(data, pos, None, depth + 1)[1]
    if kind in (_LIST, _SET):
        size, element, pos = _list_header(data, pos)
        for _ in range(size):
            pos = _skip(data, pos, element, depth + 1)
        return pos
    if kind in (_TRUE, _FALSE, _BYTE):  # a bool element of a list is one byte
        return pos + 1
    if kind == _DOUBLE:
        if pos + 8 > len(data):
            raise _Malformed("the footer ends inside a double")
        return pos + 8
    if kind == _MAP:
        size, pos = _varint(data, pos)
        if size == 0:
            return pos
        if 2 * size > len(data) - pos:
            raise _Malformed(f"a map of {size} entries in a {len(data)}-byte footer")
        types = data[pos]
        pos += 1
        for _ in range(size):
            pos = _skip(data, pos, types >> 4, depth + 1)
            pos = _skip(data, pos, types & 0x0F, depth + 1)
        return pos
    raise _Malformed(f"unknown field type {kind}")


def _struct(data: bytes, pos: int, spec: Any, depth: int) -> tuple[dict[int, Any], int]:
    """Read a struct's fields that ``spec`` names with their expected type; skip the rest.

    The loop steps over integer and binary fields inline: they are most of a footer, and a
    large footer (thousands of column chunks) is read on every first open of its file.
    """
    if depth > _MAX_DEPTH:
        raise _Malformed("structures nested too deeply")
    fields: dict[int, Any] = {}
    wanted = spec.get if spec else None
    last = 0
    while True:
        header = data[pos]
        pos += 1
        kind = header & 0x0F
        if kind == _STOP:
            return fields, pos
        delta = header >> 4
        if delta:
            field_id = last + delta
        else:
            field_id, pos = _zigzag(data, pos)
        last = field_id
        if kind <= _FALSE:  # a bool field carries its value in its type: none is read here
            continue
        expected = wanted(field_id) if wanted else None
        if expected is not None and expected[0] == kind:
            fields[field_id], pos = _value(data, pos, kind, expected[1], depth)
        elif _I16 <= kind <= _I64:
            while data[pos] & 0x80:
                pos += 1
            pos += 1
        elif kind == _BINARY:
            n, pos = _varint(data, pos)
            pos += n
            if pos > len(data):
                raise _Malformed(f"a {n}-byte value runs past the footer's end")
        else:
            pos = _skip(data, pos, kind, depth)


@dataclass(frozen=True)
class _Leaf:
    """One leaf column of the schema: its path, type and level limits."""

    path: tuple[bytes, ...]
    name: str
    kind: Any
    length: Any
    max_definition: int
    max_repetition: int


def _leaves(schema: list[Any]) -> list[_Leaf]:
    """Return every leaf of a flattened schema list, with its definition/repetition limits."""
    leaves: list[_Leaf] = []
    pos = 1  # element 0 is the root

    def walk(count: int, parents: tuple[bytes, ...], definition: int, repetition: int) -> None:
        nonlocal pos
        for _ in range(count):
            if pos >= len(schema) or not isinstance(schema[pos], dict):
                raise _Malformed("the schema lists fewer elements than its parents announce")
            element = schema[pos]
            pos += 1
            raw = element.get(4, b"")
            raw = raw if isinstance(raw, bytes) else b"?"
            repeat = element.get(3, _REQUIRED)
            path = (*parents, raw)
            if repeat not in (_REQUIRED, _OPTIONAL, _REPEATED):
                raise _Malformed(f"column {_dotted(path)!r} has repetition type code {repeat!r}")
            level_d = definition + (repeat != _REQUIRED)
            level_r = repetition + (repeat == _REPEATED)
            children = element.get(5)
            if isinstance(children, int) and children > 0:
                walk(children, path, level_d, level_r)
            else:
                leaves.append(_Leaf(path, _dotted(path), element.get(1), element.get(2),
                                    level_d, level_r))

    if not schema or not isinstance(schema[0], dict):
        raise _Malformed("no schema root")
    root_children = schema[0].get(5, 0)
    if not isinstance(root_children, int) or root_children < 0:
        raise _Malformed("a schema root with no children count")
    walk(root_children, (), 0, 0)
    if pos != len(schema):
        raise _Malformed(f"the schema has {len(schema)} elements, its tree holds {pos}")
    return leaves


def check_footer(footer: bytes, path: str, data_end: int | None = None) -> None:
    """Refuse a parquet footer that disagrees with itself in a way pyarrow would not survive.

    ``footer`` is the Thrift bytes before the footer length and ``PAR1``; ``data_end`` is
    where the footer starts in the file (column chunks must lie before it).

    Raises
    ------
    FormatError
        Naming ``path``, what was expected and what was found.
    """
    try:
        try:
            meta, _ = _struct(footer, 0, _FILE_META, 0)
        except IndexError:
            raise _Malformed("the footer ends inside a value") from None
        schema = meta.get(2)
        if not isinstance(schema, list):
            raise _Malformed("no schema list")
        leaves = _leaves(schema)
        row_groups = meta.get(4, [])
        if not isinstance(row_groups, list):
            raise _Malformed("row groups are not a list")
        spans: list[tuple[int, int, str]] = []
        total_rows = 0
        for g, group in enumerate(row_groups):
            columns = group.get(1, []) if isinstance(group, dict) else None
            if not isinstance(columns, list) or len(columns) != len(leaves):
                found = len(columns) if isinstance(columns, list) else "no"
                raise _Malformed(
                    f"row group {g} has {found} column chunks, the schema {len(leaves)} leaves"
                )
            rows = group.get(3)
            if not isinstance(rows, int) or rows < 0:
                raise _Malformed(f"row group {g} announces {rows!r} rows")
            total_rows += rows
            for leaf, chunk in zip(leaves, columns, strict=True):
                span = _check_chunk(chunk, leaf, g, rows)
                if span is not None:
                    spans.append(span)
        if meta.get(3, total_rows) != total_rows:
            raise _Malformed(
                f"the file announces {meta.get(3)!r} rows, its row groups hold {total_rows}"
            )
        _check_spans(spans, data_end)
    except _Malformed as exc:
        raise FormatError(
            f"{path}: damaged parquet footer: {exc}. The footer carries no checksum, so "
            "neurocube checks that it agrees with itself; restore or rewrite the file."
        ) from None


def _check_spans(spans: list[tuple[int, int, str]], data_end: int | None) -> None:
    """Column chunks lie between the leading magic and the footer, none inside another.

    A damaged page offset would otherwise point pyarrow at another column's pages, whose
    own CRCs pass: other values, no error.
    """
    spans.sort()
    previous_end, previous = 4, "the file's leading magic"
    for start, end, what in spans:
        if start < previous_end:
            raise _Malformed(f"{what} starts at byte {start}, inside {previous}")
        if data_end is not None and end > data_end:
            raise _Malformed(f"{what} ends at byte {end}, past the footer's start at {data_end}")
        previous_end, previous = end, what


def _check_chunk(
    chunk: Any, leaf: _Leaf, group: int, rows: int
) -> tuple[int, int, str] | None:
    """Check one column chunk against its schema column; return its byte span in the file."""
    meta = chunk.get(3) if isinstance(chunk, dict) else None
    if not isinstance(meta, dict) or chunk.get(1) is not None:
        return None  # metadata or data in another file: pyarrow refuses or reads it there
    name, kind = leaf.name, leaf.kind
    chunk_path = meta.get(3)
    if isinstance(chunk_path, list) and tuple(chunk_path) != leaf.path:
        # names carry no checksum: the schema and every chunk hold a copy, they must agree
        found = _dotted(tuple(p for p in chunk_path if isinstance(p, bytes)))
        raise _Malformed(
            f"column {name!r} of the schema is named {found!r} by its chunk in row group {group}"
        )
    where = f"the chunk of column {name!r} in row group {group}"
    values = meta.get(5)
    if leaf.max_repetition == 0 and values != rows:  # one value (or null) per row
        raise _Malformed(f"{where} holds {values!r} values for {rows} rows")
    span = _chunk_span(meta, where)
    chunk_type = meta.get(1)
    if chunk_type != kind:
        raise _Malformed(
            f"column {name!r} is {_type_name(kind)} in the schema but its chunk in row group "
            f"{group} says {_type_name(chunk_type)}"
        )
    _check_sizes(meta.get(16), leaf, group)
    width = _WIDTH.get(kind) if isinstance(kind, int) else None
    if kind == _FIXED:
        width = leaf.length if isinstance(leaf.length, int) and leaf.length > 0 else None
    stats = meta.get(12)
    if width is None or not isinstance(stats, dict):
        return span
    for field_id, what in ((1, "max"), (2, "min"), (5, "max_value"), (6, "min_value")):
        value = stats.get(field_id)
        if isinstance(value, bytes) and len(value) != width:
            raise _Malformed(
                f"column {name!r} ({_type_name(kind)}, {width}-byte values) has a "
                f"{len(value)}-byte {what} statistic in row group {group}"
            )
    return span


def _chunk_span(meta: dict[int, Any], where: str) -> tuple[int, int, str]:
    """Return the bytes ``[start, end)`` a column chunk's pages occupy, as pyarrow reads them."""
    data_at, dictionary_at, size = meta.get(9), meta.get(11), meta.get(7)
    if not isinstance(data_at, int) or not isinstance(size, int) or size < 0:
        raise _Malformed(f"{where} has data page offset {data_at!r} and size {size!r}")
    start = data_at
    if isinstance(dictionary_at, int) and dictionary_at > 0:  # 0: no dictionary (old writers)
        if dictionary_at > data_at:
            raise _Malformed(
                f"{where} puts its dictionary page at byte {dictionary_at}, after its first "
                f"data page at {data_at}"
            )
        start = dictionary_at
    if data_at >= start + size:
        raise _Malformed(
            f"{where} spans bytes {start} to {start + size} but its first data page is at "
            f"byte {data_at}"
        )
    return start, start + size, where


def _check_sizes(sizes: Any, leaf: _Leaf, group: int) -> None:
    """Check a chunk's size statistics against its column's type and level limits."""
    if not isinstance(sizes, dict):
        return
    where = f"column {leaf.name!r} in row group {group}"
    if 1 in sizes and leaf.kind != _BYTE_ARRAY:
        raise _Malformed(f"{where} ({_type_name(leaf.kind)}) has byte-array size statistics")
    for field_id, levels, what in ((2, leaf.max_repetition, "repetition"),
                                   (3, leaf.max_definition, "definition")):  # fmt: skip
        histogram = sizes.get(field_id)
        if isinstance(histogram, list) and histogram and len(histogram) != levels + 1:
            raise _Malformed(
                f"{where} has a {what}-level histogram of {len(histogram)} bins; its schema "
                f"allows levels 0 to {levels}"
            )


def _dotted(path: tuple[bytes, ...]) -> str:
    return ".".join(part.decode("utf-8", "replace") for part in path)


def _type_name(kind: Any) -> str:
    if isinstance(kind, int) and 0 <= kind < len(_TYPE_NAMES):
        return _TYPE_NAMES[kind]
    return f"type code {kind!r}"


def footer_bytes(tail: bytes, path: str) -> bytes:
    """Return the Thrift footer inside ``tail`` (a file's last bytes: footer, length, ``PAR1``)."""
    if len(tail) < 8:
        raise FormatError(f"{path}: not a parquet file ({len(tail)} bytes at its end).")
    (length,) = struct.unpack("<I", tail[-8:-4])
    if length > len(tail) - 8:
        raise FormatError(
            f"{path}: parquet footer length {length} exceeds the {len(tail) - 8} bytes before "
            "it; the file is damaged or truncated."
        )
    return tail[len(tail) - 8 - length : len(tail) - 8]
