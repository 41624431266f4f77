"""Mini-batches along trials, read chunk by chunk, for fitting models on data larger than memory.

Indexing a lazy array one trial at a time (``ds.isel(trial=i).values``) makes
Dask read and decode the whole chunk that holds the trial, once per trial.
:func:`batches` reads each Dask chunk (along ``dim``) **once per epoch**
instead, and hands out rows from chunks already in memory:

1. The chunks along ``dim`` are put in an order: as they are, or (``shuffle``)
   a random permutation.
2. They are taken ``buffer_chunks`` at a time (a *window*); the rows of a window
   are shuffled among themselves and cut into batches. Rows left over at the
   end of a window (fewer than ``batch_size``) open the next window's first batch.
3. While the consumer works on a window, up to ``prefetch`` next chunks are read
   by background threads, so reading overlaps with the consumer's work.

Memory is bounded by ``buffer_chunks + prefetch`` chunks plus two batches,
whatever the size of the selection. The order of rows is a pure function of
``(seed, epoch)`` and the chunking: two runs, or two machines, see the same
batches.

**Variables with different chunks.** The chunks of the variable with the most
bytes per row (the betas, normally) set the *read grid*. A variable whose chunk
boundaries include every boundary of the grid (same or finer chunks) is read
as it is, each of its chunks once. A variable with coarser chunks, or
boundaries elsewhere, is rechunked lazily onto the grid: one of its chunks is
then read once for every grid chunk it overlaps (fine for small arrays such
as embeddings; build large ones on the same chunks, as
:meth:`neurocube.Subject.to_torch_dataset` does). In-memory (numpy) variables
cost nothing to slice; with no Dask variable at all, the whole selection is one
chunk.
"""

from __future__ import annotations

import math
import sys
import threading
from collections import deque
from collections.abc import Hashable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from neurocube.errors import SelectionError

__all__ = ["BatchIterator", "BlockReader", "batches", "epoch_order"]


