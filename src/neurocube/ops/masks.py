"""Voxel masks: coerce what a user passes into one boolean grid, checked against the data.

The readers own the pieces (:mod:`neurocube.sources.voxels` checks values,
:mod:`neurocube.sources.nifti` reads mask files, local or remote); this module
is where the operations layer finds them.
"""

from __future__ import annotations

from neurocube.sources.nifti import as_mask, read_volume
from neurocube.sources.voxels import voxel_coords

__all__ = ["as_mask", "read_volume", "voxel_coords"]
