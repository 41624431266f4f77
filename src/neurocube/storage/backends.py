"""fsspec filesystems and the translation of their errors.

One filesystem instance per (protocol, options) per process; backend errors
(s3fs, aiohttp, botocore, OS) become neurocube errors naming the URL, never the options.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from neurocube.errors import AccessDeniedError, DataNotFoundError, NeurocubeError, StorageError
from neurocube.storage.options import as_options, redact

_FS_CACHE: dict[tuple[str, str], Any] = {}
_FS_LOCK = threading.Lock()


def filesystem(url: str, options: Mapping[str, Any] | None) -> tuple[Any, str]:
    """Return ``(fsspec filesystem, path inside it)`` for a URL (one instance per options)."""
    import fsspec
    from fsspec.core import split_protocol

    protocol, _ = split_protocol(url)
    opts = as_options(options)
    key = (protocol or "file", opts._json if opts is not None else "{}")
    with _FS_LOCK:
        fs = _FS_CACHE.get(key)
    if fs is None:
        try:
            fs = fsspec.filesystem(protocol, **(opts.as_dict() if opts is not None else {}))
        except ImportError as exc:
            package = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs",
                       "abfs": "adlfs", "http": "aiohttp", "https": "aiohttp"}.get(
                           protocol or "", "the fsspec backend")
            raise StorageError(
                f"{url}: reading {protocol}:// URLs needs {package} ({exc}); install it with "
                f"pip install {package}."
            ) from None
        except (TypeError, ValueError) as exc:
            raise StorageError(
                f"{url}: fsspec refused these storage_options "
                f"{redact(opts.as_dict() if opts else {})} ({type(exc).__name__}). Expected "
                "options of the backend, e.g. {'anon': True} or "
                "{'key': ..., 'secret': ..., 'client_kwargs': {'endpoint_url': ...}} for S3."
            ) from None
        with _FS_LOCK:
            fs = _FS_CACHE.setdefault(key, fs)
    return fs, fs._strip_protocol(url)


def _describe(exc: BaseException) -> str:
    """Describe a backend error briefly, with no request details that could carry secrets."""
    name = type(exc).__name__
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{name}: {text[:200]}" if text else name


@contextlib.contextmanager
def translate_errors(url: str, what: str = "read", byte_range: tuple[int, int] | None = None
                     ) -> Iterator[None]:
    """Turn backend errors (s3fs, aiohttp, botocore, OS) into neurocube errors naming ``url``."""
    where = f" (bytes {byte_range[0]}-{byte_range[1] - 1})" if byte_range else ""
    try:
        yield
    except NeurocubeError:
        raise
    except FileNotFoundError as exc:
        raise DataNotFoundError(
            f"{url}: no such file or object. Check the path or URL (and, for a bucket, the "
            "endpoint and region in storage_options)."
        ) from _chain(exc)
    except PermissionError as exc:
        raise AccessDeniedError(
            f"{url}: access denied while trying to {what}{where} ({_describe(exc)}). The "
            "data may need credentials: pass storage_options={'key': ..., 'secret': ...} "
            "(or {'anon': True} for a public bucket), or set them in the environment."
        ) from _chain(exc)
    except IsADirectoryError as exc:
        raise DataNotFoundError(f"{url}: is a folder, expected a file") from _chain(exc)
    except Exception as exc:
        module = type(exc).__module__ or ""
        if "NoCredentials" in type(exc).__name__ or "Credential" in type(exc).__name__:
            raise StorageError(
                f"{url}: no credentials to {what} it ({_describe(exc)}). Pass "
                "storage_options={'anon': True} for a public bucket, or "
                "{'key': ..., 'secret': ...}; an S3-compatible server also needs "
                "{'client_kwargs': {'endpoint_url': 'https://...'}}."
            ) from _chain(exc)
        if isinstance(exc, (OSError, TimeoutError)) or module.split(".")[0] in {
            "botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec", "gcsfs", "adlfs",
        }:
            raise StorageError(
                f"{url}: could not {what}{where} ({_describe(exc)}), after the backend's "
                "retries. Check the network, the endpoint in storage_options and that the "
                "object exists; then try again."
            ) from _chain(exc)
        raise


def _chain(exc: BaseException) -> BaseException | None:
    """Return the exception to chain from: a builtin one, never a backend's (may show headers)."""
    return exc if type(exc).__module__ == "builtins" else None
