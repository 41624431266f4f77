"""Readers, one per file format; each returns lazy arrays that hold a spec, never a handle."""
