"""Complete-or-rejected cache entries: manifest, checked reads, and ``verify``.

Every cache entry carries, in its completion marker, a *manifest*: each Zarr file
of the entry (the ``zarr.json`` metadata documents and every chunk) with its
size, the crc32c of each metadata document, and per variable its dims, shape,
dtype and chunk shape. Every chunk ends with a crc32c of its bytes (Zarr's
``crc32c`` codec). So

- reopening lists the entry once (no chunk is read) and compares the listing
  with the manifest: a missing chunk or variable makes the entry *incomplete*,
  a file of another size makes it *damaged* (:func:`check_listing`);
- every read goes through :class:`VerifiedStore` (xarray/Zarr reads) or
  :class:`ChunkArray` (the direct chunk reader of numeric data variables): a
  chunk that is missing is an error, never fill values; a chunk whose crc32c
  does not match, or a metadata document whose crc32c differs from the
  manifest's, is a :class:`~neurocube.errors.CorruptDataError` naming the
  entry and the chunk;
- :func:`verify_entry` reads and checks every file (``neurocube cache verify``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from neurocube.errors import CacheError, CorruptDataError

__all__ = [
    "ChunkArray",
    "EntryProblem",
    "VerifiedStore",
    "build_manifest",
    "check_listing",
    "checked_chunk",
    "marker_checksum",
    "verify_entry",
]

METADATA_NAME = "zarr.json"
_CRC_BYTES = 4


def crc32c(data: bytes | memoryview | np.ndarray) -> int:
    """Return the crc32c of ``data`` (the checksum Zarr's ``crc32c`` codec appends)."""
    import google_crc32c

    if not isinstance(data, bytes):
        data = np.frombuffer(data, np.uint8)  # the extension takes bytes or numpy, not views
    return int(google_crc32c.value(data))


def marker_checksum(marker: Mapping[str, Any]) -> str:
    """Return the sha256 of a marker's content (its own ``checksum`` field left out)."""
    body = {k: v for k, v in marker.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def rebuild_hint(key: str) -> str:
    """Return what to do with an unusable entry."""
    return (
        f"Rebuild it: neurocube.cache(obj, key={key!r}) writes it again from the sources "
        f"(or `neurocube cache clear --key {key}` removes it)."
    )


@dataclass(frozen=True)
class EntryProblem:
    """Why an entry cannot be used: ``status`` is ``"incomplete"`` or ``"damaged"``."""

    status: str
    what: str

    def error(self, entry: str, key: str) -> CacheError | CorruptDataError:
        """Return the error ``open_cached`` raises for this problem."""
        text = f"cache entry {key!r} ({entry}) is {self.status}: {self.what}. {rebuild_hint(key)}"
        if self.status == "damaged":
            return CorruptDataError(text)
        return CacheError(text)


def build_manifest(files: Mapping[str, int], read: Any) -> dict[str, Any]:
    """Return the manifest of a written entry.

    ``files`` maps each file of the entry (relative path, ``.neurocube/`` left out)
    to its size; ``read(rel)`` returns a file's bytes (only metadata documents are read).
    """
    manifest_files: dict[str, list[Any]] = {}
    variables: dict[str, dict[str, Any]] = {}
    for rel, size in sorted(files.items()):
        if rel.split("/")[-1] == METADATA_NAME:
            raw = read(rel)
            manifest_files[rel] = [len(raw), crc32c(raw)]
            meta = json.loads(raw)
            if meta.get("node_type") == "array":
                name = rel[: -len(METADATA_NAME)].rstrip("/")
                variables[name] = {
                    "dims": meta.get("dimension_names"),
                    "shape": meta["shape"],
                    "dtype": meta["data_type"],
                    "chunks": meta["chunk_grid"]["configuration"]["chunk_shape"],
                    "codecs": [c.get("name") for c in meta.get("codecs", [])],
                }
        else:
            manifest_files[rel] = [int(size), None]
    for name, var in variables.items():
        expected = _chunk_keys(name, var["shape"], var["chunks"])
        missing = [k for k in expected if k not in manifest_files]
        if missing:
            raise CacheError(
                f"variable {name!r}: {len(missing)} chunk(s) were not written (e.g. {missing[0]}); "
                "the entry is not published."
            )
    return {"files": manifest_files, "variables": variables}


def _chunk_keys(name: str, shape: list[int], chunks: list[int]) -> list[str]:
    if not shape:
        return [f"{name}/c"]
    grid = [max(1, -(-s // max(c, 1))) for s, c in zip(shape, chunks, strict=True)]
    return [f"{name}/c/" + "/".join(map(str, idx)) for idx in np.ndindex(*grid)]


def check_listing(manifest: Mapping[str, Any], listing: Mapping[str, int]) -> EntryProblem | None:
    """Compare one listing of an entry (relative path -> size) with its manifest."""
    files: dict[str, list[Any]] = manifest.get("files", {})
    missing = [rel for rel in files if rel not in listing]
    if missing:
        gone = sorted(
            name for name in manifest.get("variables", {})
            if f"{name}/{METADATA_NAME}" in missing
        )  # fmt: skip
        if gone:
            return EntryProblem(
                "incomplete", f"variable(s) {', '.join(map(repr, gone))} are missing (folder gone)"
            )
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        return EntryProblem("incomplete", f"chunk {missing[0]}{more} missing")
    resized = [rel for rel, (size, _) in files.items() if listing[rel] != size]
    if resized:
        rel = resized[0]
        more = f" and {len(resized) - 1} more" if len(resized) > 1 else ""
        return EntryProblem(
            "damaged",
            f"{rel}{more} has {listing[rel]} bytes where {files[rel][0]} were written",
        )
    return None


def checked_chunk(data: bytes, *, entry: str, key: str, rel: str) -> memoryview:
    """Return the payload of a stored chunk after checking its trailing crc32c."""
    if len(data) < _CRC_BYTES:
        raise CorruptDataError(
            f"cache entry {key!r} ({entry}): chunk {rel} holds {len(data)} bytes, fewer than "
            f"its 4-byte checksum. {rebuild_hint(key)}"
        )
    view = memoryview(data)
    stored = int.from_bytes(view[-_CRC_BYTES:], "little")
    if crc32c(view[:-_CRC_BYTES]) != stored:
        raise CorruptDataError(
            f"cache entry {key!r} ({entry}): chunk {rel} failed its crc32c checksum (the bytes "
            f"on storage changed after they were written). {rebuild_hint(key)}"
        )
    return view[:-_CRC_BYTES]


def checked_metadata(data: bytes, expected: list[Any], *, entry: str, key: str, rel: str) -> None:
    """Raise :class:`CorruptDataError` unless a metadata document matches the manifest."""
    if len(data) != expected[0] or crc32c(data) != expected[1]:
        raise CorruptDataError(
            f"cache entry {key!r} ({entry}): {rel} differs from what was written (size "
            f"{len(data)} for {expected[0]}, or its crc32c). {rebuild_hint(key)}"
        )


def _missing(entry: str, key: str, rel: str) -> CacheError:
    return CacheError(
        f"cache entry {key!r} ({entry}) is incomplete: {rel} is missing (values are never filled "
        f"in for a missing chunk). {rebuild_hint(key)}"
    )


def _verified_store_class() -> type:
    from zarr.storage import WrapperStore

    class _VerifiedStore(WrapperStore):
        """A Zarr store that checks every document and chunk it returns against the manifest."""

        def __init__(self, store: Any, *, entry: str, key: str, files: Mapping[str, Any]) -> None:
            super().__init__(store)
            self._entry, self._key, self._files = entry, key, files

        def __getstate__(self) -> dict[str, Any]:
            return {"store": self._store, "entry": self._entry, "key": self._key,
                    "files": self._files}  # fmt: skip

        def __setstate__(self, state: dict[str, Any]) -> None:
            self.__init__(state["store"], entry=state["entry"], key=state["key"],  # type: ignore[misc]
                          files=state["files"])  # fmt: skip

        async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
            result = await self._store.get(key, prototype, byte_range)
            expected = self._files.get(key)
            is_chunk = "/c/" in f"/{key}" or key.endswith("/c")
            if result is None:
                if expected is not None or is_chunk:
                    raise _missing(self._entry, self._key, key)
                return None
            if expected is None or byte_range is not None:
                return result
            data = result.to_bytes()
            if expected[1] is not None:
                checked_metadata(data, expected, entry=self._entry, key=self._key, rel=key)
            else:
                checked_chunk(data, entry=self._entry, key=self._key, rel=key)
            return result

    return _VerifiedStore


_VERIFIED: type | None = None


def VerifiedStore(store: Any, *, entry: str, key: str, files: Mapping[str, Any]) -> Any:
    """Wrap a Zarr store so that what it returns is checked against the manifest ``files``."""
    global _VERIFIED
    if _VERIFIED is None:
        _VERIFIED = _verified_store_class()
    return _VERIFIED(store, entry=entry, key=key, files=files)


class ChunkArray:
    """Direct reader of one numeric cached variable (codecs bytes, blosc, crc32c).

    Dask calls ``__getitem__`` once per stored chunk; each call reads the chunk's
    file, checks its crc32c and decompresses it straight into a new array. A
    selection spanning several chunks (after Dask fuses an ``isel`` into the read)
    reads the chunks it covers.
    """

    def __init__(self, root: Any, entry: str, key: str, name: str, spec: Mapping[str, Any],
                 dtype: np.dtype[Any]) -> None:  # fmt: skip
        self.root, self.entry, self.key, self.name = root, entry, key, name
        self.shape = tuple(int(s) for s in spec["shape"])
        self.chunk_shape = tuple(int(c) for c in spec["chunks"])
        self.strings = spec.get("codecs") == ["vlen-utf8", "zstd", "crc32c"]
        self.dtype = np.dtype(object) if self.strings else np.dtype(dtype).newbyteorder("<")
        self.ndim = len(self.shape)

    def _chunk(self, idx: tuple[int, ...]) -> np.ndarray:
        import numcodecs.blosc

        rel = f"{self.name}/c/" + "/".join(map(str, idx))
        data = self.root.read_entry_file(self.entry, rel)
        if data is None:
            raise _missing(self.entry, self.key, rel)
        payload = checked_chunk(data, entry=self.entry, key=self.key, rel=rel)
        out = np.empty(self.chunk_shape, self.dtype)
        try:
            if self.strings:
                from numcodecs import VLenUTF8, Zstd

                items = VLenUTF8().decode(Zstd().decode(payload))
                out = np.asarray(items, dtype=object).reshape(self.chunk_shape)
            else:
                numcodecs.blosc.decompress(payload, out)
        except Exception as exc:  # crc matched, yet not data of this size: not ours
            raise CorruptDataError(
                f"cache entry {self.key!r} ({self.entry}): chunk {rel} does not decompress to "
                f"{out.nbytes} bytes ({exc}). {rebuild_hint(self.key)}"
            ) from exc
        dims = zip(idx, self.chunk_shape, self.shape, strict=True)
        valid = tuple(slice(0, min(c, s - i * c)) for i, c, s in dims)
        return out[valid]

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            at = next(i for i, k in enumerate(key) if k is Ellipsis)
            fill = (slice(None),) * (self.ndim - len(key) + 1)
            key = key[:at] + fill + key[at + 1 :]
        key = key + (slice(None),) * (self.ndim - len(key))
        bounds: list[tuple[int, int]] = []
        local: list[Any] = []
        for k, size in zip(key, self.shape, strict=True):
            if isinstance(k, slice):
                start, stop, step = k.indices(size)
                if step != 1 or stop <= start:
                    lo, hi = 0, size
                    local.append(k)
                else:
                    lo, hi = start, stop
                    local.append(slice(0, stop - start))
            else:
                arr = np.asarray(k)
                if arr.dtype == bool:
                    arr = np.flatnonzero(arr)
                arr = np.where(arr < 0, arr + size, arr)
                lo = int(arr.min()) if arr.size else 0
                hi = int(arr.max()) + 1 if arr.size else 0
                local.append(arr - lo if arr.ndim else int(arr) - lo)
            bounds.append((lo, hi))
        # numpy semantics on the box read equal numpy semantics on the whole array
        return self._read_box(bounds)[tuple(local)]

    def _read_box(self, bounds: list[tuple[int, int]]) -> np.ndarray:
        if any(hi <= lo for lo, hi in bounds):
            return np.empty([max(0, hi - lo) for lo, hi in bounds], self.dtype)
        ranges = [
            range(lo // c, (hi - 1) // c + 1)
            for (lo, hi), c in zip(bounds, self.chunk_shape, strict=True)
        ]
        idxs = list(np.ndindex(*[len(r) for r in ranges]))
        if len(idxs) == 1:
            idx = tuple(r[0] for r in ranges)
            chunk = self._chunk(idx)
            dims = zip(bounds, idx, self.chunk_shape, strict=True)
            sel = tuple(slice(lo - i * c, hi - i * c) for (lo, hi), i, c in dims)
            return chunk[sel]
        out = np.empty([hi - lo for lo, hi in bounds], self.dtype)
        for pos in idxs:
            idx = tuple(r[p] for r, p in zip(ranges, pos, strict=True))
            chunk = self._chunk(idx)
            src, dst = [], []
            for (lo, hi), i, c in zip(bounds, idx, self.chunk_shape, strict=True):
                a, b = max(lo, i * c), min(hi, (i + 1) * c)
                src.append(slice(a - i * c, b - i * c))
                dst.append(slice(a - lo, b - lo))
            out[tuple(dst)] = chunk[tuple(src)]
        return out


#: zarr.json attributes through which xarray changes values (CF decoding): such variables are
#: opened by xarray itself, not by :func:`fast_variable`.
_DECODED_ATTRS = frozenset(
    {"missing_value", "scale_factor", "add_offset", "calendar", "dtype", "_Unsigned", "_Encoding"}
)
_TIME_UNITS = frozenset(
    {"days", "hours", "minutes", "seconds", "milliseconds", "microseconds", "nanoseconds"}
)
_NUMERIC_TYPES = frozenset(
    {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
     "float16", "float32", "float64"}
)  # fmt: skip


def plain_variable(meta: Mapping[str, Any]) -> tuple[np.dtype[Any], dict[str, Any]] | None:
    """Return ``(dtype, attrs)`` of an array xarray would open unchanged, or None.

    "Unchanged": numeric (no bool, time or complex) stored as bytes + blosc + crc32c,
    or strings stored as vlen-utf8 + zstd + crc32c, with no CF attribute that makes
    xarray rewrite the values (a fill value other than NaN, scale, offset, time units).
    """
    codecs = [c.get("name") for c in meta.get("codecs", [])]
    kind = meta.get("data_type")
    if not meta.get("shape") or meta.get("node_type") != "array":
        return None
    if kind in _NUMERIC_TYPES and codecs == ["bytes", "blosc", "crc32c"]:
        dtype = np.dtype(str(kind))
    elif kind == "string" and codecs == ["vlen-utf8", "zstd", "crc32c"]:
        dtype = np.dtype(object)
    else:
        return None
    attrs = dict(meta.get("attributes") or {})
    if _DECODED_ATTRS & attrs.keys():
        return None
    units = attrs.get("units")
    if isinstance(units, str) and (" since " in units or units in _TIME_UNITS):
        return None
    fill = attrs.pop("_FillValue", None)
    if fill is not None:
        if dtype.kind != "f" or not isinstance(fill, str):
            return None
        import base64

        try:
            raw = base64.b64decode(fill)
            value = np.frombuffer(raw, {2: "<f2", 4: "<f4", 8: "<f8"}[len(raw)])
        except (ValueError, TypeError, KeyError):
            return None
        if value.size != 1 or not np.isnan(value[0]):
            return None
    attrs.pop("coordinates", None)
    return dtype, attrs


def direct_readable(spec: Mapping[str, Any], variable: Any) -> bool:
    """Return True if ``variable`` (as xarray opened it) can be read by :class:`ChunkArray`."""
    if spec.get("codecs") != ["bytes", "blosc", "crc32c"] or not spec.get("shape"):
        return False
    enc = variable.encoding
    if any(k in enc for k in ("scale_factor", "add_offset", "units", "calendar")):
        return False
    if variable.dtype.kind not in "biuf" or variable.dtype != np.dtype(enc.get("dtype", "O")):
        return False
    fill = enc.get("_FillValue")
    return fill is None or (isinstance(fill, float) and np.isnan(fill))


def verify_entry(root: Any, entry: str, key: str, marker: Mapping[str, Any]) -> list[str]:
    """Read every file of an entry and check it; return one line per problem (empty: sound)."""
    manifest = marker.get("manifest") or {}
    problems = []
    listing = root.list_entry_files(entry)
    files: dict[str, list[Any]] = manifest.get("files", {})
    for rel, expected in files.items():
        if rel not in listing:
            problems.append(f"{rel}: missing")
            continue
        data = root.read_entry_file(entry, rel)
        if data is None:
            problems.append(f"{rel}: missing")
            continue
        try:
            if expected[1] is not None:
                checked_metadata(data, expected, entry=entry, key=key, rel=rel)
            else:
                if len(data) != expected[0]:
                    problems.append(f"{rel}: {len(data)} bytes where {expected[0]} were written")
                    continue
                checked_chunk(data, entry=entry, key=key, rel=rel)
        except CorruptDataError:
            what = "differs from what was written" if expected[1] is not None else "crc32c mismatch"
            problems.append(f"{rel}: {what}")
    return problems
