"""Errors and warnings raised by neurocube.

Every error derives from :class:`NeurocubeError`, and each subclass also derives
from the builtin a caller would naturally catch (``FileNotFoundError``,
``ValueError``, ``KeyError``, ...), so ``except ValueError`` keeps working.

Messages name the file, what was expected, what was found and what to do.
"""

from __future__ import annotations

__all__ = [
    "CacheError",
    "DataNotDownloadedError",
    "DataNotFoundError",
    "FormatError",
    "GridMismatchError",
    "IncompleteFileError",
    "IndexMismatchError",
    "NeurocubeError",
    "NeurocubeWarning",
    "OutputExistsError",
    "ReaderNotFoundError",
    "SelectionError",
    "TruncatedFileError",
    "UnsafeDataError",
    "UnsafePathError",
    "AttributeMismatchError",
    "AccessDeniedError",
    "CorruptDataError",
    "DataChangedError",
    "SourceChangedError",
    "StorageError",
    "ArgumentError",
]


class NeurocubeError(Exception):
    """Base class of every error neurocube raises on purpose."""


class DataNotFoundError(NeurocubeError, FileNotFoundError):
    """A file or folder the caller asked for does not exist."""


class DataNotDownloadedError(DataNotFoundError):
    """A file that belongs to a known layout is not on disk (not downloaded yet)."""


class FormatError(NeurocubeError, ValueError):
    """A file is not in the format expected, or its content contradicts itself."""


class TruncatedFileError(FormatError):
    """A file ends before the data its header announces."""


class IncompleteFileError(FormatError):
    """A file was left half-written by its writer (e.g. no completion stamp)."""


class IndexMismatchError(FormatError):
    """A seek index (gzip index, cache entry) does not belong to the file it was given for."""


class GridMismatchError(NeurocubeError, ValueError):
    """A mask or image lies on another voxel grid (shape or affine) than the data."""


class SelectionError(NeurocubeError, KeyError):
    """A selection (ROI, session, subject, trial filter) names something that does not exist."""

    def __str__(self) -> str:  # KeyError would repr() the message; keep it readable.
        return str(self.args[0]) if self.args else ""


class ReaderNotFoundError(NeurocubeError, ValueError):
    """No reader knows how to open a path."""


class UnsafeDataError(NeurocubeError, ValueError):
    """Opening a file would need pickle (or similar) and the caller did not say it is trusted."""


class CacheError(NeurocubeError, OSError):
    """A cache entry or cache folder cannot be used."""


class OutputExistsError(NeurocubeError, FileExistsError):
    """A writer was asked not to overwrite (``overwrite=False``) and its output exists."""


class NeurocubeWarning(UserWarning):
    """Base class of neurocube's warnings (the test suite turns them into errors)."""


class UnsafePathError(NeurocubeError, PermissionError):
    """A path read from a manifest or index points outside the dataset and would be written to."""


class AttributeMismatchError(NeurocubeError, ValueError):
    """Attributes given to a writer did not come from the file and record they would overwrite."""


class StorageError(NeurocubeError, OSError):
    """A storage backend (S3, HTTP, ...) failed: unreachable, misconfigured or broken mid-read."""


class AccessDeniedError(StorageError, PermissionError):
    """The storage backend refused access (HTTP 403): credentials or ``storage_options`` needed."""


class SourceChangedError(FormatError):
    """A file or object changed (size, mtime, ETag) between opening it and reading its values."""


#: The name this error had before issue 11; kept so ``except DataChangedError`` keeps working.
DataChangedError = SourceChangedError


class CorruptDataError(FormatError):
    """Bytes read from a source or cache failed their checksum; their values are not returned.

    The checksums: gzip CRC32, per-volume checksums, crc32c of cache chunks, parquet page CRCs,
    zip CRCs of NPZ members, HDF5 fletcher32.
    """


class ArgumentError(NeurocubeError, TypeError, ValueError):
    """An argument of the wrong type or value (``open_nifti(123)``, ``chunks=0``, ...).

    Both a ``TypeError`` and a ``ValueError``, so either ``except`` keeps working; the message
    names the argument, what was expected and what was found.
    """
