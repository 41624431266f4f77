"""``neurocube info PATH...``: what a file is, as neurocube would open it, reading headers only.

For each file: the format (found by content, as ``xr.open_dataset(path,
engine="neurocube")`` finds it), the dims and their sizes, each variable's
dtype, shape, chunks and size once loaded, and for a ``.nii.gz`` whether its
gzip seek index exists (in the cache folder or the index store).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from neurocube.cli import add_storage_options

__all__ = ["describe", "register"]


def register(subparsers: Any) -> None:
    """Add the ``info`` subcommand."""
    parser = subparsers.add_parser(
        "info",
        help="show a file's format, dims, sizes, chunks and gzip index (headers only)",
        description="Show what each file is, as neurocube opens it, reading headers only: the "
        "format (found by content, as xr.open_dataset(path, engine='neurocube') finds it), the "
        "dims and their sizes, each variable's dtype, shape, size once loaded and chunks, and "
        "for a .nii.gz whether its gzip seek index exists (cache folder or index store).",
    )
    parser.add_argument("paths", nargs="+", metavar="URL_OR_PATH", help="files or URLs")
    add_storage_options(parser)
    parser.add_argument(
        "--cache-dir", default=None, metavar="DIR",
        help="cache folder to look for gzip indexes in (default: $NEUROCUBE_CACHE_DIR or the "
        "per-user cache)",
    )  # fmt: skip
    parser.add_argument(
        "--index-store", default=None, metavar="URL",
        help="index store to look for gzip indexes in (default: $NEUROCUBE_INDEX_STORE, none)",
    )  # fmt: skip
    parser.set_defaults(func=_info)


def _size(nbytes: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"  # pragma: no cover


def _chunks(data: Any) -> str:
    chunks = getattr(data, "chunks", None)
    if not isinstance(chunks, tuple) or not chunks:
        return "in memory"

    def one(c: tuple[int, ...]) -> str:
        if len(set(c)) == 1:
            return f"{c[0]}" if len(c) == 1 else f"{len(c)}x{c[0]}"
        return f"{len(c)} chunks of {min(c)}-{max(c)}"

    return "(" + ", ".join(one(c) for c in chunks) + ")"


def describe(
    path: str,
    *,
    storage_options: dict[str, Any] | None = None,
    cache_dir: str | None = None,
    index_store: str | None = None,
) -> list[str]:
    """Return the lines ``neurocube info`` prints for one file (reads headers only)."""
    from neurocube import storage
    from neurocube.backend import resolve_dotted, single_file_readers
    from neurocube.errors import DataNotFoundError, ReaderNotFoundError

    opts = storage.as_options(storage_options)
    st = storage.info(path, opts)
    if st.is_dir:
        raise DataNotFoundError(f"{path}: a folder, expected a file (open folders with Python)")
    lines = [path, f"  file size: {_size(st.size)}"]
    for name, sniff, opener, accepted in single_file_readers():
        if not resolve_dotted(sniff)(path, opts):
            continue
        lines.append(f"  format: {name}")
        kwargs: dict[str, Any] = {}
        if name == "nifti":
            from neurocube.sources import gzindex, gzindex_store
            from neurocube.sources.nifti import build_parts, open_nifti

            parts = build_parts(path, cache_dir=cache_dir, storage_options=storage_options,
                                index_store=gzindex_store.index_store(index_store))  # fmt: skip
            gz = parts.array.spec.gzip
            if gz is None:
                lines.append("  gzip index: not needed (not gzip-compressed)")
            elif gzindex.has_index(gz):
                lines.append(f"  gzip index: yes, {gz.index_path}")
            else:
                lines.append("  gzip index: none yet (built on the first read, or ahead with "
                             "`neurocube index build`)")  # fmt: skip
            ds = open_nifti(path, cache_dir=cache_dir, storage_options=storage_options)
        else:
            if storage_options is not None and "storage_options" in accepted:
                kwargs["storage_options"] = storage_options
            if "use_cache" in accepted:
                kwargs["use_cache"] = False
            ds = resolve_dotted(opener)(path, **kwargs)
        lines.append("  dims: " + ", ".join(f"{d}={n}" for d, n in ds.sizes.items()))
        for var_name, var in ds.data_vars.items():
            lines.append(
                f"  variable {var_name}{tuple(var.dims)}: {var.dtype}, shape {var.shape}, "
                f"{_size(var.nbytes)} loaded, chunks {_chunks(var.data)}"
            )
        return lines
    names = ", ".join(n for n, _, _, _ in single_file_readers())
    raise ReaderNotFoundError(
        f"{path}: no neurocube reader recognises this file (readers: {names})"
    )


def _info(args: argparse.Namespace) -> int:
    from neurocube.errors import NeurocubeError

    failed = 0
    for path in args.paths:
        try:
            lines = describe(path, storage_options=args.storage_options,
                             cache_dir=args.cache_dir, index_store=args.index_store)  # fmt: skip
        except NeurocubeError as exc:
            print(f"neurocube: error: {exc}", file=sys.stderr)
            failed += 1
            continue
        print("\n".join(lines))
    return 1 if failed else 0
