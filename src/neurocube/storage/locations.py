"""Locations: telling URLs from local paths, and normalizing, joining and splitting them.

Pure text work plus resolving local paths; no listing and no request to a backend.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from neurocube.errors import ArgumentError, DataNotFoundError


def is_url(path: Any) -> bool:
    """Return True if ``path`` is an fsspec URL such as ``s3://...`` (``file://`` included)."""
    return isinstance(path, str) and "://" in path


def is_local(path: Any) -> bool:
    """Return True for a local path (``file://`` URLs included)."""
    return not is_url(path) or str(path).startswith("file://")


def local_path(path: str | os.PathLike[str]) -> Path:
    """Return a local path as an absolute :class:`~pathlib.Path` (symlinks resolved).

    Raises
    ------
    ValueError
        If ``path`` is a remote URL.
    """
    text = os.fspath(path)
    if is_url(text):
        if not text.startswith("file://"):
            raise ValueError(f"{text}: a remote URL, not a local path")
        text = text[len("file://") :]
    try:
        return Path(text).expanduser().resolve()
    except RuntimeError as exc:  # Python < 3.13: a symlink loop
        raise DataNotFoundError(
            f"{text}: a symlink loop ({exc}); expected a file or folder. Fix or remove the link."
        ) from exc
    except ValueError as exc:  # a NUL byte in the path
        raise ArgumentError(f"{text!r}: not a usable path ({exc}); expected a file name") from exc


def normalize(path: str | os.PathLike[str]) -> str:
    """Return the canonical text of a location: an absolute local path, or the URL itself.

    A trailing ``/`` of a URL is removed; ``file://`` URLs become local paths.
    """
    if isinstance(path, (str, os.PathLike)) and not (
        isinstance(path, str) and is_url(path) and not path.startswith("file://")
    ):
        return str(local_path(path))
    if not isinstance(path, str):
        raise ArgumentError(
            f"expected a path or URL string, found {type(path).__name__}: {path!r}"
        )
    return path.rstrip("/") if not path.endswith("://") else path


def join(base: str, *parts: str) -> str:
    """Join ``parts`` to a location with ``/`` (URLs) or the OS separator (local paths)."""
    if is_url(base):
        out = base.rstrip("/")
        for p in parts:
            out += "/" + str(p).strip("/")
        return out
    return os.path.join(base, *parts)


def basename(path: str) -> str:
    """Return the last component of a path or URL."""
    return str(path).rstrip("/").rsplit("/", 1)[-1] if is_url(path) else os.path.basename(path)


def parent(path: str) -> str:
    """Return the location one level up."""
    if is_url(path):
        return str(path).rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(path)


def relative(path: str, root: str) -> str:
    """Return ``path`` relative to ``root`` with ``/`` separators."""
    if is_url(path):
        return str(path)[len(root.rstrip("/")) + 1 :]
    return os.path.relpath(path, root).replace(os.sep, "/")
