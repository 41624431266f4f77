"""Storage options: frozen, picklable, with secrets redacted from every text.

Also the options remembered per remote location opened in this process
(:func:`remember_options`, :func:`options_for`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from neurocube.errors import ArgumentError
from neurocube.storage.locations import is_local, normalize

#: Option names whose values are secrets (matched case-insensitively, at any depth).
SECRET_NAMES = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "session_token",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "client_secret",
        "credentials",
        "access_key",
        "secret_key",
        "sas_token",
        "account_key",
        "connection_string",
        "authorization",
        "headers",
        "auth",
    }
)


def redact(value: Any) -> Any:
    """Return ``value`` (storage options, possibly nested) with every secret replaced by ``***``."""
    if isinstance(value, Mapping):
        return {
            k: ("***" if str(k).lower() in SECRET_NAMES else redact(v)) for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


class StorageOptions(Mapping[str, Any]):
    """Frozen, picklable ``storage_options`` whose text never shows a secret.

    It travels inside specs to Dask workers (which read with it), so it is
    pickled whole; ``repr``, ``str`` and Dask tokens see the options with
    every secret (key, secret, token, ...) redacted, so credentials reach no
    cache key, attribute, message or log. Two sets of options that differ only
    in their secrets tokenize alike: the data they reach is the same.
    """

    __slots__ = ("_json",)
    _json: str

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        try:
            text = json.dumps(dict(options or {}), sort_keys=True)
        except TypeError as exc:
            raise TypeError(
                "storage_options must be a dict of JSON values (strings, numbers, booleans, "
                "lists and dicts of them) so that Dask workers can receive it; found a value "
                f"that is not ({exc}). Pass credentials as strings, or set them in the "
                "environment."
            ) from None
        object.__setattr__(self, "_json", text)

    def as_dict(self) -> dict[str, Any]:
        """Return a fresh, mutable copy of the options (secrets included: hand it to fsspec)."""
        out: dict[str, Any] = json.loads(self._json)
        return out

    def public(self) -> dict[str, Any]:
        """Return the options with secrets redacted."""
        out: dict[str, Any] = redact(self.as_dict())
        return out

    def __getitem__(self, key: str) -> Any:
        return self.as_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.as_dict())

    def __len__(self) -> int:
        return len(self.as_dict())

    def __hash__(self) -> int:
        return hash(self._json)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, StorageOptions):
            return self._json == other._json
        if isinstance(other, Mapping):
            return self.as_dict() == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"StorageOptions({self.public()!r})"

    __str__ = __repr__

    def __reduce__(self) -> tuple[Any, ...]:
        return (StorageOptions, (self.as_dict(),))

    def __dask_tokenize__(self) -> Any:
        return ("neurocube.StorageOptions", json.dumps(self.public(), sort_keys=True))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("StorageOptions is frozen")


def as_options(options: Mapping[str, Any] | None) -> StorageOptions | None:
    """Return ``options`` frozen as :class:`StorageOptions`, or None for none given."""
    if options is None:
        return None
    if isinstance(options, StorageOptions):
        return options
    if not isinstance(options, Mapping):
        raise ArgumentError(
            f"storage_options must be a dict (e.g. {{'anon': True}}), found "
            f"{type(options).__name__}"
        )
    return StorageOptions(options) if options else None


# --- options of opened locations ------------------------------------------------------------

_KNOWN_OPTIONS: dict[str, StorageOptions] = {}
_KNOWN_LOCK = threading.Lock()


def remember_options(location: str, storage_options: Mapping[str, Any] | None) -> None:
    """Record the options a remote location was opened with, for this process.

    Attributes may name sources by URL only (never with credentials); code
    that later stats such a source (cache keys, change checks) finds the
    options here with :func:`options_for`. Local paths are not recorded.
    """
    opts = as_options(storage_options)
    if opts is None or is_local(location):
        return
    with _KNOWN_LOCK:
        _KNOWN_OPTIONS[normalize(location)] = opts


def options_for(location: str) -> StorageOptions | None:
    """Return the options recorded for ``location`` or its nearest recorded parent, else None."""
    if is_local(location):
        return None
    loc = normalize(location)
    with _KNOWN_LOCK:
        while True:
            opts = _KNOWN_OPTIONS.get(loc)
            if opts is not None:
                return opts
            if "/" not in loc.split("://", 1)[-1]:
                return None
            loc = loc.rsplit("/", 1)[0]
