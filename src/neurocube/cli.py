"""The ``neurocube`` command line.

Each subcommand lives in its own module that defines ``register(subparsers)``;
this file only lists those modules, so the command stays cheap to start.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from neurocube import __version__
from neurocube.errors import NeurocubeError

# Modules that add subcommands, in the order `neurocube --help` shows them.
COMMAND_MODULES: list[str] = [
    "neurocube.demo",
    "neurocube.caching.cli",
]


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="neurocube",
        description="Lazy, out-of-core access to neuroscience data (xarray + Dask).",
    )
    parser.add_argument("--version", action="version", version=f"neurocube {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except NeurocubeError as exc:
        print(f"neurocube: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
