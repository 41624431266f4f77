"""Writers edit what the user named: links and permission bits kept, dead writers' temps gone."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import h5py
import numpy as np
import pytest

import neurocube.traces as nct
from neurocube.errors import AccessDeniedError, NeurocubeError
from neurocube.io._atomic import atomic_path, remove_stale_temps, temp_name


def test_a_write_through_a_symlink_replaces_the_target_and_keeps_the_link(tmp_path):
    real = tmp_path / "data" / "real.txt"
    real.parent.mkdir()
    real.write_text("old")
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    with atomic_path(link) as tmp:
        tmp.write_text("new")
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_text() == "new"
    assert sorted(p.name for p in real.parent.iterdir()) == ["real.txt"]  # no temp left


def test_a_chain_of_links_and_a_dangling_link(tmp_path):
    real = tmp_path / "real.txt"
    first = tmp_path / "first.txt"
    second = tmp_path / "second.txt"
    first.symlink_to(real)  # dangling until written
    second.symlink_to(first)
    with atomic_path(second) as tmp:
        tmp.write_text("made")
    assert real.read_text() == "made" and first.is_symlink() and second.is_symlink()


def test_a_symlink_loop_is_a_neurocube_error(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(NeurocubeError, match=r"a\.txt: a symbolic link loop"), atomic_path(a):
        pass


def test_permission_bits_are_kept_on_overwrite(tmp_path):
    target = tmp_path / "private.txt"
    target.write_text("old")
    target.chmod(0o600)
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    target.chmod(0o640)
    with atomic_path(target) as tmp:
        tmp.write_text("newer")
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_temps_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    target = tmp_path / "out.h5"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    mine = temp_name(target)
    stale = mine.with_name(mine.name.replace(f"-{os.getpid()}-", f"-{dead_pid}-"))
    stale.write_bytes(b"x" * 1000)
    live = temp_name(target)  # this process: alive
    live.write_bytes(b"y")
    foreign = tmp_path / f".{target.name}.nctmp-otherhost-{dead_pid}-abcd1234.tmp.h5"
    foreign.write_bytes(b"z")  # another host's writer: not ours to judge
    other_output = tmp_path / f".other.h5.nctmp-{mine.name.split('-')[1]}-{dead_pid}-ab.tmp.h5"
    other_output.write_bytes(b"w")
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert not stale.exists()
    assert live.exists() and foreign.exists() and other_output.exists()
    assert target.read_bytes() == b"new"
    assert remove_stale_temps(target) == []


def test_a_killed_writer_leaves_a_temp_the_next_write_removes(tmp_path):
    target = tmp_path / "big.bin"
    script = (
        "import os, sys\n"
        "from neurocube.io._atomic import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    tmp.write_bytes(b'0' * 100000)\n"
        "    os._exit(9)  # killed mid-write: no cleanup runs\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", script, str(target)], env=env, check=False)
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".big.bin.")]
    assert len(left) == 1 and not target.exists()
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"done")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_a_neurocube_error(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(AccessDeniedError, match=r"ro: cannot write here"), atomic_path(
            folder / "x.txt"
        ):
            pass
    finally:
        folder.chmod(0o700)


def _trace_file(path):
    with h5py.File(path, "w") as h5:
        group = h5.create_group("rec.xdf")
        group.attrs["channel_labels"] = "['EDC_L']"
        traces = group.create_group("traces")
        for i in range(3):
            traces.create_dataset(str(i), data=np.arange(10.0) + i).attrs["onset"] = str(i)


def test_set_attrs_through_a_symlink_edits_the_real_file_and_keeps_its_mode(tmp_path):
    real = tmp_path / "store" / "cache.hdf5"
    real.parent.mkdir()
    _trace_file(real)
    real.chmod(0o600)
    link = tmp_path / "cache.hdf5"
    link.symlink_to(real)
    attrs = nct.get_attrs(link, 1)
    nct.set_attrs(link, 1, {**attrs, "onset": 7})
    assert link.is_symlink()
    assert stat.S_IMODE(real.stat().st_mode) == 0o600
    with h5py.File(real, "r") as h5:
        assert h5["rec.xdf/traces/1"].attrs["onset"] == "7"


def test_save_spectral_through_a_symlink_keeps_link_and_mode(tmp_path):
    from neurocube.io import save_spectral

    real = tmp_path / "real.h5"
    link = tmp_path / "link.h5"
    save_spectral(real, {"eigenvalues": np.arange(3.0), "eigenvectors": np.eye(4, 3)})
    real.chmod(0o600)
    link.symlink_to(real)
    save_spectral(link, {"eigenvalues": np.arange(3.0) + 1, "eigenvectors": np.eye(4, 3)})
    assert link.is_symlink() and stat.S_IMODE(real.stat().st_mode) == 0o600
    with h5py.File(real, "r") as h5:
        np.testing.assert_array_equal(h5["eigenvalues"][()], np.arange(3.0) + 1)
