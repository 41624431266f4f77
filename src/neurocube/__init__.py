"""neurocube: lazy, out-of-core xarray/Dask access to neuroscience data.

Importing neurocube is cheap: the readers (and xarray, dask.distributed, zarr,
h5py) load only when one of the names below is first used. The ``.neuro``
accessor on xarray objects is there as soon as both neurocube and xarray are
imported, in either order (see :func:`_register_accessor_with_xarray`).

Examples
--------
>>> import neurocube
>>> callable(neurocube.open_nifti)
True
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

__version__ = "0.1.0"

# Public name -> module that defines it. Loaded on first attribute access
# (PEP 562) so that `import neurocube` stays light.
_LAZY: dict[str, str] = {
    # fMRI: NIfTI volumes and the single-trial betas bucket
    "open_nifti": "neurocube.sources.nifti",
    "open_subject": "neurocube.datasets.fmri",
    "open_subjects": "neurocube.datasets.fmri",
    "roi_means": "neurocube.datasets.fmri",
    # Train/test splits that keep every repeat of a stimulus on one side
    "split_trials": "neurocube.ops.splits",
    # Mini-batches for model training, each chunk read once per epoch
    "batches": "neurocube.ops.batches",
    "Subject": "neurocube.datasets.fmri",
    # HDF5: spectral decompositions and TMS traces
    "open_spectral": "neurocube.datasets.spectral",
    "open_spectral_many": "neurocube.datasets.spectral",
    "open_traces": "neurocube.datasets.traces",
    # Foundation-model embeddings (BIDS derivatives)
    "open_embeddings": "neurocube.datasets.embeddings",
    "open_combined_table": "neurocube.datasets.embeddings",
    "write_combined_tables": "neurocube.datasets.embeddings",
    "catalog_embeddings": "neurocube.catalog.embeddings",
    # Behaviour tracking datasets
    "open_behavior": "neurocube.datasets.behavior",
    "BehaviorDataset": "neurocube.datasets.behavior",
    "index_tracks_raw": "neurocube.io.behavior",
    "convert_tracks": "neurocube.io.behavior",
    # Memory-lean loading (each chunk written into place; no final concatenation)
    "load": "neurocube.loading",
    # Zarr spill cache
    "cache": "neurocube.caching",
    "cache_info": "neurocube.caching",
    "clear_cache": "neurocube.caching",
    "evict_cache": "neurocube.caching",
    "open_cached": "neurocube.caching",
}

# Submodules reachable as attributes (neurocube.io.save_spectral, neurocube.traces.get_attrs, ...).
_SUBMODULES = {"errors", "io", "traces", "config"}

__all__ = sorted([*_LAZY, *_SUBMODULES, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"neurocube.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'neurocube' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


# --- the .neuro accessor, without importing xarray here -------------------------------------
#
# `import neurocube` must stay light (no xarray, pandas or Dask: the CLI's --help and worker
# start-up pay for every import), yet `ds.neuro` must work on any xarray object as soon as
# neurocube is imported. Registering an accessor needs xarray, so it is done when xarray is
# there: now if it is already imported, else right after its import completes, through a
# one-shot finder that wraps xarray's loader (the post-import hook of PEP 369, which wrapt
# also implements). Nothing else about the import of xarray changes.


def _register_accessor() -> None:
    try:
        import neurocube.accessor  # noqa: F401  (registers .neuro on Dataset and DataArray)
    except Exception:  # never break the user's `import xarray`; readers register it again
        pass


class _RegisterAfterExec(importlib.abc.Loader):
    """Run xarray's own loader, then register the accessor; the module keeps its real loader."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        module: ModuleType | None = self._loader.create_module(spec)
        return module

    def exec_module(self, module: ModuleType) -> None:
        spec = module.__spec__
        if spec is not None:
            spec.loader = self._loader  # importlib.resources and friends see xarray's loader
        module.__loader__ = self._loader
        self._loader.exec_module(module)
        _register_accessor()


class _XarrayImportHook(importlib.abc.MetaPathFinder):
    """Find ``xarray`` through the other finders and hand back its spec with a wrapped loader."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "xarray":
            return None
        _remove_hook()  # one shot, and no recursion through the lookup below
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec: importlib.machinery.ModuleSpec | None = find(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisterAfterExec(spec.loader)
                return spec
        return None


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _XarrayImportHook)]


def _register_accessor_with_xarray() -> None:
    """Register ``.neuro`` now if xarray is imported, else as soon as it is."""
    xarray = sys.modules.get("xarray")
    if xarray is not None:
        if hasattr(xarray, "register_dataarray_accessor"):  # not while xarray itself imports
            _register_accessor()
        return
    if not any(isinstance(f, _XarrayImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _XarrayImportHook())


_register_accessor_with_xarray()
