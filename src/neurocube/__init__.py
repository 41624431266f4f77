"""neurocube: lazy, out-of-core xarray/Dask access to neuroscience data.

Importing neurocube is cheap: the readers (and dask.distributed, zarr, h5py)
load only when one of the names below is first used.

Examples
--------
>>> import neurocube
>>> callable(neurocube.open_nifti)
True
"""

from __future__ import annotations

import importlib
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
