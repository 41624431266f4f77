"""``neurocube cache ls|du|clear|evict``: look after the Zarr cache from a shell."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from neurocube.cli import add_storage_options

__all__ = ["format_bytes", "register"]


def register(subparsers: Any) -> None:
    """Add the ``cache`` command and its subcommands to the ``neurocube`` parser."""
    parser = subparsers.add_parser(
        "cache",
        help="list, measure, evict or clear cached Zarr entries",
        description="Look after neurocube's Zarr cache (default folder: "
        "$NEUROCUBE_CACHE_DIR/zarr, else ~/.cache/neurocube/zarr).",
    )
    parser.set_defaults(func=lambda args: _help(parser))
    actions = parser.add_subparsers(dest="cache_command", metavar="ACTION")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = actions.add_parser(
            name, help=help_text, description=help_text
        )
        sub.add_argument("--store", default=None, help="cache root (folder or fsspec URL)")
        add_storage_options(sub, what="a --store URL")
        return sub

    ls = add("ls", "list entries, most recently used first")
    ls.add_argument("-l", "--long", action="store_true", help="list each entry's source files")
    ls.set_defaults(func=_ls)
    du = add("du", "print the total size of the cache on disk")
    du.set_defaults(func=_du)
    clear = add("clear", "remove entries (all, or those unused for a while)")
    clear.add_argument(
        "--older-than",
        default=None,
        metavar="AGE",
        help="remove only entries not used for AGE, e.g. 30min, 12h, 7d, 2w",
    )
    clear.set_defaults(func=_clear)
    evict = add("evict", "remove least recently used entries until the cache fits a budget")
    evict.add_argument("budget", metavar="SIZE", help="size budget, e.g. 500MB, 2GiB")
    evict.set_defaults(func=_evict)


def format_bytes(n: float) -> str:
    """Return ``n`` bytes in human units (``1.5 MiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _ls(args: argparse.Namespace) -> int:
    from neurocube.caching.manage import cache_entries
    from neurocube.caching.store import open_root

    entries = cache_entries(args.store, args.storage_options)
    print(f"cache root: {open_root(args.store, args.storage_options).url}")
    if not entries:
        print("(empty)")
        return 0
    print(f"{'key':<40}  {'status':<10}  {'on disk':>10}  {'last used':<25}  {'hits':>4}  sources")
    for e in entries:
        print(
            f"{e.key:<40}  {e.status:<10}  {format_bytes(e.size_bytes):>10}  "
            f"{e.last_used or '-':<25}  {e.hits:>4}  "
            f"{len(e.sources)} file{'' if len(e.sources) == 1 else 's'}"
        )
        if args.long:
            for source in e.sources:
                print(f"    {source}")
    return 0


def _du(args: argparse.Namespace) -> int:
    from neurocube.caching.manage import cache_entries
    from neurocube.caching.store import open_root

    entries = cache_entries(args.store, args.storage_options)
    total = sum(e.size_bytes for e in entries)
    data = sum(e.nbytes for e in entries)
    print(
        f"{format_bytes(total)}\t{len(entries)} entries\t"
        f"({format_bytes(data)} of data uncompressed)\t"
        f"{open_root(args.store, args.storage_options).url}"
    )
    return 0


def _clear(args: argparse.Namespace) -> int:
    from neurocube.caching.manage import clear_cache

    removed = clear_cache(
        args.store, older_than=args.older_than, storage_options=args.storage_options
    )
    for key in removed:
        print(f"removed {key}")
    print(f"{len(removed)} entries removed", file=sys.stderr)
    return 0


def _evict(args: argparse.Namespace) -> int:
    from neurocube.caching.manage import evict_cache

    removed = evict_cache(args.budget, args.store, storage_options=args.storage_options)
    for key in removed:
        print(f"evicted {key}")
    print(f"{len(removed)} entries evicted", file=sys.stderr)
    return 0
