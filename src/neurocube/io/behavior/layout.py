"""One behaviour dataset as its readers and writers see it: :class:`DatasetLayout`.

The manifest, the dataset folder, the index files, the paths stored in them and
the refusal of any write that leaves the dataset; plus the helpers the writers
use to get a layout from what they are given (a folder, a manifest, a catalog
or a dataset), to store a path and to find a root they may write into.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from neurocube import storage
from neurocube.errors import DataNotFoundError, FormatError, UnsafePathError
from neurocube.io.behavior.conventions import is_inside
from neurocube.io.behavior.index import index_file, read_index_csv
from neurocube.io.behavior.manifest import Manifest
from neurocube.storage import StorageOptions, is_url


class DatasetLayout:
    """The layout of one behaviour dataset: manifest, root, index files, stored paths.

    Holds what readers and writers both need: where the index CSVs are, reading
    one (every cell text), resolving the paths stored in them and refusing
    writes that leave the dataset. Writers given a path use it as it is (a
    local dataset); :class:`~neurocube.catalog.behavior.BehaviorCatalog` builds
    on it (URLs, ``path_map``, cached indexes), so this module needs nothing
    from the layers above it.
    """

    def __init__(
        self,
        manifest: Manifest,
        *,
        path_map: Mapping[str, str] | None = None,
        storage_options: StorageOptions | None = None,
    ) -> None:
        self.manifest = manifest
        self.path_map: dict[str, str] = dict(path_map or {})
        self.storage_options = storage_options

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> DatasetLayout:
        """Open a local dataset from its folder or manifest, to write into it."""
        if is_url(path):
            raise UnsafePathError(
                f"{path}: behaviour datasets at a URL are read-only; write into a local copy."
            )
        return cls(Manifest.load(path))

    @property
    def root(self) -> Path:
        """The dataset folder."""
        return self.manifest.dataset_dir

    def index_path(self, kind: str) -> Path:
        """Return the index CSV of ``tracks_raw``, ``tracks`` or ``labels/<kind>``."""
        return index_file(self.manifest, kind)

    def read_index(self, kind: str) -> pd.DataFrame:
        """Read an index CSV (every cell text).

        Raises
        ------
        DataNotFoundError
            If the index does not exist.
        """
        path = self.index_path(kind)
        if not storage.isfile(path):
            raise DataNotFoundError(f"{path}: no {kind} index in dataset {self.root}.")
        return self._load_index(path)

    def _load_index(self, path: str | os.PathLike[str]) -> pd.DataFrame:
        """Read an index CSV that has an ``abs_path`` column; blank group/sequence/run_id added."""
        table = read_index_csv(path, self.storage_options)
        if "abs_path" not in table.columns:
            raise FormatError(f"{path}: index has no 'abs_path' column; found "
                              f"{list(table.columns)}.")
        for col in ("group", "sequence", "run_id"):
            if col not in table.columns:
                table[col] = ""
        return table

    def _stored_text(self, path: str | os.PathLike[str]) -> str:
        """Return the text of a path stored in the manifest or an index (empty: an error)."""
        text = os.fspath(path).strip()
        if not text:
            raise FormatError(f"{self.manifest.path}: empty path in an index row")
        return text

    def resolve_path(
        self, path: str | os.PathLike[str], anchor: str | os.PathLike[str] | None = None
    ) -> Path:
        """Resolve a stored path to an absolute local path.

        A relative path is taken relative to ``anchor`` (default: the dataset
        folder); an absolute one goes through :meth:`_resolve_absolute`.
        """
        p = Path(self._stored_text(path)).expanduser()
        if not p.is_absolute():
            return Path(anchor) / p if anchor is not None else self.root / p
        return self._resolve_absolute(p)

    def _resolve_absolute(self, path: Path) -> Path:
        """Return an absolute stored path as it is (a catalog remaps paths that moved)."""
        return path

    def check_writable(self, path: str | os.PathLike[str], what: str) -> Path:
        """Return ``path`` if it lies inside the dataset, else raise :class:`UnsafePathError`."""
        p = Path(path)
        if not is_inside(p, self.root):
            raise UnsafePathError(
                f"{what}: {p} lies outside the dataset {self.root}; neurocube never writes there "
                "(a '..' or a path_map prefix points away). Fix the manifest root or index path."
            )
        return p

    def invalidate(self) -> None:
        """Forget anything cached (after a writer changed the indexes); nothing here."""


def writable_layout(dataset: Any) -> Any:
    """Return the catalog of ``dataset`` (a catalog, a dataset holding one, or a path) to write.

    A path is opened as a :class:`DatasetLayout`; a dataset at a URL is refused
    (:class:`~neurocube.errors.UnsafePathError`).
    """
    catalog = getattr(dataset, "catalog", dataset)
    if all(hasattr(catalog, name) for name in
           ("manifest", "read_index", "resolve_path", "check_writable", "invalidate")):
        if getattr(catalog.manifest, "is_remote", False):
            raise UnsafePathError(
                f"{catalog.manifest.path}: behaviour datasets at a URL are read-only; write "
                "into a local copy."
            )
        return catalog
    return DatasetLayout.open(dataset)


def stored_path(catalog: Any, path: Path) -> str:
    """Dataset-relative POSIX path when inside the dataset, else the absolute path."""
    real = Path(os.path.realpath(path))
    base = Path(os.path.realpath(catalog.root))
    if real == base or base in real.parents:
        return real.relative_to(base).as_posix()
    return str(real)


def writable_root(catalog: Any, key: str) -> Path:
    """Return the folder of root ``key``, refusing one that leaves the dataset."""
    folder = catalog.manifest.get_root(key)
    if not is_inside(folder, catalog.root):
        raise UnsafePathError(
            f"{catalog.manifest.path}: root {key!r} is {folder}, outside the dataset "
            f"{catalog.root}; neurocube writes only inside a dataset. Point the root inside it."
        )
    return folder
