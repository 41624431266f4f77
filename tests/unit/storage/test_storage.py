"""The storage layer on local paths and on a real S3 server (moto) on loopback."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from dask.base import tokenize

from neurocube import storage
from neurocube.errors import AccessDeniedError, DataNotFoundError, StorageError
from tests.fixtures.remote import SECRET


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "tree"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "one.bin").write_bytes(b"1" * 10)
    (root / "a" / "b" / "two.bin").write_bytes(bytes(range(256)) * 40)
    (root / ".hidden").write_bytes(b"x")
    return root


def test_local_info_find_identity(tree):
    found = storage.find(tree)
    assert [storage.relative(p, str(tree)) for p in found] == ["a/b/two.bin", "a/one.bin"]
    meta = storage.info(tree / "a" / "one.bin")
    assert meta.size == 10 and not meta.is_dir and meta.mtime_ns > 0
    assert storage.isdir(tree / "a") and not storage.exists(tree / "nope")
    ident = storage.identity(tree / "a" / "one.bin")
    assert ident.size == 10 and ident.ends_sha256 and not ident.etag
    with pytest.raises(DataNotFoundError, match="nope"):
        storage.info(tree / "nope")


def test_s3_listing_is_one_request_and_matches_local(tree, s3):
    url = s3.put(tree, "data")
    found = storage.find(url, s3.storage_options)
    assert [storage.relative(p, url) for p in found] == ["a/b/two.bin", "a/one.bin"]
    assert s3.counter.count("GET") == 1  # one recursive listing, no request per object
    meta = found[f"{url}/a/b/two.bin"]
    assert meta.size == 256 * 40 and meta.etag
    ident = storage.identity(f"{url}/a/b/two.bin", s3.storage_options)
    assert ident.etag == meta.etag and ident.size == meta.size


def test_s3_ranges_move_only_their_bytes(tree, s3):
    url = s3.put(tree / "a" / "b" / "two.bin", "two.bin")
    data = (tree / "a" / "b" / "two.bin").read_bytes()
    assert storage.read_range(url, 100, 300, s3.storage_options) == data[100:300]
    assert s3.counter.total_bytes == 200
    s3.counter.reset()
    parts = storage.read_ranges(url, [(0, 10), (5000, 5100)], s3.storage_options)
    assert parts == [data[0:10], data[5000:5100]]
    assert s3.counter.total_bytes == 110


def test_block_reader_reads_like_the_file_and_shares_blocks(tmp_path, s3):
    rng = np.random.default_rng(0)
    payload = rng.integers(0, 255, size=3_000_000, dtype=np.uint8).tobytes()
    (tmp_path / "blob").write_bytes(payload)
    url = s3.put(tmp_path / "blob", "blob")
    ident = storage.identity(url, s3.storage_options)
    s3.counter.reset()
    reader = storage.BlockReader(url, s3.storage_options, size=ident.size, version=ident.etag,
                                 block_size=1 << 18)
    assert reader.read(1000) == payload[:1000]
    reader.seek(2_000_000)
    assert reader.read(500_000) == payload[2_000_000:2_500_000]
    again = storage.BlockReader(url, s3.storage_options, size=ident.size, version=ident.etag,
                                block_size=1 << 18)
    again.seek(2_100_000)
    assert again.read(100) == payload[2_100_000:2_100_100]
    # nothing fetched twice, nothing past what the forward passes asked for + their readahead
    assert s3.counter.total_bytes <= len(payload)


def test_missing_denied_and_no_credentials_are_neurocube_errors(s3, tmp_path):
    (tmp_path / "x").write_bytes(b"abc")
    url = s3.put(tmp_path / "x", "held-out/x")
    with pytest.raises(DataNotFoundError, match=f"s3://{s3.name}/nothing"):
        storage.info(f"s3://{s3.name}/nothing", s3.storage_options)
    s3.proxy.deny.append("held-out")
    with pytest.raises(AccessDeniedError, match="storage_options") as err:
        storage.read_range(url, 0, 3, s3.storage_options)
    assert isinstance(err.value, PermissionError)
    no_keys = {k: v for k, v in s3.storage_options.items() if k not in {"key", "secret"}}
    with pytest.raises(StorageError, match="storage_options"):
        storage.info(f"s3://{s3.name}/other", no_keys)


def test_storage_options_never_show_their_secrets(s3):
    opts = storage.StorageOptions(s3.storage_options)
    assert SECRET not in repr(opts) and SECRET not in str(opts)
    assert SECRET not in str(tokenize(opts))
    assert pickle.loads(pickle.dumps(opts)).as_dict()["secret"] == SECRET
    other = storage.StorageOptions({**s3.storage_options, "secret": "another"})
    assert tokenize(opts) == tokenize(other)  # same data, other credentials: same key


def test_check_unchanged_compares_the_ctime_of_a_local_file(tmp_path):
    import os
    import time

    from neurocube import storage
    from neurocube.errors import SourceChangedError

    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * 100)
    before = path.stat()
    storage.check_unchanged(str(path), None, before.st_size, before.st_mtime_ns,
                            ctime_ns=before.st_ctime_ns)
    time.sleep(0.02)
    path.write_bytes(b"b" * 100)  # same size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # mtime set back
    storage.check_unchanged(str(path), None, before.st_size, before.st_mtime_ns)  # blind to it
    with pytest.raises(SourceChangedError, match=r"f\.bin: changed since it was opened.*ctime"):
        storage.check_unchanged(str(path), None, before.st_size, before.st_mtime_ns,
                                ctime_ns=before.st_ctime_ns)
