"""Trials as a map-style dataset for model training (what ``torch.utils.data.DataLoader`` takes).

:func:`trial_dataset` (also :meth:`neurocube.Subject.to_torch_dataset`) pairs
the betas of a selection with the stimulus data of each trial: the embedding of
a model, the image, the captions. The result, :class:`TrialDataset`, has
``__len__`` and ``__getitem__`` and nothing else torch needs: neurocube never
imports torch.

Reading follows the chunks of the betas. A random item reads its chunk (betas
and embeddings together, each Dask chunk once) and keeps it in a small LRU, so
random sampling costs a chunk's decoding once per visit to the chunk, not per
item; sampling a chunk's trials together (e.g. shuffling with
:func:`neurocube.batches`, or a sampler that groups by chunk) makes it read
each chunk once. Iterating the dataset in order goes through
:func:`neurocube.batches`' chunk-wise reader with background prefetch.

A :class:`TrialDataset` holds lazy arrays, specs and paths only: it pickles to
DataLoader worker processes (spawned or forked), and each process opens the
files itself.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from neurocube.errors import SelectionError
from neurocube.ops.batches import BlockReader, batches, epoch_order

__all__ = ["TrialDataset", "trial_dataset"]

IMAGE_MODES = (False, True, "bytes", "array")
CAPTION_MODES = (False, True, "all", "first")


class TrialDataset:
    """A map-style dataset of trials: ``len(ds)``, ``ds[i]`` -> dict; see :func:`trial_dataset`.

    Parameters
    ----------
    data
        A Dataset along ``trial`` with ``betas`` (and optionally ``embedding``)
        and the trial labels as coordinates.
    images
        Per-trial JPEG bytes by global trial index (``Subject.images``), or None.
    image_mode
        ``"bytes"`` (the JPEG) or ``"array"`` (decoded ``(height, width, 3)`` uint8).
    captions
        ``{image_name: [caption, ...]}`` or None.
    caption_mode
        ``"all"``: a list of str per item; ``"first"``: one str.
    cache_chunks
        Decoded chunks kept for random access.
    prefetch
        Chunks read ahead in background threads while items are read in the order
        of this dataset's last :meth:`sampler` (0: none). Memory stays within
        ``cache_chunks + prefetch`` chunks, plus the one being read.
    """

    def __init__(
        self,
        data: Any,
        *,
        images: Any = None,
        image_mode: str = "bytes",
        captions: Mapping[str, list[str]] | None = None,
        caption_mode: str = "all",
        cache_chunks: int = 4,
        prefetch: int = 2,
    ) -> None:
        if cache_chunks < 1:
            raise SelectionError(f"cache_chunks={cache_chunks}: expected at least 1")
        if isinstance(prefetch, bool) or not isinstance(prefetch, (int, np.integer)) or (
            prefetch < 0
        ):
            raise SelectionError(f"prefetch={prefetch!r}: expected an integer >= 0")
        self.data = data
        self.reader = BlockReader(data, "trial")
        self.images = images
        self.image_mode = image_mode
        self.captions = captions
        self.caption_mode = caption_mode
        self.cache_chunks = int(cache_chunks)
        self.chunk_reads = 0  #: chunks this process has read for random access
        self._cache: collections.OrderedDict[int, dict[str, np.ndarray]] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()
        self.prefetch = int(prefetch)
        # read-ahead: the items and blocks of the last sampler(), followed while items come
        # in exactly that order (see _follows); reads in flight, by block
        self._plan_items: list[int] | None = None
        self._plan_blocks: list[int] = []
        self._plan_window: dict[int, int] = {}  # block -> index in _plan_blocks of its window
        self._cursor = 0
        self._pending: dict[int, Future[dict[str, np.ndarray]]] = {}
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return self.reader.n

    def __repr__(self) -> str:
        names = [*self.reader.names, *(["image"] if self.images is not None else []),
                 *(["captions"] if self.captions is not None else [])]
        return f"TrialDataset({len(self)} trials, {self.reader.n_blocks} chunks, items: {names})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # a worker process reads only some items of the order: it does not read ahead
        state.update(_cache=collections.OrderedDict(), _lock=None, chunk_reads=0,
                     _plan_items=None, _plan_blocks=[], _plan_window={}, _cursor=0,
                     _pending={}, _pool=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def _chunk(self, block: int, follows: bool = False) -> dict[str, np.ndarray]:
        with self._lock:
            cached = self._cache.get(block)
            if cached is not None:
                self._cache.move_to_end(block)
                return cached
            pending = self._pending.pop(block, None)
        if follows:
            self._read_ahead(block)
        values = pending.result() if pending is not None else self.reader.read(block)
        with self._lock:
            self.chunk_reads += 1
            self._cache[block] = values
            while len(self._cache) > self.cache_chunks:
                self._cache.popitem(last=False)
        return values

    def _follows(self, position: int) -> bool:
        """Return True while items are asked for in the order of the last :meth:`sampler`."""
        plan = self._plan_items
        if plan is None:
            return False
        if self._cursor < len(plan) and plan[self._cursor] == position:
            self._cursor += 1
            return True
        self._plan_items = None  # another order: stop reading ahead
        return False

    def _read_ahead(self, block: int) -> None:
        """Start reads of the planned chunks from ``block``'s window on (up to ``prefetch``)."""
        if self.prefetch == 0 or block not in self._plan_window:
            return
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=self.prefetch, thread_name_prefix="neurocube-dataset"
                )
            for ahead in self._plan_blocks[self._plan_window[block] :]:
                if len(self._pending) >= self.prefetch:
                    break
                if ahead == block or ahead in self._cache or ahead in self._pending:
                    continue
                self._pending[ahead] = self._pool.submit(self.reader.read, ahead)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"TrialDataset indices are integers, got {type(index).__name__}")
        i = int(index) + (n if index < 0 else 0)
        if not 0 <= i < n:
            raise IndexError(f"trial position {index} out of range for {n} trials")
        block = self.reader.block_of(i)
        values = self._chunk(block, self._follows(i))
        row = i - int(self.reader.bounds[block])
        return self._item({name: array[row] for name, array in values.items()}, i)

    def sampler(
        self, *, seed: int | None = None, epoch: int = 0, buffer_chunks: int | None = None
    ) -> list[int]:
        """Return a shuffled order of every position that the chunk LRU serves cheaply.

        Chunks are permuted, then the trials of ``buffer_chunks`` chunks at a time
        (default: ``cache_chunks``) are shuffled together: the order of
        :func:`neurocube.batches` for the same ``(seed, epoch)``. Read in this
        order (``DataLoader(ds, sampler=ds.sampler(seed=0, epoch=e))``), each
        chunk is decoded once per epoch; a uniform random order over many more
        chunks than the LRU holds would decode about one chunk per item.
        While the items are then asked for in exactly this order, the next
        chunks are read ahead in background threads (``prefetch``).
        """
        buffer = self.cache_chunks if buffer_chunks is None else int(buffer_chunks)
        if not 1 <= buffer <= self.cache_chunks:
            raise SelectionError(
                f"sampler(buffer_chunks={buffer_chunks}): expected 1 to cache_chunks "
                f"({self.cache_chunks}); a larger window would evict chunks before their last use"
            )
        bounds = self.reader.bounds
        order: list[int] = []
        plan_blocks: list[int] = []
        plan_window: dict[int, int] = {}
        for blocks, rows in epoch_order(
            bounds, shuffle=True, seed=seed, epoch=epoch, buffer_chunks=buffer
        ):
            positions = np.concatenate([np.arange(bounds[b], bounds[b + 1]) for b in blocks])
            order.extend(positions[rows].tolist())
            plan_window.update((b, len(plan_blocks)) for b in blocks)
            plan_blocks.extend(blocks)
        with self._lock:
            self._plan_items, self._cursor = list(order), 0
            self._plan_blocks, self._plan_window = plan_blocks, plan_window
        return order

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Yield the items in order, chunk by chunk (each chunk read once, read ahead)."""
        sizes = np.diff(self.reader.bounds)
        size = int(sizes.max()) if sizes.size and sizes.max() > 0 else 1
        position = 0
        for batch in batches(self.data, batch_size=size, shuffle=False, prefetch=2):
            for row in range(len(batch["trial"])):
                arrays = {name: batch[name][row] for name in self.reader.names}
                yield self._item(arrays, position)
                position += 1

    def _item(self, arrays: dict[str, np.ndarray], position: int) -> dict[str, Any]:
        item: dict[str, Any] = {}
        for name, value in arrays.items():
            if name in ("betas", "embedding"):
                item[name] = np.asarray(value, dtype=np.float32)
            else:
                item[name] = value
        for name, values in self.reader.coords.items():
            item[name] = values[position].item()
        if self.images is not None:
            jpeg = self.images[int(item["trial"])]
            item["image"] = _decode(jpeg) if self.image_mode == "array" else jpeg
        if self.captions is not None:
            texts = self.captions.get(str(item["image_name"]), [])
            item["captions"] = (texts[0] if texts else "") if self.caption_mode == "first" else (
                list(texts)
            )
        return item


def _decode(jpeg: bytes) -> np.ndarray:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as image:
        return np.asarray(image.convert("RGB"))


def trial_dataset(
    subject: Any,
    sessions: str | Sequence[str] | None,
    *,
    roi: Any = None,
    nc_threshold: float | None = None,
    stimuli: str | None = None,
    embeddings: str | None = None,
    images: bool | str = False,
    captions: bool | str = False,
    mask: Any = None,
    mask_source: str = "anatomical",
    chunks: Any = None,
    cache_chunks: int = 4,
    prefetch: int = 2,
) -> TrialDataset:
    """Return the trials of a selection as a :class:`TrialDataset` (``Subject.to_torch_dataset``).

    Parameters
    ----------
    subject
        A :class:`neurocube.Subject`.
    sessions, roi, nc_threshold, stimuli, mask, mask_source, chunks
        The selection, as in :meth:`neurocube.Subject.betas`.
    embeddings
        A model name (``"CLIP"``): each item's ``embedding`` is that model's
        embedding of the trial's image (float32; NaN when the embeddings file
        does not list the image, flagged by the label ``embedding_valid``).
    images
        True or ``"bytes"``: ``image`` is the JPEG bytes; ``"array"``: decoded
        ``(height, width, 3)`` uint8.
    captions
        True or ``"all"``: ``captions`` is the list of the image's captions
        (give the DataLoader a ``collate_fn`` that keeps lists); ``"first"``: one str.
    cache_chunks
        Decoded chunks kept for random access (each is a chunk of the betas).
    prefetch
        Chunks read ahead while items come in the order of the dataset's
        ``sampler()`` (see :class:`TrialDataset`).

    Returns
    -------
    TrialDataset
        Items are dicts: ``betas`` (float32, one value per voxel), ``embedding``,
        ``image``, ``captions`` when asked, and the trial's labels (``trial``,
        ``session``, ``session_trial``, ``image_name``, ``unique_or_shared``,
        ``stim_idx``, ``dataset``, ``subject``, and the trial table's columns).
    """
    if images not in IMAGE_MODES:
        raise SelectionError(f"images={images!r}: expected False, True, 'bytes' or 'array'")
    if captions not in CAPTION_MODES:
        raise SelectionError(f"captions={captions!r}: expected False, True, 'all' or 'first'")
    ds = subject.betas(
        sessions, roi=roi, mask=mask, nc_threshold=nc_threshold, stimuli=stimuli,
        mask_source=mask_source, chunks=chunks,
    )
    if embeddings is not None:
        ds = _with_embedding(subject, ds, embeddings)
    image_source = subject.images if images else None
    caption_map = _caption_map(subject.captions) if captions else None
    return TrialDataset(
        ds,
        images=image_source,
        image_mode="array" if images == "array" else "bytes",
        captions=caption_map,
        caption_mode="first" if captions == "first" else "all",
        cache_chunks=cache_chunks,
        prefetch=prefetch,
    )


def _with_embedding(subject: Any, ds: Any, model: str) -> Any:
    """``ds`` with ``embedding (trial, feature)`` of ``model``, on the chunks of the betas."""
    from neurocube.sources.stimuli import open_trial_embeddings

    rows = subject._stimuli_files[subject._stimuli_files["kind"] == "embeddings"]
    models = sorted(rows["label"])
    path = subject._stimuli_file(
        "embeddings", f"task-images_desc-{model}_embeddings.h5 (models on disk: {models})",
        label=model,
    )
    values, valid = open_trial_embeddings(
        path, ds["image_name"].values.astype(str),
        trials_per_chunk=ds["betas"].data.chunks[0],
        storage_options=subject.storage_options,
    )
    out = ds.assign(embedding=(("trial", "feature"), values))
    out = out.assign_coords(embedding_valid=("trial", valid))
    out.attrs["embedding_model"] = model
    out.attrs["neurocube_sources"] = [*ds.attrs.get("neurocube_sources", []), path]
    return out


def _caption_map(table: Any) -> dict[str, list[str]]:
    if "image_name" not in table.columns or "caption" not in table.columns:
        raise SelectionError(
            f"captions table: expected columns 'image_name' and 'caption', found "
            f"{list(table.columns)}"
        )
    grouped: dict[str, list[str]] = {}
    for name, text in zip(table["image_name"].tolist(), table["caption"].tolist(), strict=True):
        grouped.setdefault(str(name), []).append(str(text))
    return grouped
