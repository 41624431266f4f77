"""Atomic file writes: write a temporary sibling, then rename it into place."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from neurocube.errors import OutputExistsError

__all__ = ["atomic_path"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    A crash or an exception inside the block leaves ``path`` as it was (absent
    or the old file) and removes the temporary file.

    Parameters
    ----------
    path
        The final destination.
    overwrite
        If False and ``path`` exists, raise :class:`~neurocube.errors.OutputExistsError`
        (a ``FileExistsError``) before writing.

    Yields
    ------
    pathlib.Path
        Where the caller writes the new content. Its name keeps the final
        suffix so that libraries which check suffixes still accept it.
    """
    final = Path(path)
    if not overwrite and final.exists():
        raise OutputExistsError(f"{final} exists; pass overwrite=True to replace it.")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}.tmp{''.join(final.suffixes)}")
    try:
        yield tmp
        if tmp.is_dir():
            raise IsADirectoryError(f"atomic_path is for files; {tmp} is a folder")
        with open(tmp, "rb+") as fh:  # flush to disk before the rename makes it visible
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
