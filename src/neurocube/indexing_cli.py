"""``neurocube index build``: build gzip seek indexes of ``.nii.gz`` files ahead of time.

A team or a cluster builds each index once: with ``--store`` (a folder or a
URL every worker can reach) the indexes land there, and any later
``open_nifti(url, index_store=...)`` (or ``$NEUROCUBE_INDEX_STORE``) reads
through them instead of streaming the whole object first.
"""

from __future__ import annotations

import argparse
import sys
import threading
from typing import Any

from neurocube.cli import add_storage_options

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the ``index`` command and its ``build`` subcommand to the ``neurocube`` parser."""
    parser = subparsers.add_parser(
        "index",
        help="build gzip seek indexes of .nii.gz files (random access, shared indexes)",
        description="Build the gzip seek indexes that give .nii.gz files random access.",
    )
    parser.set_defaults(func=lambda args: _help(parser))
    actions = parser.add_subparsers(dest="index_command", metavar="ACTION")
    build = actions.add_parser(
        "build",
        help="build (or fetch) the index of each file, with one progress bar",
        description="Build the gzip seek index of each .nii.gz (local path or URL), streaming "
        "each file once unless its index is already in the cache folder or the store. "
        "Prints where each index is. A .nii needs none.",
    )
    build.add_argument("paths", nargs="+", metavar="URL_OR_PATH", help=".nii.gz files or URLs")
    build.add_argument(
        "--store",
        default=None,
        metavar="URL",
        help="index store (folder or URL) to put the indexes in and look them up "
        "(default: $NEUROCUBE_INDEX_STORE, none)",
    )
    add_storage_options(build, what="the data")
    add_storage_options(build, flag="--store-options", what="the --store (default: the data's)")
    build.add_argument(
        "--cache-dir", default=None, metavar="DIR",
        help="local cache folder (default: $NEUROCUBE_CACHE_DIR or the per-user cache)",
    )  # fmt: skip
    build.add_argument("--no-progress", action="store_true", help="do not draw a progress bar")
    build.set_defaults(func=_build)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


class _ByteTicker:
    """Moves the bar with the bytes this process reads (``IO_STATS``), capped per file."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar
        self.lock = threading.Lock()
        self.shown = 0.0
        self.cap = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _read(self) -> int:
        from neurocube.storage import IO_STATS

        return int(IO_STATS.snapshot()[1])

    def begin(self, done: float, size: float) -> None:
        with self.lock:
            self.start_bytes = self._read()
            self.base = done
            self.cap = done + size

    def _run(self) -> None:
        while not self.stop.wait(0.25):
            with self.lock:
                if not self.cap:
                    continue
                target = min(self.cap, self.base + self._read() - self.start_bytes)
                if target > self.shown:
                    self.bar.update(target - self.shown)
                    self.shown = target

    def finish(self, done: float) -> None:
        with self.lock:
            if done > self.shown:
                self.bar.update(done - self.shown)
                self.shown = done
            self.cap = 0.0

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=1)


def _build(args: argparse.Namespace) -> int:
    from neurocube import storage
    from neurocube.errors import NeurocubeError
    from neurocube.progress import operation
    from neurocube.sources.gzindex_store import index_store
    from neurocube.sources.nifti_index import build_index

    show = False if args.no_progress else None
    store = index_store(args.store)
    sizes: dict[str, int] = {}
    failed = 0
    for path in args.paths:
        try:
            sizes[path] = storage.info(path, args.storage_options).size
        except NeurocubeError as exc:
            print(f"neurocube: error: {exc}", file=sys.stderr)
            failed += 1
    results: list[tuple[str, str | None]] = []
    # One bar for all files: the per-file gzip streams inside draw none of their own.
    with operation(
        f"indexing {len(sizes)} file{'s' * (len(sizes) != 1)}",
        sum(sizes.values()) or None,
        progress=show,
    ) as bar:
        ticker = _ByteTicker(bar)
        done = 0
        try:
            for path, size in sizes.items():
                ticker.begin(done, size)
                try:
                    index = build_index(
                        path,
                        storage_options=args.storage_options,
                        cache_dir=args.cache_dir,
                        index_store=store,
                        index_store_options=args.store_options,
                    )
                except NeurocubeError as exc:
                    print(f"neurocube: error: {exc}", file=sys.stderr)
                    failed += 1
                else:
                    results.append((path, index))
                done += size
                ticker.finish(done)
        finally:
            ticker.close()
    for path, index in results:
        if index is None:
            print(f"{path}\tnot gzip-compressed: no index needed")
            continue
        where = index
        if store is not None:
            where = f"{storage.join(store, storage.basename(index))}\t(local copy: {index})"
        print(f"{path}\t{where}")
    return 1 if failed else 0
