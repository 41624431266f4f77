"""Writers: NIfTI, spectral HDF5 caches, connectome TSV, GIFTI, NPZ, embedding derivatives.

NIfTI: ``save_nifti`` writes a 3-D/4-D array; ``voxels_to_nifti`` (``da.neuro.to_nifti``)
scatters a per-voxel result onto its grid first.

Every writer is atomic (temporary sibling, then rename). Names load lazily.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    "atomic_path": "neurocube.io._atomic",
    "save_nifti": "neurocube.io.nifti",
    "voxels_to_nifti": "neurocube.io.nifti",
    # spectral caches (issue: HDF5 sources)
    "save_spectral": "neurocube.io.spectral",
    "save_connectome": "neurocube.io.spectral",
    "read_connectome": "neurocube.io.spectral",
    "save_gifti_func": "neurocube.io.spectral",
    "save_npz": "neurocube.io.spectral",
    # embedding derivatives
    "save_embedding_derivative": "neurocube.io.embeddings",
    "validate_embedding_derivative": "neurocube.io.embeddings",
    "write_embedding_manifest": "neurocube.io.embeddings",
    "write_embedding_dataset_description": "neurocube.io.embeddings",
    # behaviour datasets (mosaic layout)
    "save_manifest": "neurocube.io.behavior",
    "write_index_csv": "neurocube.io.behavior",
    "save_tracks": "neurocube.io.behavior",
    "index_tracks_raw": "neurocube.io.behavior",
    "convert_tracks": "neurocube.io.behavior",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'neurocube.io' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
