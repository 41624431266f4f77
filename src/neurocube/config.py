"""Run-time settings: where caches live, whether progress bars show.

Each setting is resolved in the same order: an explicit argument, then an
environment variable, then a default.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir", "progress_enabled"]

CACHE_ENV = "NEUROCUBE_CACHE_DIR"
PROGRESS_ENV = "NEUROCUBE_PROGRESS"


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Return neurocube's cache folder (not created here).

    Parameters
    ----------
    override
        A folder given by the caller; wins over everything else.

    Returns
    -------
    pathlib.Path
        ``override``, else ``$NEUROCUBE_CACHE_DIR``, else
        ``$XDG_CACHE_HOME/neurocube`` (``~/.cache/neurocube`` by default).
    """
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "neurocube"


def progress_enabled(override: bool | None = None) -> bool:
    """Return whether long operations should show a progress bar.

    ``override`` wins; else ``$NEUROCUBE_PROGRESS`` (``0``/``false``/``off``
    disable it); else on.
    """
    if override is not None:
        return bool(override)
    value = os.environ.get(PROGRESS_ENV, "1").strip().lower()
    return value not in {"0", "false", "no", "off", ""}
