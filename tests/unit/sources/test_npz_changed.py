"""A local NPZ archive rewritten between open and compute, with its size kept and mtime set back.

Such a rewrite leaves the size and mtime the reader recorded; the status-change time (ctime)
still moves, as the NIfTI reader relies on. It is refused as a change
(:class:`SourceChangedError`, "open it again"), on every local read path: whole members,
members of many files into one chunk, a memory map, and ``open_embeddings``. The ZIP CRC-32
of each member is a second line behind it: without the ctime it reports the new bytes as
damage (:class:`CorruptDataError`), except for a memory map, which it does not cover.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import pytest

import neurocube
from neurocube.errors import CorruptDataError, SourceChangedError
from neurocube.sources.npz import (
    open_member_memmap,
    read_member,
    read_members_into,
    read_npz_directory,
)
from tests.fixtures.embeddings_tree import make_tree, window_values

SAVERS = {"stored": np.savez, "deflated": np.savez_compressed}
OLD = np.full((64, 8), 3.0)
NEW = np.full((64, 8), 5.0)  # a constant too: the same size stored and deflated


def _rewrite_keeping_size_and_mtime(path, before: os.stat_result, save, **arrays) -> None:
    time.sleep(0.02)  # the ctime clock must move on (coarse on some file systems)
    save(path, **arrays)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # mtime set back
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


@pytest.fixture(params=list(SAVERS))
def rewritten(request, tmp_path):
    """(member read at open, path, saver): the archive is rewritten after the directory read."""
    save = SAVERS[request.param]
    path = tmp_path / f"{request.param}.npz"
    save(path, x=OLD)
    member = read_npz_directory(path)["x"]
    np.testing.assert_array_equal(read_member(member), OLD)  # read fine before the rewrite
    _rewrite_keeping_size_and_mtime(path, path.stat(), save, x=NEW)
    return member, path, save


def test_a_rewrite_that_keeps_size_and_mtime_is_refused_as_a_change(rewritten):
    member, path, _ = rewritten
    changed = rf"{path.name}: changed since it was opened \(then ctime .*open it again"
    with pytest.raises(SourceChangedError, match=changed):
        read_member(member)
    with pytest.raises(SourceChangedError, match=changed):
        read_members_into([member, member], np.empty((128, 8)))
    if member.is_stored:  # only a stored member can be mapped; its bytes carry no CRC check
        with pytest.raises(SourceChangedError, match=changed):
            open_member_memmap(member)
    # opened again: the new content, as it is
    np.testing.assert_array_equal(read_member(read_npz_directory(path)["x"]), NEW)


def test_without_the_ctime_the_member_crc_still_refuses_the_new_bytes(rewritten):
    member, path, _ = rewritten
    blind = dataclasses.replace(member, ctime_ns=0)  # as the reader was before it kept ctime
    with pytest.raises(CorruptDataError, match=rf"{path.name}: array 'x' fails its ZIP CRC-32"):
        read_member(blind)
    with pytest.raises(CorruptDataError, match=rf"{path.name}: array 'x' fails its ZIP CRC-32"):
        read_members_into([blind], np.empty((64, 8)))
    if member.is_stored:  # a map has no CRC check: without the ctime it shows the new values
        np.testing.assert_array_equal(open_member_memmap(blind), NEW)


def test_open_embeddings_refuses_an_artifact_rewritten_before_compute(tmp_path):
    recordings = make_tree(tmp_path, models=("cbramod",), conditions=("EO",), compressed=False)
    ordered = sorted(recordings, key=lambda r: str(r.path))
    ds = neurocube.open_embeddings(tmp_path, "epoch")
    victim = ordered[1].path
    with np.load(victim) as npz:
        arrays = {name: npz[name] for name in npz.files}
    arrays["window_embeddings"] = arrays["window_embeddings"] + 1  # other values, same size
    _rewrite_keeping_size_and_mtime(victim, victim.stat(), np.savez, **arrays)
    with pytest.raises(SourceChangedError, match=rf"{victim.name}: changed since it was opened"):
        ds.embedding.compute()
    again = neurocube.open_embeddings(tmp_path, "epoch")  # opened again: the new values
    expected = [window_values(r.number, r.n_windows, 6) for r in ordered]
    expected[1] = expected[1] + 1
    np.testing.assert_array_equal(again.embedding.values, np.concatenate(expected))
