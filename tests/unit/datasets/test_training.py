"""Subject.to_torch_dataset: items line up with an eager oracle (nibabel + h5py), random access
reads each chunk once through its LRU, iteration goes chunk by chunk, and the dataset pickles to
worker processes (spawned and forked, as DataLoader workers are) that read the same items."""

from __future__ import annotations

import multiprocessing
import pickle

import h5py
import nibabel as nib
import numpy as np
import pytest

import neurocube
from neurocube.errors import SelectionError
from neurocube.storage import IO_STATS
from neurocube.synthetic.bucket import make_bucket

SESSIONS = ["ses-01", "ses-02"]


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    root = tmp_path_factory.mktemp("bucket")
    truth = make_bucket(root, subjects=1, sessions=2, trials=14, grid=(6, 7, 5), seed=3)
    return root, truth


def dataset(bucket, **kwargs):
    root, _ = bucket
    sub = neurocube.open_subject(root, "sub-01")
    options = {"roi": "face", "embeddings": "CLIP", "chunks": 4, **kwargs}
    return sub, sub.to_torch_dataset(SESSIONS, **options)


def oracle(bucket, sub, roi="face"):
    """Betas by nibabel + the boolean selection; embeddings and images by h5py, by image id."""
    root, truth = bucket
    selection = sub.voxel_selection(SESSIONS, roi=roi)
    betas = np.concatenate([
        np.asarray(nib.load(str(truth.subjects["sub-01"].betas_paths[s])).dataobj,
                   dtype=np.float32)[selection].T
        for s in SESSIONS
    ])
    with h5py.File(root / "stimuli" / "task-images_desc-CLIP_embeddings.h5") as h5:
        ids = [v.decode() for v in h5["image_ids"][()]]
        table = dict(zip(ids, np.asarray(h5["embedding"][()], dtype=np.float32), strict=True))
    with h5py.File(root / "stimuli" / "task-images_stimuli.h5") as h5:
        images = [bytes(np.asarray(v, np.uint8)) for v in h5["images"][()]]
    return betas, table, images


def test_items_line_up_with_an_eager_oracle(bucket):
    sub, tds = dataset(bucket, images=True, captions=True)
    betas, embedding, images = oracle(bucket, sub)
    meta = sub.metadata
    captions = sub.captions
    assert len(tds) == betas.shape[0] == 28
    for i in range(len(tds)):
        item = tds[i]
        assert item["betas"].dtype == np.float32 and item["embedding"].dtype == np.float32
        np.testing.assert_array_equal(item["betas"], betas[i])  # NaN stays NaN
        row = meta.loc[item["trial"]]
        assert (item["session"], item["image_name"]) == (row["session"], row["image_name"])
        assert item["session_trial"] == row["session_trial"]
        np.testing.assert_array_equal(item["embedding"], embedding[item["image_name"]])
        assert item["image"] == images[int(row["stim_idx"])]
        expected = captions[captions["image_name"] == item["image_name"]]["caption"].tolist()
        assert item["captions"] == expected and expected
    assert tds[-1]["trial"] == tds[len(tds) - 1]["trial"]


def test_decoded_images_and_first_caption(bucket):
    _, tds = dataset(bucket, images="array", captions="first", embeddings=None)
    item = tds[3]
    assert item["image"].dtype == np.uint8 and item["image"].shape == (8, 8, 3)
    assert isinstance(item["captions"], str) and "picture" in item["captions"]
    assert "embedding" not in item


def test_random_access_reads_each_chunk_once_with_its_lru(bucket):
    _, tds = dataset(bucket, cache_chunks=8)
    n_chunks = tds.reader.n_blocks
    assert n_chunks == 8  # 14 trials per session in chunks of 4: 4 + 4 + 4 + 2, twice
    order = np.random.default_rng(0).permutation(len(tds))
    items = {int(i): tds[int(i)] for i in order}
    assert tds.chunk_reads == n_chunks  # not one chunk read per item
    # a small LRU still reads a chunk once per visit, never once per item
    _, small = dataset(bucket, cache_chunks=1)
    for i in range(len(small)):
        small[i]
    assert small.chunk_reads == n_chunks
    np.testing.assert_array_equal(items[5]["betas"], small[5]["betas"])


