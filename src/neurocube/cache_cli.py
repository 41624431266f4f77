"""``neurocube cache ls|du|verify|clear|evict``: look after the Zarr cache from a shell."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from neurocube.cli import add_storage_options

__all__ = ["format_bytes", "register"]


class _DefaultsFormatter(argparse.HelpFormatter):
    """Plain-text help that shows each option's default (when it has a meaningful one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text.lower():
            return text
        if (
            "%(default)" not in text
            and default not in (None, False, argparse.SUPPRESS)
            and action.option_strings
        ):
            text += " (default: %(default)s)"
        elif action.option_strings and default is None and action.nargs != 0:
            text += " (default: not set)"
        return text


def register(subparsers: Any) -> None:
    """Add the ``cache`` command and its subcommands to the ``neurocube`` parser."""
    parser = subparsers.add_parser(
        "cache",
        help="list, measure, verify, evict or clear cached Zarr entries",
        description="Look after neurocube's Zarr cache (default folder: "
        "$NEUROCUBE_CACHE_DIR/zarr, else ~/.cache/neurocube/zarr). The gzip seek indexes "
        "kept beside it (<cache folder>/gzindex) are counted by ls, du and evict.",
        formatter_class=_DefaultsFormatter,
    )
    parser.set_defaults(func=lambda args: _help(parser))
    actions = parser.add_subparsers(dest="cache_command", metavar="ACTION")

    def add(name: str, help_text: str, description: str | None = None) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = actions.add_parser(
            name, help=help_text, description=description or help_text,
            formatter_class=_DefaultsFormatter,
        )  # fmt: skip
        sub.add_argument(
            "--store", default=None,
            help="cache root (folder or fsspec URL); default: <cache folder>/zarr",
        )  # fmt: skip
        add_storage_options(sub, what="a --store URL")
        return sub

    ls = add("ls", "list entries and gzip indexes, most recently used first")
    ls.add_argument("-l", "--long", action="store_true", help="list each entry's source files")
    ls.set_defaults(func=_ls)
    du = add("du", "print the total size of the cache on disk (entries and gzip indexes)")
    du.set_defaults(func=_du)
    verify = add(
        "verify",
        "read every chunk of one entry (or all) and check it",
        "Read every chunk and metadata file of the entry KEY (default: every entry) and check "
        "it against the entry's manifest (crc32c, sizes). Prints what is damaged; exit status "
        "1 if anything is.",
    )
    verify.add_argument("key", nargs="?", default=None, metavar="KEY",
                        help="the entry to check (default: every entry)")  # fmt: skip
    verify.set_defaults(func=_verify)
    clear = add(
        "clear",
        "remove entries: all (--all) or those a filter selects",
        "Remove cache entries. Nothing is removed unless --all or a filter (--older-than, "
        "--key, --status) says which; --dry-run lists what would be removed.",
    )
    clear.add_argument("--all", action="store_true", help="remove every entry")
    clear.add_argument(
        "--older-than",
        default=None,
        metavar="AGE",
        help="remove only entries not used for AGE, e.g. 30min, 12h, 7d, 2w",
    )
    clear.add_argument("--key", action="append", default=None, metavar="KEY",
                       help="remove only this entry (repeatable)")  # fmt: skip
    clear.add_argument(
        "--status", action="append", default=None, metavar="STATUS",
        choices=["complete", "incomplete", "damaged", "stale", "foreign"],
        help="remove only entries of this status (repeatable): complete, incomplete, "
        "damaged, stale, foreign",
    )  # fmt: skip
    clear.add_argument("-n", "--dry-run", action="store_true",
                       help="print what would be removed, remove nothing")  # fmt: skip
    clear.set_defaults(func=_clear)
    evict = add(
        "evict",
        "remove least recently used entries and gzip indexes until the cache fits a budget",
    )
    evict.add_argument("budget", metavar="SIZE", help="size budget, e.g. 500MB, 2GiB")
    evict.add_argument("-n", "--dry-run", action="store_true",
                       help="print what would be evicted, remove nothing")  # fmt: skip
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

    entries = cache_entries(args.store, args.storage_options, indexes=True)
    print(f"cache root: {open_root(args.store, args.storage_options).url}")
    if not entries:
        print("(empty)")
        return 0
    print(f"{'key':<40}  {'status':<10}  {'on disk':>10}  {'last used':<25}  {'hits':>4}  sources")
    for e in entries:
        print(
            f"{e.key:<40}  {e.status:<10}  {format_bytes(e.size_bytes):>10}  "
            f"{e.last_used or _iso(e.last_used_unix):<25}  {e.hits:>4}  "
            + (
                "gzip index"
                if e.status == "gzindex"
                else f"{len(e.sources)} file{'' if len(e.sources) == 1 else 's'}"
            )
        )
        if args.long:
            for source in e.sources:
                print(f"    {source}")
    return 0


