"""The ``neurocube`` command line.

Each subcommand lives in its own module that defines ``register(subparsers)``;
this file only lists those modules, so the command stays cheap to start.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from neurocube import __version__
from neurocube.errors import NeurocubeError

# Modules that add subcommands, in the order `neurocube --help` shows them.
COMMAND_MODULES: list[str] = [
    "neurocube.demo",
    "neurocube.cache_cli",
    "neurocube.indexing_cli",
    "neurocube.info_cli",
]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Plain-text help that keeps descriptions as written and shows each option's default.

    A default is added as ``(default: X)`` unless the help text already says
    what the default is, or there is none to show (None, False).
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS):
            return text
        if not action.option_strings and action.nargs not in ("?", "*"):
            return text
        return text + " (default: %(default)s)"


def _plain_help_everywhere(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` and every subcommand under it :class:`HelpFormatter`."""
    if parser.formatter_class in (argparse.HelpFormatter, argparse.RawDescriptionHelpFormatter):
        parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                _plain_help_everywhere(sub)


def json_options(text: str) -> dict[str, Any]:
    """Parse a ``--storage-options`` value: a JSON object, or ``@file.json`` holding one.

    Used as an argparse ``type``: a bad value makes argparse print a short
    message and exit with status 2. The message never repeats the text, which
    may hold credentials.
    """
    source = "the value"
    if text.startswith("@"):
        source = text[1:]
        try:
            text = Path(source).expanduser().read_text()
        except OSError as exc:
            raise argparse.ArgumentTypeError(
                f"cannot read {source} ({exc.strerror or type(exc).__name__})"
            ) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(
            f"{source} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
            'expected an object such as \'{"anon": true}\' or '
            '\'{"key": "...", "secret": "...", "client_kwargs": {"endpoint_url": "..."}}\''
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"{source} must be a JSON object (a dict of fsspec options), found a JSON "
            f"{type(value).__name__}"
        )
    return value


def add_storage_options(parser: argparse.ArgumentParser, *, flag: str = "--storage-options",
                        what: str = "the data") -> None:
    """Add a ``--storage-options JSON`` argument (fsspec options for URLs) to ``parser``."""
    parser.add_argument(
        flag,
        type=json_options,
        default=None,
        metavar="JSON",
        help=f"fsspec options for reaching {what} at a URL, as JSON (e.g. '{{\"anon\": true}}'), "
        "or @FILE to read them from a file (keeps keys out of the process list)",
    )


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
    _plain_help_everywhere(parser)
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
