"""Atomic file writes: write a temporary sibling, then rename it into place.

What a write through :func:`atomic_path` guarantees:

- a crash or an exception leaves the old file (or none), never a half-written one;
- a symlink named as the output is kept: the file it points to is replaced (atomically,
  by a temporary beside *that* file), so every name of the file sees the new content;
- the permission bits of the file replaced are kept (a 0600 file stays 0600);
- temporary files are named ``.<name>.nctmp-<host>-<pid>-<random>.tmp<suffixes>``, so the
  next write to the same output removes those whose writer (same host, a pid that no
  longer runs) was killed before it could clean up; a live writer's are never touched;
- a folder that cannot be written is an :class:`~neurocube.errors.AccessDeniedError`
  naming it, raised before anything is written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

from neurocube.errors import AccessDeniedError, FormatError, OutputExistsError

__all__ = ["atomic_path", "remove_stale_temps", "temp_name"]

_TAG = "nctmp"


def _host() -> str:
    """Return this machine's name as temp names carry it (letters, digits, underscores)."""
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:40] or "host"


def temp_name(final: Path) -> Path:
    """Return a new temporary sibling of ``final`` for this process to write."""
    tail = "".join(final.suffixes)
    return final.with_name(
        f".{final.name}.{_TAG}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{tail}"
    )


def _pid_running(pid: int) -> bool:
    if pid <= 0:
        return True  # not ours to judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    except OSError:
        return True
    return True


def remove_stale_temps(final: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files of ``final`` left by writers that are gone; return them.

    Only temps written on this host by a process id that no longer runs are removed;
    temps of other hosts (a shared folder) and of live processes stay.
    """
    final = Path(final)
    pattern = re.compile(
        re.escape(f".{final.name}.{_TAG}-") + r"(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[0-9a-f]+\.tmp"
    )
    removed: list[Path] = []
    try:
        entries = list(os.scandir(final.parent))
    except OSError:
        return removed
    host = _host()
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None or match["host"] != host or _pid_running(int(match["pid"])):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                continue
            os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def _real_target(final: Path) -> Path:
    """Return the file a write to ``final`` replaces: itself, or what its links name."""
    if not final.is_symlink():
        return final
    try:
        resolved = Path(os.path.realpath(final, strict=True))
    except FileNotFoundError:  # a dangling link: create the file it names
        resolved = Path(os.path.realpath(final))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise FormatError(
                f"{final}: a symbolic link loop (the link points, through other links, back to "
                "itself); nothing was written. Replace the link by a file or a link to one."
            ) from exc
        raise
    except RuntimeError as exc:  # older Pythons report loops so
        raise FormatError(
            f"{final}: a symbolic link loop; nothing was written. Replace the link by a file "
            "or a link to one."
        ) from exc
    if resolved.is_dir():
        raise IsADirectoryError(f"{final}: a link to the folder {resolved}, expected a file")
    return resolved


def _denied(folder: Path, exc: OSError) -> AccessDeniedError:
    return AccessDeniedError(
        f"{folder}: cannot write here ({exc.strerror or exc}); nothing was written. Choose a "
        "folder you can write to, or change its permissions."
    )


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    A crash or an exception inside the block leaves ``path`` as it was (absent
    or the old file) and removes the temporary file. See the module docstring for
    symlinks, permission bits and temporary files of killed writers.

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
        Where the caller writes the new content (an empty file already exists there).
        Its name keeps the final suffixes so that libraries which check suffixes still
        accept it.

    Raises
    ------
    AccessDeniedError
        If the folder cannot be created or written (a ``PermissionError``).
    """
    named = Path(path)
    if not overwrite and named.exists():
        raise OutputExistsError(f"{named} exists; pass overwrite=True to replace it.")
    final = _real_target(named)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except PermissionError as exc:
        raise _denied(final.parent, exc) from exc
    except FileExistsError as exc:
        raise FormatError(
            f"{final.parent}: expected a folder to write {final.name} into, found a file."
        ) from exc
    remove_stale_temps(final)
    try:
        mode: int | None = stat.S_IMODE(os.stat(final).st_mode)
    except OSError:
        mode = None
    tmp = temp_name(final)
    try:
        with open(tmp, "xb"):
            pass
    except PermissionError as exc:
        raise _denied(final.parent, exc) from exc
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES):
            raise _denied(final.parent, exc) from exc
        raise
    try:
        yield tmp
        if tmp.is_dir():
            raise IsADirectoryError(f"atomic_path is for files; {tmp} is a folder")
        if mode is not None:
            os.chmod(tmp, mode)
        with open(tmp, "rb+") as fh:  # flush to disk before the rename makes it visible
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
