"""The storage package: the names of the former ``storage.py``, its state once, its layers.

``neurocube.storage`` was one module; it is a package of submodules by concept. Callers
keep writing ``storage.X``; state (counters, caches, pools) must exist once, where the code
that uses it looks it up; submodules import only the ones below them (no cycles).
"""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import numpy as np
import pytest
from dask.base import tokenize

from neurocube import storage
from neurocube.storage import (
    backends,
    counters,
    handles,
    identities,
    listing,
    locations,
    options,
    reading,
    remote_blocks,
)

PACKAGE = Path(storage.__file__).parent

#: lowest first: a submodule may import only the ones before it
LAYERS = [counters, locations, options, backends, listing, identities, reading,
          remote_blocks, handles]

#: what ``neurocube.storage`` offered as a module (its public names, and ``filesystem``, which
#: caching/store.py uses to list a cache entry: private, ``_filesystem``, before the split)
FORMER_NAMES = {
    "BLOCK_SIZE", "BlockReader", "FETCH_THREADS", "FileIdentity", "HandlePool", "IO_STATS",
    "LIST_STATS", "ObjectInfo", "READAHEAD", "SECRET_NAMES", "SHARED_BLOCKS",
    "SHARED_CACHE_BYTES", "SMALL_BLOCK", "StorageOptions", "as_options", "basename",
    "check_unchanged", "delete", "exists", "file_identity", "find", "identity", "info",
    "is_local", "is_url", "isdir", "isfile", "join", "list_files", "listdir", "local_path",
    "normalize", "open_file", "options_for", "parent", "read_all", "read_range", "read_ranges",
    "redact", "relative", "remember_options", "stat_key", "translate_errors", "write_bytes",
    "filesystem",
}
FORMER_ALL = {
    "IO_STATS", "BlockReader", "FileIdentity", "HandlePool", "ObjectInfo", "StorageOptions",
    "as_options", "basename", "check_unchanged", "delete", "exists", "file_identity", "find",
    "identity", "info", "is_local", "is_url", "isdir", "join", "list_files", "local_path",
    "normalize", "open_file", "options_for", "remember_options", "parent", "read_all",
    "read_range", "read_ranges", "write_bytes", "redact",
}


def test_every_former_name_is_still_there_and_all_is_unchanged():
    missing = sorted(name for name in FORMER_NAMES if not hasattr(storage, name))
    assert missing == []
    assert set(storage.__all__) == FORMER_ALL
    assert len(storage.__all__) == len(FORMER_ALL)
    # a function name is the function, never a submodule of the same name
    assert callable(storage.identity) and callable(storage.info) and callable(storage.find)


def test_each_name_is_the_one_object_its_submodule_defines():
    defined = {}
    for module in LAYERS:
        tree = ast.parse(Path(module.__file__).read_text())
        for node in tree.body:
            names = []
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names = [node.target.id]
            for name in names:
                assert name not in defined, f"{name} defined in {defined.get(name)} and {module}"
                defined[name] = module
    for name in FORMER_NAMES:
        assert getattr(storage, name) is getattr(defined[name], name), name


def test_state_is_looked_up_where_it_lives(tmp_path, monkeypatch):
    path = tmp_path / "a.bin"
    path.write_bytes(np.arange(300, dtype=np.uint8).tobytes())
    # patching the memo in its submodule reaches storage.file_identity
    memo: dict = {}
    monkeypatch.setattr(identities, "_IDENTITY_CACHE", memo)
    ident = storage.file_identity(path)
    assert list(memo.values()) == [ident]
    # reads through the package count in the one IO_STATS
    before = storage.IO_STATS.snapshot()
    assert storage.read_range(str(path), 10, 20) == bytes(range(10, 20))
    opens, got = storage.IO_STATS.snapshot()
    assert (opens - before[0], got - before[1]) == (1, 10)
    assert counters.IO_STATS is storage.IO_STATS is reading.IO_STATS is remote_blocks.IO_STATS
    # the listing counter
    n = storage.LIST_STATS["find"]
    storage.find(tmp_path)
    assert listing.LIST_STATS["find"] == n + 1


def test_submodules_import_only_lower_layers():
    rank = {module.__name__: i for i, module in enumerate(LAYERS)}
    assert {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"} == {
        m.__name__.rsplit(".", 1)[-1] for m in LAYERS
    }
    for module in LAYERS:
        tree = ast.parse(Path(module.__file__).read_text())
        assert ast.get_docstring(tree), f"{module.__name__} has no docstring"
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module]
                assert node.level == 0, "absolute imports, as in the rest of neurocube"
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                if target == "neurocube.storage":
                    pytest.fail(f"{module.__name__} imports the package itself")
                if target.startswith("neurocube.storage."):
                    assert rank[target] < rank[module.__name__], (module.__name__, target)


#: ``pickle.dumps(obj, protocol=4)`` as written by the former ``storage.py`` module
FORMER_PICKLES = {
    "FileIdentity": (
        storage.FileIdentity("/data/a.nii.gz", 10, 5, "ab", "etag"),
        b'\x80\x04\x95x\x00\x00\x00\x00\x00\x00\x00\x8c\x11neurocube.storage\x94\x8c\x0cFileIdentity\x94\x93\x94)\x81\x94}\x94(\x8c\x04path\x94\x8c\x0e/data/a.nii.gz\x94\x8c\x04size\x94K\n\x8c\x08mtime_ns\x94K\x05\x8c\x0bends_sha256\x94\x8c\x02ab\x94\x8c\x04etag\x94h\x0bub.',
    ),
    "ObjectInfo": (
        storage.ObjectInfo("s3://b/k", 3, etag="e"),
        b'\x80\x04\x95v\x00\x00\x00\x00\x00\x00\x00\x8c\x11neurocube.storage\x94\x8c\nObjectInfo\x94\x93\x94)\x81\x94}\x94(\x8c\x04path\x94\x8c\x08s3://b/k\x94\x8c\x04size\x94K\x03\x8c\x06is_dir\x94\x89\x8c\x08mtime_ns\x94K\x00\x8c\x08ctime_ns\x94K\x00\x8c\x04etag\x94\x8c\x01e\x94ub.',
    ),
    "StorageOptions": (
        storage.StorageOptions({"anon": True}),
        b'\x80\x04\x957\x00\x00\x00\x00\x00\x00\x00\x8c\x11neurocube.storage\x94\x8c\x0eStorageOptions\x94\x93\x94}\x94\x8c\x04anon\x94\x88s\x85\x94R\x94.',
    ),
}


@pytest.mark.parametrize("name", sorted(FORMER_PICKLES))
def test_pickles_and_tokens_name_the_classes_as_before(name):
    obj, former = FORMER_PICKLES[name]
    # the same bytes: the class is named neurocube.storage.X, so a Dask token of an object
    # holding it (a cache key) is the one the former module gave
    assert pickle.dumps(obj, protocol=4) == former
    assert pickle.loads(former) == obj
    assert type(obj).__module__ == "neurocube.storage"
    assert tokenize(pickle.loads(former)) == tokenize(obj)


def test_public_classes_are_named_by_the_package():
    for cls in (storage.BlockReader, storage.FileIdentity, storage.HandlePool,
                storage.ObjectInfo, storage.StorageOptions):
        assert cls.__module__ == "neurocube.storage"
        assert getattr(storage, cls.__qualname__) is cls