def batches(
    data: Any,
    *,
    dim: str = "trial",
    batch_size: int,
    shuffle: bool = True,
    seed: int | None = None,
    epoch: int = 0,
    drop_last: bool = False,
    buffer_chunks: int = 4,
    prefetch: int = 2,
) -> BatchIterator:
    """Iterate over one epoch of ``data`` in mini-batches along ``dim``, each chunk read once.

    Parameters
    ----------
    data
        An :class:`xarray.Dataset`, or a dict of DataArrays sharing ``dim``
        (e.g. ``{"betas": ds.betas, "embedding": emb.embedding}``), lazy or in
        memory. Every variable with ``dim`` is batched; those without it are left out.
    dim
        The dimension to batch along.
    batch_size
        Rows per batch (the last batch may be smaller unless ``drop_last``).
    shuffle
        Permute the chunks, then the rows within each window of ``buffer_chunks``
        chunks. False: rows in their order.
    seed, epoch
        The order is drawn from ``(seed, epoch)`` alone: the same pair gives the
        same batches; pass ``epoch=0, 1, 2, ...`` for a new order each epoch.
        ``seed=None`` draws a fresh, unrepeatable order.
    drop_last
        Leave out a last batch smaller than ``batch_size``.
    buffer_chunks
        Chunks whose rows are shuffled together (more: better mixing, more memory).
    prefetch
        Chunks read ahead in background threads (0: read in the consumer's thread).

    Returns
    -------
    BatchIterator
        Yields dicts of numpy arrays: one per batched variable (``dim`` first,
        ``len <= batch_size``) and one per coordinate along ``dim`` (the
        labels of each row: ``trial``, ``session``, ``image_name``, ...).
        Nothing is read until the first batch is asked for.

    Raises
    ------
    SelectionError
        ``data`` has no variable along ``dim``, its variables disagree on the
        length or coordinates of ``dim``, or a parameter is out of range.

    Examples
    --------
    >>> import numpy as np, xarray as xr, dask.array as da, neurocube
    >>> ds = xr.Dataset({"x": (("trial", "f"), da.arange(20.0, chunks=4).reshape(10, 2))},
    ...                 coords={"trial": np.arange(10)})
    >>> seen = [b["trial"] for b in neurocube.batches(ds, batch_size=4, seed=0)]
    >>> [len(t) for t in seen]
    [4, 4, 2]
    >>> sorted(np.concatenate(seen).tolist()) == list(range(10))
    True
    """
    for name, value, low in (("batch_size", batch_size, 1), ("buffer_chunks", buffer_chunks, 1),
                             ("prefetch", prefetch, 0), ("epoch", epoch, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise SelectionError(f"batches({name}={value!r}): expected an integer >= {low}")
    reader = BlockReader(data, dim)
    return BatchIterator(
        reader, batch_size=int(batch_size), shuffle=bool(shuffle), seed=seed, epoch=int(epoch),
        drop_last=bool(drop_last), buffer_chunks=int(buffer_chunks), prefetch=int(prefetch),
    )


# ---------------------------------------------------------------------- reading blocks


class BlockReader:
    """Reads the variables of ``data`` one *block* (a chunk of the read grid along ``dim``).

    Holds the lazy arrays and the in-memory coordinates along ``dim``; the
    optimized Dask graph is built on the first read (and again after
    unpickling, so a copy sent to another process reads its files itself).

    Parameters
    ----------
    data
        A Dataset or a dict of DataArrays sharing ``dim`` (see :func:`batches`).
    dim
        The dimension along which blocks are cut.
    """

    def __init__(self, data: Any, dim: str = "trial") -> None:
        variables, coords = _collect(data, dim)
        self.dim = dim
        self.names = list(variables)
        self.coords = coords
        lengths = {int(v.shape[0]) for v in variables.values()}
        self.n = lengths.pop()
        self.bounds = _read_grid(variables, self.n)
        self.arrays: dict[str, Any] = {}
        for name, array in variables.items():
            self.arrays[name] = _on_grid(array, self.bounds)
        self._lock = threading.Lock()
        self._graph: dict[Any, Any] | None = None
        self._keys: dict[str, Any] = {}
        self._direct: dict[str, Any] = {}  # variables read without Dask (see _direct_rows)

    @property
    def n_blocks(self) -> int:
        """Number of blocks along ``dim``."""
        return len(self.bounds) - 1

    def block_of(self, position: int) -> int:
        """Return the block that holds row ``position``."""
        return int(np.searchsorted(self.bounds, position, side="right") - 1)

    def read(self, block: int) -> dict[str, np.ndarray]:
        """Read block ``block``: ``{name: array of its rows}``.

        Masked NIfTI rows are read straight from the files (see :func:`_direct_rows`);
        every other Dask chunk is computed here, in this thread.
        """
        from dask.local import get_sync
        from dask.optimization import cull

        graph = self._graph_once()
        lo, hi = int(self.bounds[block]), int(self.bounds[block + 1])
        out: dict[str, np.ndarray] = {}
        for name, rows in self._direct.items():
            out[name] = rows.read(lo, hi)
        wanted: list[Any] = []
        for name in self.names:
            if name in self._keys:
                wanted.extend(_flatten(self._keys[name][block]))
        values: dict[Any, Any] = {}
        if wanted:
            sub, _ = cull(graph, wanted)
            values = dict(zip(wanted, get_sync(sub, wanted), strict=True))
        for name in self.names:
            if name in self._direct:
                continue
            if name in self._keys:
                out[name] = _assemble(self._keys[name][block], values, axis=1)
            else:
                out[name] = np.asarray(self.arrays[name][lo:hi])
        return {name: out[name] for name in self.names}

    def _graph_once(self) -> dict[Any, Any]:
        with self._lock:
            if self._graph is None:
                import dask

                lazy = {k: a for k, a in self.arrays.items() if _is_dask(a)}
                self._direct = _direct_rows(lazy)
                lazy = {k: a for k, a in lazy.items() if k not in self._direct}
                optimized = dask.optimize(*lazy.values()) if lazy else ()
                graph: dict[Any, Any] = {}
                for name, array in zip(lazy, optimized, strict=True):
                    graph.update(dict(array.__dask_graph__()))
                    self._keys[name] = array.__dask_keys__()
                self._graph = graph
            return self._graph

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_lock=None, _graph=None, _keys={}, _direct={})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _direct_rows(lazy: Mapping[str, Any]) -> dict[str, Any]:
    """Return the variables whose blocks can be read straight from masked NIfTI volumes.

    A masked ``open_nifti`` array, or trial rows of such arrays (a selection,
    a split, several sessions joined), with its values unchanged: each block
    is then read by :meth:`neurocube.sources.nifti_rows.TrialRows.read`, each run
    of consecutive volumes gathered straight into the block (the reads of
    :func:`neurocube.load`), with no Dask graph run per chunk. Anything else
    is read through its Dask graph.
    """
    if "neurocube.sources.nifti" not in sys.modules:  # loaded by whoever opened a NIfTI
        return {}
    from neurocube.sources.nifti_rows import trial_rows

    found: dict[str, Any] = {}
    for name, array in lazy.items():
        rows = trial_rows(array)
        if rows is not None:
            found[name] = rows
    return found


def _is_dask(array: Any) -> bool:
    return hasattr(array, "__dask_graph__") and array.__dask_graph__() is not None


def _collect(data: Any, dim: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Return ``({name: array with dim first}, {coord name: numpy values along dim})``."""
    import xarray as xr

    if isinstance(data, xr.DataArray):
        data = {data.name if data.name is not None else "data": data}
    if isinstance(data, xr.Dataset):
        items: list[tuple[Hashable, Any]] = list(data.data_vars.items())
        coord_sources: list[Any] = [data]
    elif isinstance(data, Mapping):
        items = list(data.items())
        bad = [k for k, v in items if not isinstance(v, xr.DataArray)]
        if bad:
            raise SelectionError(
                f"batches: expected a Dataset or a dict of DataArrays; {bad[0]!r} is a "
                f"{type(data[bad[0]]).__name__}. Wrap arrays as xarray.DataArray with named dims."
            )
        coord_sources = [v for _, v in items]
    else:
        raise SelectionError(
            f"batches: expected a Dataset or a dict of DataArrays, got {type(data).__name__}"
        )
    variables: dict[str, Any] = {}
    coords: dict[str, np.ndarray] = {}
    for source in coord_sources:
        for cname, coord in source.coords.items():
            if coord.dims != (dim,):
                continue
            if coord.chunks is not None:  # a lazy coordinate is read with the blocks
                variables[str(cname)] = coord.variable.data
                continue
            values = np.asarray(coord.values)
            previous = coords.get(str(cname))
            if previous is not None and not _same(previous, values):
                raise SelectionError(
                    f"batches: coordinate {cname!r} differs between the variables; align them "
                    f"along {dim!r} first (e.g. xarray.align or .sel({dim}=...))"
                )
            coords[str(cname)] = values
    for name, array in items:
        if dim not in array.dims:
            continue
        if str(name) in coords:
            raise SelectionError(
                f"batches: {name!r} names both a variable and a coordinate along {dim!r}; "
                "rename one"
            )
        variables[str(name)] = array.transpose(dim, ...).data
    if not variables:
        raise SelectionError(f"batches: no variable along {dim!r} in {list(map(str, dict(items)))}")
    lengths = {name: int(a.shape[0]) for name, a in variables.items()}
    if len(set(lengths.values())) > 1:
        raise SelectionError(f"batches: the variables disagree on the length of {dim!r}: {lengths}")
    return variables, coords


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    try:
        return bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    except TypeError:
        return bool(np.array_equal(a, b))


def _read_grid(variables: Mapping[str, Any], n: int) -> np.ndarray:
    """Block bounds along dim: the chunks of the lazy variable with the most bytes per row."""
    lazy = [a for a in variables.values() if _is_dask(a)]
    if not lazy or n == 0:
        return np.asarray([0, n], dtype=np.int64)
    primary = max(lazy, key=lambda a: (a.dtype.itemsize * math.prod(a.shape[1:]), a.numblocks[0]))
    return np.concatenate(([0], np.cumsum(primary.chunks[0]))).astype(np.int64)


def _on_grid(array: Any, bounds: np.ndarray) -> Any:
    """Return ``array`` chunked so that every block of ``bounds`` is whole chunks of it."""
    if not _is_dask(array):
        return array
    own = set(np.concatenate(([0], np.cumsum(array.chunks[0]))).tolist())
    if own >= set(bounds.tolist()) and len(own) == len(bounds):
        return array
    sizes = tuple(int(s) for s in np.diff(bounds))
    return array.rechunk({0: sizes})


def _flatten(nested: Any) -> list[Any]:
    if isinstance(nested, list):
        return [k for item in nested for k in _flatten(item)]
    return [nested]


def _assemble(nested: Any, values: Mapping[Any, Any], axis: int) -> np.ndarray:
    """Join the chunks of one block (nested key lists over the other axes) into one array."""
    if not isinstance(nested, list):
        return np.asarray(values[nested])
    parts = [_assemble(item, values, axis + 1) for item in nested]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis)


# ---------------------------------------------------------------------- the order of an epoch


def epoch_order(
    bounds: np.ndarray, *, shuffle: bool, seed: int | None, epoch: int, buffer_chunks: int
) -> list[tuple[list[int], np.ndarray]]:
    """Return the epoch's windows: ``[(blocks in read order, row order within the window)]``.

    The row order indexes the concatenation of the window's blocks. A pure
    function of its arguments when ``seed`` is given.
    """
    n_blocks = len(bounds) - 1
    sizes = np.diff(bounds)
    if not shuffle:
        return [([b], np.arange(int(sizes[b]))) for b in range(n_blocks)]
    entropy = None if seed is None else [int(seed), int(epoch)]
    rng = np.random.default_rng(np.random.SeedSequence(entropy))
    blocks = rng.permutation(n_blocks).tolist()
    windows = []
    for start in range(0, n_blocks, buffer_chunks):
        chosen = blocks[start : start + buffer_chunks]
        windows.append((chosen, rng.permutation(int(sizes[chosen].sum()))))
    return windows


class _Prefetcher:
    """Blocks in a given order, up to ``prefetch`` of them read ahead by background threads."""

    def __init__(self, reader: BlockReader, order: list[int], prefetch: int) -> None:
        self._reader = reader
        self._order = order
        self._prefetch = prefetch
        self._next = 0
        self._pending: deque[Future[dict[str, np.ndarray]]] = deque()
        self._pool = (
            ThreadPoolExecutor(max_workers=prefetch, thread_name_prefix="neurocube-batches")
            if prefetch > 0 else None
        )

    def _fill(self) -> None:
        assert self._pool is not None
        while len(self._pending) < self._prefetch and self._next < len(self._order):
            block = self._order[self._next]
            self._pending.append(self._pool.submit(self._reader.read, block))
            self._next += 1

    def take(self) -> dict[str, np.ndarray]:
        if self._pool is None:
            block = self._order[self._next]
            self._next += 1
            return self._reader.read(block)
        self._fill()
        future = self._pending.popleft()
        result = future.result()
        self._fill()  # keep `prefetch` reads in flight while the consumer works
        return result

    def close(self) -> None:
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class BatchIterator:
    """One epoch of batches (see :func:`batches`); ``len()`` is the number of batches.

    Reading starts at the first ``next()``; :meth:`close` (or leaving a ``with``
    block, or breaking out of a ``for`` loop and dropping the iterator) stops
    the background reads.
    """

    def __init__(
        self,
        reader: BlockReader,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int | None,
        epoch: int,
        drop_last: bool,
        buffer_chunks: int,
        prefetch: int,
    ) -> None:
        self.reader = reader
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = epoch
        self.drop_last = drop_last
        self.buffer_chunks = buffer_chunks
        self.prefetch = prefetch
        self._gen: Iterator[dict[str, np.ndarray]] | None = None
        self._spare = _BatchArrays()

    def __len__(self) -> int:
        n = self.reader.n
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._gen is None:
            self._gen = self._run()
        return next(self._gen)

    def close(self) -> None:
        """Stop reading ahead and release the buffered chunks."""
        if self._gen is not None:
            self._gen.close()  # type: ignore[attr-defined]

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # at interpreter shutdown
            pass

    def _run(self) -> Iterator[dict[str, np.ndarray]]:
        reader = self.reader
        windows = epoch_order(
            reader.bounds, shuffle=self.shuffle, seed=self.seed, epoch=self.epoch,
            buffer_chunks=self.buffer_chunks,
        )
        order = [b for blocks, _ in windows for b in blocks]
        prefetcher = _Prefetcher(reader, order, self.prefetch)
        size = self.batch_size
        carry: dict[str, np.ndarray] | None = None
        placed = 0  # rows in the batches handed out so far
        try:
            for blocks, rows in windows:
                loaded = [prefetcher.take() for _ in blocks]
                sizes = np.asarray([reader.bounds[b + 1] - reader.bounds[b] for b in blocks])
                which = np.repeat(np.arange(len(blocks)), sizes)
                within = np.concatenate([np.arange(s) for s in sizes]) if len(sizes) else which
                starts = np.asarray([reader.bounds[b] for b in blocks])
                position = starts[which] + within
                start = 0
                while start < rows.size:
                    need = size - (0 if carry is None else len(carry["__position__"]))
                    pick = rows[start : start + need]
                    start += pick.size
                    # within a batch, rows are grouped by chunk (order inside a batch does not
                    # matter to a gradient step) so that each group is copied without temporaries
                    pick = pick[np.argsort(which[pick], kind="stable")]
                    room = min(size, reader.n - placed)  # the epoch's last batch is shorter
                    piece = _gather(loaded, which[pick], within[pick], position[pick],
                                    reader.names, carry, room, self._spare.empty)
                    carry = None
                    if len(piece["__position__"]) < size:
                        carry = piece
                        break
                    placed += size
                    yield self._finish(piece)
                del loaded
            if carry is not None and not self.drop_last:
                yield self._finish(carry)
        finally:
            prefetcher.close()
            self._spare.clear()

    def _finish(self, piece: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        where = piece.pop("__position__")
        if where.size < self.batch_size:  # the last, short batch: its rows, not the room left
            piece = {name: values[: where.size] for name, values in piece.items()}
        for name, values in self.reader.coords.items():
            piece[name] = values[where]
        return piece


class _BatchArrays:
    """Batch arrays handed out earlier, taken back once nothing outside refers to them.

    A batch of masked betas is tens of MB: a fresh allocation of that size is new
    memory from the system every time (first-touch page faults, ~0.1-2 ms per MB
    on a VM). An array that the consumer has dropped (no reference left but this
    list's: no dict, view, memoryview or tensor made from it holds it) is filled
    again instead. At most :attr:`keep` arrays per shape are kept: the batch being
    built and the one the consumer holds, which the memory bound already counts.
    """

    keep = 2

    def __init__(self) -> None:
        self._arrays: list[np.ndarray] = []

    def empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """Return an uninitialised array of ``shape`` and ``dtype``, reused when free."""
        dtype = np.dtype(dtype)
        same = 0
        for i in range(len(self._arrays)):
            arr = self._arrays[i]
            if arr.shape != shape or arr.dtype != dtype:
                continue
            same += 1
            # three references: this list, the name arr and getrefcount's argument
            if sys.getrefcount(arr) <= 3:
                self._arrays.append(self._arrays.pop(i))  # most recently used last
                return arr
        arr = np.empty(shape, dtype=dtype)
        if same >= self.keep:  # drop the oldest of this shape (still held by the consumer)
            for i, old in enumerate(self._arrays):
                if old.shape == shape and old.dtype == dtype:
                    del self._arrays[i]
                    break
        self._arrays.append(arr)
        return arr

    def clear(self) -> None:
        """Let go of every array (the epoch is over)."""
        self._arrays.clear()


def _gather(
    loaded: list[dict[str, np.ndarray]],
    which: np.ndarray,
    within: np.ndarray,
    position: np.ndarray,
    names: list[str],
    carry: dict[str, np.ndarray] | None,
    room: int,
    empty: Any = np.empty,
) -> dict[str, np.ndarray]:
    """``carry``'s rows, then rows ``within[i]`` of blocks ``which[i]`` (grouped by block).

    Each variable is a batch with room for ``room`` rows; a batch that the window's rows
    cannot fill is carried to the next window and filled there in place, so every
    row is copied once (rows carried over used to be copied again into a new batch).
    """
    k = 0 if carry is None else len(carry["__position__"])
    out: dict[str, np.ndarray] = {}
    cuts = np.flatnonzero(np.diff(which)) + 1
    starts = np.concatenate(([0], cuts)).tolist()
    stops = np.concatenate((cuts, [which.size])).tolist()
    for name in names:
        if carry is not None:
            result = carry[name]
        else:
            first = loaded[0][name]
            result = empty((room, *first.shape[1:]), first.dtype)
        for a, b in zip(starts, stops, strict=True):
            if b > a:
                block = loaded[int(which[a])][name]
                # mode="clip": rows are in range, and mode="raise" copies `out` once more
                np.take(block, within[a:b], axis=0, out=result[k + a : k + b], mode="clip")
        out[name] = result
    out["__position__"] = (
        position if carry is None else np.concatenate([carry["__position__"], position])
    )
    return out
