"""Catalogs: find files, parse BIDS-like entities, read headers only."""
