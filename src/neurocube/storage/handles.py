"""The handle pool: a per-process LRU of open file handles, each with its own lock.

A forked child leaves the handles it inherited alone and opens files anew.
"""

from __future__ import annotations

import collections
import io
import os
import threading
import weakref
from collections.abc import Callable, Hashable
from typing import Any

_ABANDONED_AFTER_FORK: list[Any] = []  # a forked child's inherited handles, never touched


def _forget_after_fork(ref: Any) -> None:
    pool = ref()
    if pool is not None:
        pool._after_fork()


class HandlePool:
    """A per-process LRU of open handles, each with its own lock.

    ``acquire(key, opener)`` returns ``(handle, lock)``; the caller holds
    ``lock`` while it uses the handle. Handles are closed when evicted.
    A pool is never pickled: a module-level pool exists once per process.
    """

    def __init__(self, maxsize: int = 64) -> None:
        self.maxsize = maxsize
        self._lock = threading.Lock()
        self._handles: collections.OrderedDict[Hashable, tuple[Any, threading.Lock]] = (
            collections.OrderedDict()
        )
        if hasattr(os, "register_at_fork"):  # a forked child (e.g. a DataLoader worker)
            ref = weakref.ref(self)
            os.register_at_fork(after_in_child=lambda: _forget_after_fork(ref))

    def _after_fork(self) -> None:
        """In a forked child: leave the parent's handles alone and open files anew.

        The old handles are kept referenced, never closed or collected here: their
        destructors may take library locks that another thread of the parent held
        at fork time (h5py's, for one), which would hang the child.
        """
        _ABANDONED_AFTER_FORK.append(self._handles)
        self._lock = threading.Lock()
        self._handles = collections.OrderedDict()

    def acquire(self, key: Hashable, opener: Callable[[], Any]) -> tuple[Any, threading.Lock]:
        """Return the handle for ``key`` (opening it with ``opener`` if needed) and its lock."""
        with self._lock:
            entry = self._handles.get(key)
            if entry is not None:
                self._handles.move_to_end(key)
                return entry
        handle = opener()
        with self._lock:
            entry = self._handles.get(key)
            if entry is not None:  # another thread opened it meanwhile
                _close_quietly(handle)
                self._handles.move_to_end(key)
                return entry
            entry = (handle, threading.Lock())
            self._handles[key] = entry
            while len(self._handles) > self.maxsize:
                _, (old, old_lock) = self._handles.popitem(last=False)
                with old_lock:
                    _close_quietly(old)
            return entry

    def discard(self, key: Hashable) -> None:
        """Close and forget the handle for ``key`` (e.g. after the file changed)."""
        with self._lock:
            entry = self._handles.pop(key, None)
        if entry is not None:
            with entry[1]:
                _close_quietly(entry[0])

    def discard_matching(self, predicate: Callable[[Hashable], bool]) -> None:
        """Close and forget every handle whose key satisfies ``predicate``."""
        with self._lock:
            keys = [key for key in self._handles if predicate(key)]
            entries = [self._handles.pop(key) for key in keys]
        for handle, lock in entries:
            with lock:
                _close_quietly(handle)

    def clear(self) -> None:
        """Close every handle."""
        with self._lock:
            entries = list(self._handles.values())
            self._handles.clear()
        for handle, lock in entries:
            with lock:
                _close_quietly(handle)

    def __len__(self) -> int:
        return len(self._handles)


def _close_quietly(handle: Any) -> None:
    try:
        handle.close()
    except (OSError, ValueError, io.UnsupportedOperation):
        pass