def _du(args: argparse.Namespace) -> int:
    from neurocube.caching.manage import cache_entries
    from neurocube.caching.store import open_root

    everything = cache_entries(args.store, args.storage_options, indexes=True)
    entries = [e for e in everything if e.status != "gzindex"]
    indexes = [e for e in everything if e.status == "gzindex"]
    total = sum(e.size_bytes for e in everything)
    data = sum(e.nbytes for e in entries)
    index_bytes = sum(e.size_bytes for e in indexes)
    print(
        f"{format_bytes(total)}\t{len(entries)} entries\t"
        f"({format_bytes(data)} of data uncompressed)\t"
        f"{len(indexes)} gzip indexes ({format_bytes(index_bytes)})\t"
        f"{open_root(args.store, args.storage_options).url}"
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from neurocube.caching.manage import verify_cache

    report = verify_cache(args.key, args.store, storage_options=args.storage_options)
    bad = 0
    for key, problems in report.items():
        if not problems:
            print(f"ok       {key}")
            continue
        bad += 1
        print(f"DAMAGED  {key}")
        for line in problems:
            print(f"    {line}")
    print(
        f"{len(report)} entries checked, {bad} damaged"
        + (" (rebuild with neurocube.cache(..., key=...) or remove with "
           "`neurocube cache clear --status damaged --key KEY`)" if bad else ""),
        file=sys.stderr,
    )  # fmt: skip
    return 1 if bad else 0


def _clear(args: argparse.Namespace) -> int:
    from neurocube.caching.manage import clear_cache

    if not (args.all or args.older_than or args.key or args.status):
        print(
            "neurocube cache clear: nothing removed. Say what to remove: --all, or a filter "
            "(--older-than AGE, --key KEY, --status STATUS); --dry-run shows it first.",
            file=sys.stderr,
        )
        return 2
    removed = clear_cache(
        args.store, older_than=args.older_than, keys=args.key, statuses=args.status,
        dry_run=args.dry_run, storage_options=args.storage_options,
    )  # fmt: skip
    verb = "would remove" if args.dry_run else "removed"
    for key in removed:
        print(f"{verb} {key}")
    print(f"{len(removed)} entries {verb}", file=sys.stderr)
    return 0


def _evict(args: argparse.Namespace) -> int:
    from neurocube.caching.manage import evict_cache

    removed = evict_cache(args.budget, args.store, storage_options=args.storage_options,
                          indexes=True, dry_run=args.dry_run)  # fmt: skip
    verb = "would evict" if args.dry_run else "evicted"
    for key in removed:
        print(f"{verb} {key}")
    print(f"{len(removed)} entries {verb}", file=sys.stderr)
    return 0


def _iso(unix: float) -> str:
    from datetime import datetime, timezone

    if not unix:
        return "-"
    return datetime.fromtimestamp(unix, tz=timezone.utc).isoformat(timespec="seconds")