def test_the_chunk_aware_sampler_is_random_and_reads_each_chunk_once(bucket):
    _, tds = dataset(bucket, cache_chunks=2)
    order = tds.sampler(seed=5, epoch=0)
    assert sorted(order) == list(range(len(tds)))  # every trial once
    assert order == tds.sampler(seed=5, epoch=0) != tds.sampler(seed=5, epoch=1)
    for i in order:
        tds[i]
    assert tds.chunk_reads == tds.reader.n_blocks
    # the order of batches() for the same (seed, epoch) and window (rows inside a batch are
    # grouped by chunk there)
    expected = tds.data.trial.values[order]
    start = 0
    for b in neurocube.batches(tds.data, batch_size=3, seed=5, buffer_chunks=2):
        stop = start + len(b["trial"])
        assert sorted(b["trial"].tolist()) == sorted(expected[start:stop].tolist())
        start = stop


def test_iteration_in_order_gives_the_same_items(bucket):
    _, tds = dataset(bucket, images=True)
    listed = list(tds)
    assert [x["trial"] for x in listed] == [tds[i]["trial"] for i in range(len(tds))]
    for i, item in enumerate(listed):
        np.testing.assert_array_equal(item["betas"], tds[i]["betas"])
        np.testing.assert_array_equal(item["embedding"], tds[i]["embedding"])
        assert item["image"] == tds[i]["image"]


def test_building_the_dataset_reads_no_betas(bucket):
    root, _ = bucket
    sub = neurocube.open_subject(root, "sub-01")
    sub.voxel_selection(SESSIONS, roi="face")  # masks, tables: small, read eagerly
    assert len(sub.metadata) == 28
    IO_STATS.reset()
    tds = sub.to_torch_dataset(SESSIONS, roi="face", chunks=4)
    opens_before_items = IO_STATS.snapshot()[0]
    assert len(tds) == 28
    assert IO_STATS.snapshot() == (opens_before_items, IO_STATS.snapshot()[1])
    reads_before = IO_STATS.snapshot()[1]
    tds[0]
    assert IO_STATS.snapshot()[1] > reads_before  # the first item reads


# --- worker processes ------------------------------------------------------------------------

_WORKER_DATASET = None


def _init_worker(tds):
    global _WORKER_DATASET
    _WORKER_DATASET = tds


def _fetch(indices):
    out = []
    for i in indices:
        item = _WORKER_DATASET[i]
        out.append((item["trial"], item["betas"], item["embedding"], item["image"]))
    return out


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_worker_processes_get_the_same_items(bucket, method):
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} here")
    _, tds = dataset(bucket, images=True)
    expected = [tds[i] for i in range(len(tds))]  # the parent has opened and cached files
    tds = pickle.loads(pickle.dumps(tds))  # what a DataLoader sends to spawned workers
    assert tds.chunk_reads == 0
    sampler = np.random.default_rng(1).permutation(len(tds))
    batches = [sampler[i : i + 5].tolist() for i in range(0, len(tds), 5)]
    context = multiprocessing.get_context(method)
    with context.Pool(2, initializer=_init_worker, initargs=(tds,)) as pool:
        results = pool.map(_fetch, batches)
    for indices, got in zip(batches, results, strict=True):
        for i, (trial, betas, embedding, image) in zip(indices, got, strict=True):
            assert trial == expected[i]["trial"]
            np.testing.assert_array_equal(betas, expected[i]["betas"])
            np.testing.assert_array_equal(embedding, expected[i]["embedding"])
            assert image == expected[i]["image"]


def test_bad_options_are_refused(bucket):
    with pytest.raises(SelectionError, match="images="):
        dataset(bucket, images="png")
    with pytest.raises(SelectionError, match="captions="):
        dataset(bucket, captions="some")
    with pytest.raises(neurocube.errors.DataNotDownloadedError, match="models on disk"):
        dataset(bucket, embeddings="NoSuchModel")
    _, tds = dataset(bucket)
    with pytest.raises(IndexError, match="out of range"):
        tds[len(tds)]


def test_reading_ahead_in_sampler_order_keeps_values_and_memory_bound(bucket):
    """Items read in the sampler's order come back the same with reads ahead in threads; at no
    time are more than cache_chunks + prefetch chunks held; another order stops the read-ahead."""
    _, plain = dataset(bucket, cache_chunks=2)
    _, ahead = dataset(bucket, cache_chunks=2)
    ahead.prefetch = 1
    plain.prefetch = 0
    order = ahead.sampler(seed=3, epoch=1)
    assert order == plain.sampler(seed=3, epoch=1)
    for i in order:
        got, want = ahead[i], plain[i]
        np.testing.assert_array_equal(got["betas"], want["betas"])
        assert got["trial"] == want["trial"]
        assert len(ahead._cache) + len(ahead._pending) <= 2 + 1
    assert ahead.chunk_reads == ahead.reader.n_blocks  # each chunk read once, ahead or not
    other = ahead.sampler(seed=3, epoch=2)
    ahead[other[1]]  # not the order's first item: reading ahead stops
    assert ahead._plan_items is None and not ahead._pending
