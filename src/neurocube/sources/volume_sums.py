"""Per-volume checksums of the uncompressed bytes of a ``.gz`` file.

A gzip trailer's CRC32 vouches for the whole stream, and only a pass that reads
the stream from its start to its end checks it. A read that seeks through an
index inflates a few MiB from a seek point and checks nothing. So the first full
pass over a file also computes one checksum per volume (:class:`VolumeHasher`),
the index's sidecar keeps them, and reads through the index compare the volumes
they return against them (``gzindex.check_volumes``).

The checksum (:data:`VOLUME_SUM`): the volume is cut into 4 KiB blocks
(:data:`SUM_BLOCK`), each block is summed as little-endian uint64 words modulo
2**64 (a short last block is zero-padded to whole words), and the volume's
checksum is the CRC32 of that list of sums. Summing runs at memory speed (about
4x ``zlib.crc32``, measured), so checking costs a few percent of inflating.
Any changed byte changes its block's sum, and the CRC32 over the sums makes the
result depend on every block and on its place in the volume.

Nothing here knows about gzip, indexes or files: these are functions of bytes.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SUM_BLOCK", "VOLUME_SUM", "VolumeHasher", "Volumes", "volume_checksum"]

Volumes = tuple[int, int, int]  # (offset of the first volume, bytes per volume, count)
VOLUME_SUM = "sum64x4k-crc32"
SUM_BLOCK = 4096
_SUM_WORDS = SUM_BLOCK // 8


def _block_sums(data: Any) -> Any:
    """Return the uint64 sums of the 4 KiB blocks of ``data`` (bytes-like; length any)."""
    import numpy as np

    raw = np.frombuffer(data, dtype=np.uint8)
    full = raw.size // SUM_BLOCK
    head = raw[: full * SUM_BLOCK].view("<u8").reshape(full, _SUM_WORDS)
    sums = head.sum(axis=1, dtype=np.uint64)
    rest = raw[full * SUM_BLOCK :]
    if rest.size:
        padded = np.zeros(-(-rest.size // 8) * 8, dtype=np.uint8)
        padded[: rest.size] = rest
        sums = np.append(sums, padded.view("<u8").sum(dtype=np.uint64))
    return sums


def volume_checksum(data: Any) -> int:
    """Return the checksum (:data:`VOLUME_SUM`) of one volume's uncompressed bytes."""
    import zlib

    return zlib.crc32(_block_sums(data).astype("<u8").tobytes())


class VolumeHasher:
    """Per-volume checksums of a stream fed in order, in pieces that need not align to volumes.

    ``feed(pos, data)`` takes the uncompressed bytes at ``pos`` (the next position expected);
    bytes outside ``[offset, offset + size * count)`` are ignored. :attr:`sums` grows by one
    checksum per finished volume.
    """

    def __init__(self, offset: int, size: int, count: int) -> None:
        self.offset, self.size, self.count = offset, size, count
        self.position = 0
        self.sums: list[int] = []
        self._crc = 0
        self._carry = bytearray()  # the unfinished 4 KiB block of the current volume

    @property
    def complete(self) -> bool:
        """True once every volume has its checksum."""
        return len(self.sums) >= self.count

    def feed(self, pos: int, data: Any) -> None:
        """Take the bytes ``data`` at uncompressed position ``pos`` (ValueError if out of order)."""
        import zlib

        if pos != self.position:
            raise ValueError(f"volume checksums fed out of order ({pos} after {self.position})")
        view = memoryview(data).cast("B")
        n = len(view)
        i = 0
        while i < n and not self.complete:
            vol_start = self.offset + len(self.sums) * self.size
            here = pos + i
            if here < vol_start:  # header or extension bytes
                i += min(n - i, vol_start - here)
                continue
            done = here - vol_start  # bytes of this volume already fed
            take = min(n - i, self.size - done)
            piece = view[i : i + take]
            j = 0
            if self._carry:
                j = min(take, SUM_BLOCK - len(self._carry))
                self._carry += piece[:j]
                if len(self._carry) == SUM_BLOCK:
                    self._crc = zlib.crc32(_block_sums(self._carry).astype("<u8"), self._crc)
                    self._carry.clear()
            whole = (take - j) // SUM_BLOCK * SUM_BLOCK
            if whole:
                sums = _block_sums(piece[j : j + whole])
                self._crc = zlib.crc32(sums.astype("<u8"), self._crc)
            self._carry += piece[j + whole :]
            i += take
            if done + take == self.size:  # the volume is complete
                if self._carry:
                    self._crc = zlib.crc32(_block_sums(self._carry).astype("<u8"), self._crc)
                    self._carry.clear()
                self.sums.append(self._crc)
                self._crc = 0
        self.position = pos + n
