"""Zarr spill cache: content-addressed keys, atomic writes, lazy reopen."""
